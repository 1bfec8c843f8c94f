"""Preprocessing profiles: what each encoder is fed, pairfree's way or exactly as the official releases.

The official C-MCR / Ex-MCR trunks (`cmcr/trunks.py`, `exmcr/trunks.py`) feed their encoders:
- images: `PIL.Image.open(f)` as is, then transformers' `CLIPProcessor` (written against
  transformers 4.x, whose CLIP image processor is the PIL one): no EXIF orientation, RGBA and other
  modes through PIL's `convert("RGB")` (alpha dropped, not composited);
- audio: `laion_clap`'s `get_audio_embedding_from_filelist` -> `librosa.load(f, sr=48000)`:
  soxr_hq resampling, then librosa pads the result to ceil(n * 48000 / sr) samples;
- 3D: the Objaverse record's `xyz` (10,000 points) straight into PointBERT: no resampling to 8192
  points, no re-normalisation.

`default` is pairfree's own choice for new data: EXIF orientation applied (phone photos are
stored sideways), transparency composited on white (a transparent background becomes white, not
whatever colour the invisible pixels hold), soxr's own output length, and ULIP's ModelNet40
pipeline for clouds (farthest-point sampling to 8192 points, unit-sphere normalisation), which
accepts clouds of any size and scale. Use `official` to reproduce the released embeddings (e.g.
the official demo's numbers, or an index built with the official code), `default` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Profile:
    name: str
    exif_transpose: bool  # apply the EXIF orientation tag to images
    rgb: str  # "composite" (alpha on white, 16-bit grey rescaled) | "pil" (PIL's convert("RGB"))
    audio_length: str  # "soxr" (resampler's own length) | "librosa" (padded / cut to ceil(n * ratio))
    encoder_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # encoder kind -> options


PROFILES: dict[str, Profile] = {
    "default": Profile("default", exif_transpose=True, rgb="composite", audio_length="soxr"),
    "official": Profile("official", exif_transpose=False, rgb="pil", audio_length="librosa",
                        encoder_options={"ulip2": {"n_points": None, "normalize": False},
                                         "hf-clip": {"image_backend": "pil"}}),
}


def get_profile(profile: str | Profile) -> Profile:
    if isinstance(profile, Profile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown preprocessing profile {profile!r}; choose from {sorted(PROFILES)}")
    return PROFILES[profile]
