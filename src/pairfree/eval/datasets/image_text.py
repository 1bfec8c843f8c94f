"""Image-text retrieval sets.

COCO val2017: `annotations/captions_val2017.json` (images: id, file_name; annotations: image_id,
caption) and `val2017/` (5,000 images, 25,014 captions: the set the Ex-MCR paper uses).
COCO Karpathy 5k test: `dataset_coco.json` (Karpathy & Fei-Fei's split: images with split "test",
filepath, filename, sentences[].raw) and the images under `<filepath>/` (val2014).
Flickr30k 1k test: `dataset_flickr30k.json` (same format, split "test") and `flickr30k-images/`."""

from __future__ import annotations

import json
from pathlib import Path

from pairfree.eval.data import Coverage, Item, RetrievalData, limit_pairs, require


def _build(name, protocol, ann, images: list[tuple[str, Path, list[str]]]) -> RetrievalData:
    cov = Coverage(expected=len(images))
    items, texts, positives = [], [], []
    for iid, path, captions in images:
        if not path.is_file():
            cov.miss(iid, f"{path.name} not found")
            continue
        caps = [c.strip() for c in captions if c and c.strip()]
        positives.append(list(range(len(texts), len(texts) + len(caps))))
        texts += [Item(f"{iid}#{k}", c) for k, c in enumerate(caps)]
        items.append(Item(iid, path))
    cov.present = len(items)
    return RetrievalData(name, protocol, cov, [ann], a=("image", items), b=("text", texts), positives=positives)


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def load_coco(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    root = Path(root)
    ann = require(root, "annotations/captions_val2017.json")
    d = _json(ann)
    caps: dict[int, list[str]] = {}
    for a in d.get("annotations", []):
        caps.setdefault(int(a["image_id"]), []).append(a["caption"])
    imgs = sorted(d.get("images", []), key=lambda i: i["id"])
    imgs = imgs[: limit_pairs(len(imgs), limit)]
    return _build("coco", {"dataset": "COCO", "split": "val2017", "positives": "every caption of the image"}, ann,
                  [(str(i["id"]), root / "val2017" / i["file_name"], caps.get(int(i["id"]), [])) for i in imgs])


def _karpathy(name: str, root: Path, ann: Path, image_dirs: list[str], limit: int | None) -> RetrievalData:
    d = _json(ann)
    imgs = [i for i in d.get("images", []) if i.get("split") == "test"]
    imgs = imgs[: limit_pairs(len(imgs), limit)]
    out = []
    for i in imgs:
        cands = [root / i.get("filepath", "") / i["filename"]] + [root / dd / i["filename"] for dd in image_dirs]
        path = next((c for c in cands if c.is_file()), cands[0])
        out.append((str(i.get("cocoid", i.get("imgid", i["filename"]))), path, [s["raw"] for s in i.get("sentences", [])]))
    return _build(name, {"dataset": name, "split": "Karpathy test", "positives": "every caption of the image"}, ann, out)


def load_coco_karpathy(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    root = Path(root)
    return _karpathy("coco-karpathy", root, require(root, "dataset_coco.json", "karpathy/dataset_coco.json"),
                     ["val2014", "images"], limit)


def load_flickr30k(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    root = Path(root)
    return _karpathy("flickr30k", root, require(root, "dataset_flickr30k.json", "karpathy/dataset_flickr30k.json"),
                     ["flickr30k-images", "images", "Images"], limit)
