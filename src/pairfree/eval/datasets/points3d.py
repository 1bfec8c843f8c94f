"""3D datasets.

ModelNet40, the ULIP / PointBERT test split: `modelnet40_normal_resampled/` with
`modelnet40_shape_names.txt`, `modelnet40_test.txt` (2,468 ids such as airplane_0627) and either
ULIP's preprocessed `modelnet40_test_8192pts_fps.dat` (a pickle of [points, labels], read with the
restricted unpickler: no code runs) or the raw `<class>/<id>.txt` files (x,y,z,nx,ny,nz per line).
Class names and the 64 prompt templates are ULIP's (`labels.json`, `templates.json`
"modelnet40_64"), shipped with pairfree.

ScanObjectNN (Uy et al., ICCV 2019): `h5_files/main_split/test_objectdataset_augmentedrot_scale75.h5`
(PB_T50_RS, the hardest variant, the default) or another variant's test .h5 (`variant=`), datasets
"data" (N, 2048, 3) and "label"; 15 classes; ULIP's 64 templates.

Objaverse-LVIS (Deitke et al. 2023, as OpenShape distributes it): `meta_data/split/lvis.json` (a
list of {"uid", "category", "data_path"}) and the records at `<data_path>` (the Objaverse `.npy`
record format, read with the restricted unpickler); images are not part of that release: they are
looked for as `images/<uid>.{png,jpg,jpeg,webp}` or `thumbnails/<uid>.*` (the paper does not say
which view it used).

EShot (E-MM1, Encord 2025): `eshot_audio_info.csv`, `eshot_points_info.csv` (ids and file_name),
`category_to_audio_ids.json`, `category_to_point_ids.json`, `audio/`, `point-clouds/`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pairfree.eval.data import ClassificationData, ClassVectorData, Coverage, Item, RetrievalData, find_file, limit_pairs, require

_ULIP = json.loads((Path(__file__).resolve().parents[1] / "data" / "ulip_modelnet40.json").read_text())
SCANOBJECTNN_CLASSES = ["bag", "bin", "box", "cabinet", "chair", "desk", "display", "door", "shelf", "table", "bed",
                        "pillow", "sink", "sofa", "toilet"]


def _write_clouds(folder: Path, ids: list[str], clouds) -> list[Path]:
    """Clouds as .npy files (once), so they go through the encode pipeline and its cache like any file."""
    from pairfree.fileio import save_npy

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, c in zip(ids, clouds):
        p = folder / f"{i}.npy"
        if not p.is_file():
            save_npy(p, np.ascontiguousarray(np.asarray(c, np.float32)[:, :3]))
        out.append(p)
    return out


def load_modelnet40(root: Path, limit: int | None = None, cache: Path | None = None) -> ClassificationData:
    from pairfree.media.safe_pickle import loads

    root = Path(root)
    base = root / "modelnet40_normal_resampled" if (root / "modelnet40_normal_resampled").is_dir() else root
    names_file = require(base, "modelnet40_shape_names.txt")
    ids_file = require(base, "modelnet40_test.txt")
    shape_names = [x.strip() for x in names_file.read_text().splitlines() if x.strip()]
    ids = [x.strip() for x in ids_file.read_text().splitlines() if x.strip()]
    labels = np.array([shape_names.index("_".join(i.split("_")[:-1])) for i in ids], np.int64)
    n = limit_pairs(len(ids), limit)
    cov = Coverage(expected=n)
    dat = base / "modelnet40_test_8192pts_fps.dat"
    if cache is None:
        raise ValueError("ModelNet40 needs a cache folder (its clouds are written there as .npy once)")
    if dat.is_file():
        points, dat_labels = loads(dat.read_bytes(), where=str(dat))
        if len(points) != len(ids):
            raise ValueError(f"{dat}: {len(points)} clouds for {len(ids)} ids in {ids_file.name}")
        dat_labels = np.asarray([int(np.asarray(x).reshape(-1)[0]) for x in dat_labels])
        if not np.array_equal(dat_labels, labels):
            raise ValueError(f"{dat}: labels disagree with {ids_file.name}")
        files, keep = _write_clouds(Path(cache) / "modelnet40", ids[:n], points[:n]), list(range(n))
        source = [names_file, ids_file, dat]
    else:
        clouds, keep = [], []
        for k, i in enumerate(ids[:n]):
            txt = base / "_".join(i.split("_")[:-1]) / f"{i}.txt"
            if not txt.is_file():
                cov.miss(i, "no .txt and no .dat")
                continue
            clouds.append(np.loadtxt(txt, delimiter=",", dtype=np.float32))
            keep.append(k)
        files, source = _write_clouds(Path(cache) / "modelnet40", [ids[k] for k in keep], clouds), [names_file, ids_file]
    cov.present = len(files)
    return ClassificationData("modelnet40", {"dataset": "ModelNet40", "split": "test (ULIP / PointBERT)",
                                             "templates": "ULIP modelnet40_64", "points": "8192 (fps) when the .dat is used"},
                              cov, source, modality="3d", items=[Item(ids[k], f) for k, f in zip(keep, files)],
                              labels=labels[keep], classes=list(_ULIP["classes"]), templates=list(_ULIP["templates"]))


def load_scanobjectnn(root: Path, limit: int | None = None, cache: Path | None = None,
                      variant: str = "main_split/test_objectdataset_augmentedrot_scale75.h5") -> ClassificationData:
    import h5py

    root = Path(root)
    h5 = require(root, variant, f"h5_files/{variant}")
    with h5py.File(h5, "r") as f:
        if "data" not in f or "label" not in f:
            raise ValueError(f"{h5}: expected datasets 'data' and 'label', found {list(f)}")
        data, labels = np.asarray(f["data"]), np.asarray(f["label"]).reshape(-1).astype(np.int64)
    n = limit_pairs(len(data), limit)
    if cache is None:
        raise ValueError("ScanObjectNN needs a cache folder (its clouds are written there as .npy once)")
    ids = [f"{h5.stem}-{i:05d}" for i in range(n)]
    files = _write_clouds(Path(cache) / "scanobjectnn" / h5.stem, ids, data[:n])
    return ClassificationData("scanobjectnn", {"dataset": "ScanObjectNN", "variant": variant, "templates": "ULIP modelnet40_64"},
                              Coverage(expected=n, present=n), [h5], modality="3d",
                              items=[Item(i, f) for i, f in zip(ids, files)], labels=labels[:n],
                              classes=SCANOBJECTNN_CLASSES, templates=list(_ULIP["templates"]))


def load_esc50(root: Path, limit: int | None = None, cache: Path | None = None) -> ClassificationData:
    """ESC-50 (Piczak 2015): `meta/esc50.csv` (filename, fold, target, category, ...) and `audio/`;
    the five official folds; LAION-CLAP's zero-shot prompt "This is a sound of {}."."""
    root = Path(root)
    meta = require(root, "meta/esc50.csv")
    with open(meta, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"filename", "fold", "target", "category"} <= set(rows[0]):
        raise ValueError(f"{meta}: expected columns filename, fold, target, category")
    by_target = sorted({(int(r["target"]), r["category"]) for r in rows})
    classes = [c.replace("_", " ") for _, c in by_target]
    index = {t: i for i, (t, _) in enumerate(by_target)}  # target ids 0..49 in the full release
    rows = rows[: limit_pairs(len(rows), limit)]
    cov = Coverage(expected=len(rows))
    items, labels, folds = [], [], []
    for r in rows:
        p = root / "audio" / r["filename"]
        if not p.is_file():
            cov.miss(r["filename"], "not in audio/")
            continue
        items.append(Item(r["filename"], p))
        labels.append(index[int(r["target"])])
        folds.append(int(r["fold"]))
    cov.present = len(items)
    return ClassificationData("esc50", {"dataset": "ESC-50", "folds": "official 5 (accuracy per fold and over all)",
                                        "templates": ["This is a sound of {}."]}, cov, [meta], modality="audio",
                              items=items, labels=np.asarray(labels, np.int64), classes=classes,
                              templates=["This is a sound of {}."], folds=np.asarray(folds))


def load_objaverse_lvis(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    root = Path(root)
    ann = require(root, "meta_data/split/lvis.json", "lvis.json")
    try:
        entries = json.loads(ann.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{ann}: invalid JSON ({e})") from None
    entries = entries[: limit_pairs(len(entries), limit)]
    cov = Coverage(expected=len(entries))
    cats = sorted({e.get("category", "") for e in entries})
    points, images, labels = [], [], []
    for e in entries:
        uid = e["uid"]
        rec = root / e.get("data_path", f"{uid}.npy")
        img = find_file([root / "images", root / "thumbnails"], uid, (".png", ".jpg", ".jpeg", ".webp"))
        if not rec.is_file() or img is None:
            cov.miss(uid, "no record" if not rec.is_file() else "no image")
            continue
        points.append(Item(uid, rec))
        images.append(Item(uid, img))
        labels.append(cats.index(e.get("category", "")))
    cov.present = len(points)
    return RetrievalData("objaverse-lvis", {"dataset": "Objaverse-LVIS (OpenShape's split)", "positives": "the same object",
                                            "image": "images/<uid> (a rendered view or thumbnail the user provides)"},
                         cov, [ann], a=("3d", points), b=("image", images), positives=[[i] for i in range(len(points))],
                         labels=np.asarray(labels, np.int64))


def load_eshot(root: Path, limit: int | None = None, cache: Path | None = None) -> ClassVectorData:
    root = Path(root)
    files = [require(root, n) for n in ("eshot_audio_info.csv", "eshot_points_info.csv", "category_to_audio_ids.json",
                                        "category_to_point_ids.json")]

    def table(path: Path, id_col: str) -> dict[str, str]:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and (id_col not in rows[0] or "file_name" not in rows[0]):
            raise ValueError(f"{path}: expected columns {id_col} and file_name, found {sorted(rows[0])}")
        return {str(r[id_col]): r["file_name"] for r in rows}

    audio_files, point_files = table(files[0], "eshot_audio_id"), table(files[1], "eshot_point_id")
    cat_audio, cat_points = (json.loads(f.read_text(encoding="utf-8")) for f in files[2:])
    classes = sorted(set(cat_audio) | set(cat_points))
    cov = Coverage()

    def side(cat_ids: dict, names: dict[str, str], folder: str):
        items, labels = [], []
        pairs = [(c, str(i)) for c in sorted(cat_ids) for i in cat_ids[c]]
        for c, i in pairs[: limit_pairs(len(pairs), limit)]:
            cov.expected += 1
            p = root / folder / names.get(i, f"{i}")
            if not p.is_file():
                cov.miss(f"{folder}/{i}", "file not found")
                continue
            items.append(Item(f"{folder}/{i}", p))
            labels.append(classes.index(c))
        cov.present += len(items)
        return items, np.asarray(labels, np.int64)

    a, la = side(cat_audio, audio_files, "audio")
    p, lp = side(cat_points, point_files, "point-clouds")
    return ClassVectorData("eshot", {"dataset": "EShot (E-MM1)", "protocol": "class vector = normalised mean of the other "
                                     "modality's embeddings of the class; nearest class vector; Acc@1/5"}, cov, files,
                           a=("audio", a), labels_a=la, b=("3d", p), labels_b=lp, classes=classes)
