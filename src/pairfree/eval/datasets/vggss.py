"""VGG-Sound Source (Chen et al., CVPR 2021): `vggss.json` (a list of {"file", "class", "bbox": [[x1, y1,
x2, y2], ...]} in normalised coordinates, as released with "Localizing Visual Sounds the Hard Way")
and the clips, either extracted (`frames/<file>.jpg`, `audio/<file>.wav`: the layout of that
paper's and EZ-VSL's test code) or as VGGSound videos (`video/<file>.mp4`; the annotated frame is
the middle of the 10-second clip, the audio the whole clip). `vggss_test.csv`, when present,
restricts to the test ids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from pairfree.eval.data import Coverage, LocalizationData, RetrievalData, limit_pairs, require
from pairfree.eval.datasets.av_common import av_pair
from pairfree.eval.metrics import box_map


def _annotations(root: Path) -> tuple[Path, list[dict]]:
    ann = require(root, "vggss.json", "metadata/vggss.json")
    try:
        rows = json.loads(ann.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{ann}: invalid JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "file" in r and "bbox" in r for r in rows):
        raise ValueError(f"{ann}: expected a list of objects with 'file' and 'bbox'")
    test = next((p for p in (root / "vggss_test.csv", root / "metadata" / "vggss_test.csv") if p.is_file()), None)
    if test is not None:
        keep = {r[0] for r in csv.reader(test.read_text(encoding="utf-8").splitlines()) if r}
        rows = [r for r in rows if r["file"] in keep]
    return ann, rows


def _pairs(root, limit, cache, task):
    root = Path(root)
    ann, rows = _annotations(root)
    rows = rows[: limit_pairs(len(rows), limit)]
    cov = Coverage(expected=len(rows))
    classes = sorted({str(r.get("class", "")) for r in rows})
    out = []
    for r in rows:
        pair = av_pair(root, r["file"], cache, cov)
        if pair:
            out.append((pair, r))
    cov.present = len(out)
    return ann, cov, classes, out


def load(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    ann, cov, classes, pairs = _pairs(root, limit, cache, "retrieval")
    return RetrievalData("vggss", {"dataset": "VGG-Sound Source", "pairs": "annotated (middle) frame, whole clip audio",
                                   "positives": "the same clip only"}, cov, [ann],
                         a=("audio", [p[1] for p, _ in pairs]), b=("image", [p[0] for p, _ in pairs]),
                         positives=[[i] for i in range(len(pairs))],
                         labels=np.asarray([classes.index(str(r.get("class", ""))) for _, r in pairs], np.int64))


def load_localization(root: Path, limit: int | None = None, cache: Path | None = None) -> LocalizationData:
    ann, cov, _, pairs = _pairs(root, limit, cache, "localization")
    boxes = [[tuple(float(v) for v in b) for b in r["bbox"]] for _, r in pairs]
    return LocalizationData("vggss-localization", {"dataset": "VGG-Sound Source", "gt": "union of the boxes",
                                                   "protocol": "Chen et al. 2021 (cIoU, AUC)"}, cov, [ann],
                            images=[p[0] for p, _ in pairs], audios=[p[1] for p, _ in pairs],
                            gt_maps=[box_map(b, consensus=1) for b in boxes], boxes=boxes)
