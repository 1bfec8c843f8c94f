"""Shared by the audio-visual datasets: a (frame, audio) pair per clip, from extracted files
(`frames/<id>.jpg` + `audio/<id>.wav`, the layout the localization code of Senocak et al. / Chen
et al. / EZ-VSL reads) or from the clip's video (frame and audio taken as the protocol says)."""

from __future__ import annotations

from pathlib import Path

from pairfree.eval.data import Coverage, Item, extract_av, find_file

IMAGE_EXT = (".jpg", ".jpeg", ".png")
AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")
VIDEO_EXT = (".mp4", ".mkv", ".webm", ".avi")


def av_pair(root: Path, clip_id: str, cache: Path | None, coverage: Coverage, *, video_dirs: tuple[str, ...] = ("video",),
            start: float = 0.0, end: float | None = None) -> tuple[Item, Item] | None:
    """(image item, audio item) of one clip, or None (recorded as missing)."""
    frame = find_file([root / "frames"], clip_id, IMAGE_EXT)
    audio = find_file([root / "audio"], clip_id, AUDIO_EXT)
    if frame is not None and audio is not None:
        return Item(clip_id, frame), Item(clip_id, audio)
    video = find_file([root / d for d in video_dirs] + [root], clip_id, VIDEO_EXT)
    if video is None:
        coverage.miss(clip_id, "no frames/ + audio/ files and no video")
        return None
    if cache is None:
        raise ValueError("extracting frames and audio from videos needs a cache folder")
    try:
        jpg, wav = extract_av(video, Path(cache) / "extracted", start=start, end=end)
    except Exception as e:  # an unreadable video is one missing clip, not the end of the run
        coverage.unreadable.append(f"{clip_id}: {type(e).__name__}: {e}")
        return None
    return Item(clip_id, jpg), Item(clip_id, wav)
