"""AVE (Tian et al., ECCV 2018): `AVE/<VideoID>.mp4` videos and `Annotations.txt`
(`Category&VideoID&Quality&StartTime&EndTime`, one row per annotated event, a header line), as in
the AVE_Dataset release (and the split files trainSet.txt / valSet.txt / testSet.txt, same rows, no
header). One (image, audio) pair per video, as Ex-MCR uses all the data: the frame at the middle
of the video's first annotated event and the audio of that event."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pairfree.eval.data import Coverage, RetrievalData, limit_pairs, require
from pairfree.eval.datasets.av_common import av_pair

SPLITS = {"all": "Annotations.txt", "train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}


def load(root: Path, limit: int | None = None, cache: Path | None = None, split: str = "all") -> RetrievalData:
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"AVE split must be one of {sorted(SPLITS)}, got {split!r}")
    ann = require(root, SPLITS[split], f"AVE_Dataset/{SPLITS[split]}")
    base = ann.parent
    first: dict[str, tuple[str, float, float]] = {}
    for n, line in enumerate(ann.read_text(encoding="utf-8-sig").splitlines(), 1):
        parts = [p.strip() for p in line.split("&")]
        if len(parts) != 5 or parts[0] == "Category":
            continue
        try:
            first.setdefault(parts[1], (parts[0], float(parts[3]), float(parts[4])))
        except ValueError:
            raise ValueError(f"{ann}: line {n}: StartTime/EndTime must be numbers, got {line!r}") from None
    ids = sorted(first)[: limit_pairs(len(first), limit)]
    cov = Coverage(expected=len(ids))
    classes = sorted({c for c, _, _ in first.values()})
    images, audios, labels = [], [], []
    for vid in ids:
        cat, start, end = first[vid]
        pair = av_pair(base, vid, cache, cov, video_dirs=("AVE",), start=start, end=end)
        if pair:
            images.append(pair[0])
            audios.append(pair[1])
            labels.append(classes.index(cat))
    cov.present = len(images)
    return RetrievalData("ave", {"dataset": "AVE", "split": split, "pairs": "frame at the middle of the first annotated "
                                 "event, the event's audio", "positives": "the same video only"}, cov, [ann],
                         a=("audio", audios), b=("image", images), positives=[[i] for i in range(len(images))],
                         labels=np.asarray(labels, np.int64))
