"""The toy world as evaluation datasets: its held-out test items written as media files
(`pairfree.toy.media.write_media(..., splits=("test", "scenes"))`), read through the toy encoders
like any dataset: retrieval between every pair of modalities (one positive: the same item),
zero-shot classification against the concept names, localization on the scenes, counterfactual
recognition with the items' concepts as classes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pairfree.eval.data import ClassificationData, Coverage, Item, LocalizationData, RetrievalData, limit_pairs, require
from pairfree.eval.metrics import box_map

FOLDERS = {"image": ("image", ".png"), "audio": ("audio", ".wav"), "3d": ("3d", None)}


def _items(root: Path, modality: str, n: int) -> list[Item]:
    if modality == "text":
        lines = require(root, "test/texts.txt").read_text(encoding="utf-8").splitlines()
        return [Item(f"test/texts.txt#{i}", line) for i, line in enumerate(lines[:n])]
    folder, ext = FOLDERS[modality]
    files = sorted((root / "test" / folder).glob(f"*{ext or '.*'}"))[:n]
    return [Item(f"test/{folder}/{f.name}", f) for f in files]


def _labels(root: Path) -> tuple[list[str], np.ndarray]:
    info = json.loads(require(root, "world.json").read_text())
    names = info["concepts"]
    with open(require(root, "metadata.csv"), newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test" and r["modality"] == "image"]
    return names, np.asarray([names.index(r["concept"]) for r in rows], np.int64)


def _n(root: Path, limit: int | None) -> int:
    return limit_pairs(len(list((root / "test" / "image").glob("*.png"))), limit)


def load_retrieval(root: Path, limit: int | None = None, cache: Path | None = None, a: str = "audio",
                   b: str = "image") -> RetrievalData:
    root = Path(root)
    n = _n(root, limit)
    ia, ib = _items(root, a, n), _items(root, b, n)
    if len(ia) != n or len(ib) != n:
        raise ValueError(f"{root}: expected {n} test items of {a} and {b}, found {len(ia)} and {len(ib)}")
    _, labels = _labels(root)
    return RetrievalData(f"toy-{a}-{b}", {"dataset": "toy world test split", "positives": "the same item"},
                         Coverage(expected=n, present=n), [root / "world.json"], a=(a, ia), b=(b, ib),
                         positives=[[i] for i in range(n)], labels=labels[:n])


def load_zero_shot(root: Path, limit: int | None = None, cache: Path | None = None, modality: str = "3d"
                   ) -> ClassificationData:
    root = Path(root)
    n = _n(root, limit)
    names, labels = _labels(root)
    return ClassificationData(f"toy-{modality}-zero-shot", {"dataset": "toy world test split",
                              "classes": "concept names (the toy text encoder averages their prompt templates)"},
                              Coverage(expected=n, present=n), [root / "world.json"], modality=modality,
                              items=_items(root, modality, n), labels=labels[:n], classes=names, templates=["{}"])


def load_localization(root: Path, limit: int | None = None, cache: Path | None = None) -> LocalizationData:
    root = Path(root)
    ann = require(root, "scenes.json")
    scenes = json.loads(ann.read_text())
    scenes = scenes[: limit_pairs(len(scenes), limit)]
    boxes = [[tuple(b) for b in s["boxes"]] for s in scenes]
    return LocalizationData("toy-localization", {"dataset": "toy scenes (2 x 2 mosaics)",
                                                 "gt": "the two tiles of the audio's concept"},
                            Coverage(expected=len(scenes), present=len(scenes)), [ann],
                            images=[Item(s["image"], root / s["image"]) for s in scenes],
                            audios=[Item(s["audio"], root / s["audio"]) for s in scenes],
                            gt_maps=[box_map(b) for b in boxes], boxes=boxes)
