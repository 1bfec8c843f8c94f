"""Audio-text retrieval sets as their authors distribute them.

AudioCaps (Kim et al., NAACL 2019): `train.csv` / `val.csv` / `test.csv` with columns audiocap_id,
youtube_id, start_time, caption (five captions per clip in val and test); the audio is fetched by
users from YouTube, so it is looked for as `<youtube_id>`, `Y<youtube_id>`, `<audiocap_id>` or
`<youtube_id>_<start_time>` with a .wav / .flac / .mp3 / .ogg extension in `audio/<split>/`,
`audio/`, `<split>/` or the root. The Ex-MCR paper evaluates "964 audios x 5 captions" of what it
calls the validation set; the test split (975 clips x 5 captions, of which ~964 are usually still
downloadable) is the one that matches that count, so `split="test"` is the default.

Clotho v2.1 (Drossos et al., ICASSP 2020): `clotho_captions_evaluation.csv` (file_name, caption_1 ..
caption_5) and the audio in `evaluation/` or `clotho_audio_evaluation/evaluation/` (1,045 x 5)."""

from __future__ import annotations

import csv
from pathlib import Path

from pairfree.eval.data import Coverage, Item, RetrievalData, find_file, limit_pairs, require

AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")


def _retrieval(name: str, protocol: dict, ann: Path, clips: list[tuple[str, Path | None, list[str]]]) -> RetrievalData:
    cov = Coverage(expected=len(clips))
    audios, texts, positives = [], [], []
    for cid, path, captions in clips:
        if path is None:
            cov.miss(cid, "audio file not found")
            continue
        caps = [c.strip() for c in captions if c and c.strip()]
        if not caps:
            cov.miss(cid, "no caption")
            continue
        positives.append(list(range(len(texts), len(texts) + len(caps))))
        texts += [Item(f"{cid}#{k}", c) for k, c in enumerate(caps)]
        audios.append(Item(cid, path))
    cov.present = len(audios)
    return RetrievalData(name, protocol, cov, [ann], a=("audio", audios), b=("text", texts), positives=positives)


def load_audiocaps(root: Path, limit: int | None = None, cache: Path | None = None, split: str = "test") -> RetrievalData:
    root = Path(root)
    ann = require(root, f"{split}.csv", f"dataset/{split}.csv")
    with open(ann, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"audiocap_id", "youtube_id", "start_time", "caption"}
    if rows and not need <= set(rows[0]):
        raise ValueError(f"{ann}: expected columns {sorted(need)}, found {sorted(rows[0])}")
    by_clip: dict[str, dict] = {}
    for r in rows:
        c = by_clip.setdefault(r["youtube_id"], {"ids": [], "start": r["start_time"], "captions": []})
        c["ids"].append(r["audiocap_id"])
        c["captions"].append(r["caption"])
    folders = [root / "audio" / split, root / "audio", root / split, root]
    clips = []
    for yid in sorted(by_clip)[: limit_pairs(len(by_clip), limit)]:
        c = by_clip[yid]
        stems = [yid, f"Y{yid}", *c["ids"], f"{yid}_{c['start']}", f"{yid}_{int(float(c['start'] or 0))}"]
        path = next((p for s in stems if (p := find_file(folders, s, AUDIO_EXT)) is not None), None)
        clips.append((yid, path, c["captions"]))
    return _retrieval("audiocaps", {"dataset": "AudioCaps", "split": split, "captions_per_clip": "all (5)",
                                    "positives": "every caption of the clip"}, ann, clips)


def load_clotho(root: Path, limit: int | None = None, cache: Path | None = None) -> RetrievalData:
    root = Path(root)
    ann = require(root, "clotho_captions_evaluation.csv")
    with open(ann, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and "file_name" not in rows[0]:
        raise ValueError(f"{ann}: expected a file_name column and caption_1..caption_5, found {sorted(rows[0])}")
    folders = [root / "evaluation", root / "clotho_audio_evaluation" / "evaluation", root / "audio", root]
    clips = []
    for r in rows[: limit_pairs(len(rows), limit)]:
        name = r["file_name"]
        path = next((d / name for d in folders if (d / name).is_file()), None)
        clips.append((name, path, [r.get(f"caption_{k}", "") for k in range(1, 6)]))
    return _retrieval("clotho", {"dataset": "Clotho v2.1", "split": "evaluation", "positives": "the clip's 5 captions"},
                      ann, clips)
