"""What a dataset adapter hands a task: items per modality (files or texts), ground truth, coverage.

The contract is small on purpose (as CLIP_benchmark's `build_dataset`): an adapter reads the
dataset's own release layout from a root folder and returns one of the `*Data` classes below; a
task kind (`pairfree.eval.tasks`) scores any of them. Items are `Item(id, source)` with `source` a
Path (a media file) or a str (a text). Files the annotations name but the root lacks are counted in
`Coverage` and left out; the run goes on with what is present.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class Item:
    id: str
    source: Path | str  # a media file, or the text itself


@dataclass
class Coverage:
    """How much of the dataset as annotated was present under the root."""

    expected: int = 0
    present: int = 0
    missing: list[str] = field(default_factory=list)  # ids (and why), first ones kept in full
    unreadable: list[str] = field(default_factory=list)

    def miss(self, item_id: str, why: str = "") -> None:
        self.missing.append(f"{item_id}: {why}" if why else item_id)

    def as_dict(self, keep: int = 20) -> dict[str, Any]:
        return {"expected": self.expected, "present": self.present, "fraction": round(self.present / self.expected, 4)
                if self.expected else None, "missing": len(self.missing), "missing_examples": self.missing[:keep],
                "unreadable": len(self.unreadable), "unreadable_examples": self.unreadable[:keep]}


@dataclass
class Dataset:
    """Fields every kind shares."""

    name: str
    protocol: dict[str, Any]
    coverage: Coverage
    files: list[Path]  # annotation files, fingerprinted into the result


@dataclass
class RetrievalData(Dataset):
    """Two lists of items; positives[i] = indices into `b` that are correct for a[i] (>= 1 each)."""

    a: tuple[str, list[Item]] = ("", [])  # (modality, items)
    b: tuple[str, list[Item]] = ("", [])
    positives: list[list[int]] = field(default_factory=list)
    labels: np.ndarray | None = None  # optional class per pair (counterfactual pairs come from other classes)


@dataclass
class ClassificationData(Dataset):
    """Items of one modality with a class each, classified against prompt-template class texts."""

    modality: str = ""
    items: list[Item] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    classes: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: ["{}"])
    folds: np.ndarray | None = None  # per item, for datasets with official folds (accuracy reported per fold too)


@dataclass
class ClassVectorData(Dataset):
    """Two modalities with classes; each is classified against class vectors of the other (EShot)."""

    a: tuple[str, list[Item]] = ("", [])
    labels_a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    b: tuple[str, list[Item]] = ("", [])
    labels_b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    classes: list[str] = field(default_factory=list)


@dataclass
class LocalizationData(Dataset):
    """(image, audio) pairs with a ground-truth map over the whole image (`size` x `size`, values 0..1)."""

    images: list[Item] = field(default_factory=list)
    audios: list[Item] = field(default_factory=list)
    gt_maps: list[np.ndarray] = field(default_factory=list)
    boxes: list[list[tuple[float, float, float, float]]] = field(default_factory=list)  # normalised, for plots


def fingerprint_files(paths: Sequence[Path]) -> dict[str, str]:
    """sha256 (first 16 hex) of each annotation file, so a result says which release it scored."""
    out = {}
    for p in paths:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        out[p.name] = h.hexdigest()[:16]
    return out


def require(root: Path, *names: str) -> Path:
    """The first of `names` that exists under `root`, else FileNotFoundError listing what was looked for."""
    for n in names:
        if (root / n).exists():
            return root / n
    raise FileNotFoundError(f"{root}: none of {list(names)} found; is this the dataset's root as distributed? "
                            "(see docs/datasets.md)")


def find_file(folders: Sequence[Path], stem: str, extensions: Sequence[str]) -> Path | None:
    for d in folders:
        for ext in extensions:
            p = d / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def limit_pairs(n: int, limit: int | None) -> int:
    return n if limit is None else min(n, max(0, int(limit)))


# ---- videos: the frame and the audio track the protocol uses --------------------------------------
def extract_av(video: Path, out_dir: Path, *, frame_at: float | None = None, start: float = 0.0,
               end: float | None = None) -> tuple[Path, Path]:
    """(jpg of the frame at `frame_at` seconds (default: the middle of [start, end] or of the video),
    wav of the audio track between `start` and `end`), written once into `out_dir` with PyAV."""
    import av
    import soundfile as sf

    stem = video.stem
    jpg, wav = out_dir / "frames" / f"{stem}.jpg", out_dir / "audio" / f"{stem}.wav"
    if jpg.is_file() and wav.is_file():
        return jpg, wav
    from pairfree.fileio import atomic_path

    with av.open(str(video)) as container:
        duration = float(container.duration / 1e6) if container.duration else None
        stop = end if end is not None else duration
        t = frame_at if frame_at is not None else ((start + stop) / 2 if stop is not None else start)
        vstream = container.streams.video[0]
        container.seek(int(max(0.0, t - 1.0) / vstream.time_base), stream=vstream, any_frame=False, backward=True)
        frame = None
        for f in container.decode(vstream):
            frame = f
            if f.time is not None and f.time >= t:
                break
        if frame is None:
            raise ValueError(f"{video}: no video frame")
        jpg.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(jpg) as tmp:
            frame.to_image().save(tmp, format="JPEG", quality=95)
    with av.open(str(video)) as container:
        if not container.streams.audio:
            raise ValueError(f"{video}: no audio track")
        astream = container.streams.audio[0]
        rate = astream.rate
        chunks = []
        for f in container.decode(astream):  # planar formats: (channels, samples); packed: (1, samples * channels)
            a = f.to_ndarray()
            a = a.T if f.format.is_planar else a.reshape(-1, len(f.layout.channels))
            chunks.append(a.astype(np.float32) / (32768.0 if a.dtype == np.int16 else 1.0))
        if not chunks:
            raise ValueError(f"{video}: empty audio track")
        audio = np.concatenate(chunks)
        a0, a1 = int(start * rate), (int(end * rate) if end is not None else len(audio))
        audio = audio[a0:a1] if a1 > a0 else audio
        wav.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(wav) as tmp:
            sf.write(tmp, audio.mean(axis=1) if audio.ndim == 2 else audio, rate, format="WAV", subtype="FLOAT")
    return jpg, wav
