"""Flickr-SoundNet (Aytar et al.'s SoundNet Flickr videos; the annotated "Sound Localization" set of
Senocak et al., CVPR 2018: 5k image-sound pairs with XML boxes from three annotators). Layout of the
localization test code of Chen et al. 2021 / EZ-VSL: `frames/<id>.jpg`, `audio/<id>.wav`,
`Annotations/<id>.xml` (boxes in 256 x 256 coordinates, in `<bbox>` elements whose first child is
skipped, as that code reads them), `flickr_test.csv` (the 250 test ids) for localization.
Retrieval uses every pair present (Ex-MCR: all 5,000)."""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

from pairfree.eval.data import Coverage, LocalizationData, RetrievalData, limit_pairs
from pairfree.eval.datasets.av_common import AUDIO_EXT, IMAGE_EXT, av_pair
from pairfree.eval.metrics import box_map


def _ids(root: Path) -> list[str]:
    frames = {p.stem for p in (root / "frames").glob("*") if p.suffix.lower() in IMAGE_EXT}
    audio = {p.stem for p in (root / "audio").glob("*") if p.suffix.lower() in AUDIO_EXT}
    if not frames and not audio:
        raise FileNotFoundError(f"{root}: no frames/ or audio/ files; is this the Flickr-SoundNet root? (docs/datasets.md)")
    return sorted(frames | audio)


def read_boxes(xml: Path) -> list[tuple[float, float, float, float]]:
    """Normalised boxes of one annotation file (every annotator's)."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{xml}: not valid XML ({e})") from None
    boxes = []
    for child in root:
        for el in child:
            if el.tag != "bbox":
                continue
            vals = [int(ch.text) for i, ch in enumerate(el) if i > 0][:4]
            if len(vals) != 4:
                raise ValueError(f"{xml}: a <bbox> needs xmin, ymin, xmax, ymax after its first child")
            boxes.append(tuple(v / 256 for v in vals))
    return boxes


def load(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    root = Path(root)
    ids = _ids(root)
    ids = ids[: limit_pairs(len(ids), limit)]
    cov = Coverage(expected=len(ids))
    pairs = [p for p in (av_pair(root, i, cache, cov) for i in ids) if p]
    cov.present = len(pairs)
    return RetrievalData("flickr-soundnet", {"dataset": "Flickr-SoundNet", "pairs": "every frame/audio pair present",
                                             "positives": "the same pair only"}, cov, [],
                         a=("audio", [p[1] for p in pairs]), b=("image", [p[0] for p in pairs]),
                         positives=[[i] for i in range(len(pairs))])


def load_localization(root: Path, limit: int | None = None, cache: Path | None = None) -> LocalizationData:
    root = Path(root)
    test = next((p for p in (root / "flickr_test.csv", root / "metadata" / "flickr_test.csv") if p.is_file()), None)
    if test is None:
        raise FileNotFoundError(f"{root}: flickr_test.csv (the 250 test ids) not found")
    ids = [r[0] for r in csv.reader(test.read_text(encoding="utf-8").splitlines()) if r]
    ids = ids[: limit_pairs(len(ids), limit)]
    cov = Coverage(expected=len(ids))
    images, audios, maps, boxes = [], [], [], []
    for i in ids:
        xml = root / "Annotations" / f"{i}.xml"
        if not xml.is_file():
            cov.miss(i, "no Annotations xml")
            continue
        pair = av_pair(root, i, cache, cov)
        if not pair:
            continue
        try:
            b = read_boxes(xml)
        except ValueError as e:
            cov.unreadable.append(str(e))
            continue
        images.append(pair[0])
        audios.append(pair[1])
        boxes.append(b)
        maps.append(box_map(b, consensus=2))
    cov.present = len(images)
    return LocalizationData("flickr-soundnet-localization", {"dataset": "Flickr-SoundNet test (250)",
                            "gt": "annotator consensus: boxes summed, halved, clipped to 1",
                            "protocol": "Senocak et al. 2018 / Chen et al. 2021 (cIoU, AUC)"}, cov, [test],
                            images=images, audios=audios, gt_maps=maps, boxes=boxes)
