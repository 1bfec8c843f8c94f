"""Audio -> mono float32 waveform at a requested sample rate (the item type of the audio modality).

Decoding is libsndfile (via `soundfile`: wav, flac, ogg/vorbis, opus, mp3 with libsndfile >= 1.1);
resampling is `soxr` at "HQ" quality, which is what `librosa.load(sr=...)` (used by laion_clap's
own file loading) does by default. Stereo is averaged to mono, as `librosa.load(mono=True)` does.
How a clip is padded or cropped to the model's window is each encoder's business; `fix_length`
and `int16_roundtrip` reproduce laion_clap's conventions for them.
"""

from __future__ import annotations

import struct

import numpy as np

from pairfree.media._common import MediaError, Source, label, missing_extra, open_binary, suffix

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")

# mp3 frame counts come from the Xing/LAME header and can be off by encoder delay / padding
_MP3_SLACK_FRAMES = 4 * 1152


def _soundfile():
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover
        raise missing_extra("soundfile", "loading audio") from e
    return soundfile


def _wav_truncation(head: bytes, size: int) -> str | None:
    """For a RIFF/WAVE file: a reason when the declared `data` chunk runs past the end of the file."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(head):
        cid, n = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if cid == b"data":
            if n in (0, 0xFFFFFFFF) or n >= 0x7FFFFFFF:  # streaming writers leave the size unknown
                return None
            avail = size - (pos + 8)
            if n > avail:
                return f"truncated: the data chunk declares {n} bytes, only {avail} are present"
            return None
        pos += 8 + n + (n & 1)
    return None


def resample(x: np.ndarray, orig_sr: int, target_sr: int, length: str = "soxr") -> np.ndarray:
    """Band-limited resampling of a (T,) or (T, C) float32 signal with soxr (HQ).

    length="librosa": the result padded with zeros (or cut) to ceil(T * target_sr / orig_sr)
    samples, as `librosa.resample` (and so `librosa.load(sr=...)`) does; soxr itself may return
    one sample less for odd lengths."""
    if length not in ("soxr", "librosa"):
        raise ValueError(f"length must be 'soxr' or 'librosa', got {length!r}")
    if int(orig_sr) == int(target_sr):
        return x.astype(np.float32, copy=False)
    try:
        import soxr
    except ImportError as e:  # pragma: no cover
        raise missing_extra("soxr", "resampling audio") from e
    y = np.asarray(soxr.resample(x, int(orig_sr), int(target_sr), quality="HQ"), dtype=np.float32)
    if length == "librosa":
        n = int(np.ceil(x.shape[0] * float(target_sr) / int(orig_sr)))
        if len(y) < n:
            y = np.concatenate([y, np.zeros((n - len(y),) + y.shape[1:], dtype=np.float32)])
        y = y[:n]
    return y


def load_audio(src: Source, sample_rate: int, *, name: str | None = None, length: str = "soxr") -> np.ndarray:
    """Decode an audio file to a 1-D float32 mono waveform in [-1, 1] at `sample_rate` Hz.

    `length` chooses the resampled length ("librosa": as `librosa.load`, see `resample`).
    A missing, truncated, undecodable or empty file raises `MediaError` naming it and the reason.
    """
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    sf = _soundfile()
    where = label(src, name)
    with open_binary(src, name) as f:
        start = f.tell()
        head = f.read(1 << 16)
        f.seek(0, 2)
        size = f.tell() - start
        f.seek(start)
        reason = _wav_truncation(head, size)
        if reason:
            raise MediaError(f"{where}: {reason}")
        try:
            with sf.SoundFile(f) as snd:
                declared, sr, fmt = snd.frames, snd.samplerate, snd.format
                data = snd.read(dtype="float32", always_2d=True)
        except Exception as e:  # soundfile.LibsndfileError, RuntimeError, ...
            raise MediaError(f"{where}: not a readable audio file ({type(e).__name__}: {e})") from e
    slack = _MP3_SLACK_FRAMES if (fmt == "MP3" or suffix(src, name) == ".mp3") else 0
    if 0 < declared < (1 << 62) and len(data) < declared - slack:
        raise MediaError(f"{where}: truncated: the header declares {declared} frames, only {len(data)} could be decoded")
    if len(data) == 0:
        raise MediaError(f"{where}: no audio samples")
    if not np.isfinite(data).all():
        raise MediaError(f"{where}: contains NaN or infinite samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(resample(mono, sr, int(sample_rate), length), dtype=np.float32)


def fix_length(x: np.ndarray, n: int, mode: str = "pad", rng: np.random.Generator | None = None) -> np.ndarray:
    """Bring a 1-D waveform to exactly `n` samples the way laion_clap's `get_audio_features` does.

    Longer than `n`: crop a window of `n` samples; from the start, or at a uniformly random offset
    in [0, len - n] when `rng` is given (laion_clap's "rand_trunc" draws it with np.random).
    Shorter than `n`, by `mode`:
      - "pad": zeros appended at the end;
      - "repeatpad": the clip tiled floor(n / len) times, then zeros appended (laion_clap default);
      - "repeat": the clip tiled floor(n / len) + 1 times, cut to n;
      - "crop": never pad; the clip is returned as is (only crops).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"fix_length expects a 1-D waveform, got shape {x.shape}")
    if n <= 0:
        raise ValueError(f"target length must be positive, got {n}")
    if mode not in ("pad", "repeatpad", "repeat", "crop"):
        raise ValueError(f"unknown mode {mode!r}; expected 'pad', 'repeatpad', 'repeat' or 'crop'")
    if len(x) > n:
        start = int(rng.integers(0, len(x) - n + 1)) if rng is not None else 0
        return x[start : start + n].copy()
    if len(x) == n or mode == "crop":
        return x.copy()
    if len(x) == 0:
        raise ValueError("cannot fill an empty waveform")
    if mode == "repeat":
        return np.tile(x, n // len(x) + 1)[:n]
    if mode == "repeatpad":
        x = np.tile(x, n // len(x))
    return np.concatenate([x, np.zeros(n - len(x), dtype=np.float32)])


def int16_roundtrip(x: np.ndarray) -> np.ndarray:
    """laion_clap's quantisation before its audio encoder: clip to [-1, 1], to int16 (x 32767), back."""
    q = (np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / 32767.0).astype(np.float32)
