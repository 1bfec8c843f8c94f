"""Loading media into the item types of `pairfree.encoders.base.Encoder`.

  image -> RGB `PIL.Image` (`load_image`); audio -> mono float32 at a sample rate (`load_audio`,
  `fix_length`, `int16_roundtrip`); 3d -> (N, 3) float32 xyz (`load_points`, and the Objaverse
  record format via `load_objaverse_record` / `records_to_space`); text -> list[str] (`load_texts`).

Every loader accepts a path, raw bytes or a binary file object (`name=` names in-memory data in
messages and gives its extension) and raises `MediaError` (a ValueError) naming the file and the
reason. Pickled `.npy` data is read by `safe_pickle`, which never executes pickle code. Heavy
libraries (Pillow, soundfile, soxr, pandas, pyarrow, trimesh) are imported on first use.
"""

from pairfree.media._common import MediaError, Source
from pairfree.media.audio import AUDIO_EXTENSIONS, fix_length, int16_roundtrip, load_audio, resample
from pairfree.media.image import IMAGE_EXTENSIONS, load_image, to_rgb
from pairfree.media.objaverse import load_objaverse_record, record_feature, records_to_space
from pairfree.media.points import POINT_EXTENSIONS, load_points, sample_points, sample_surface
from pairfree.media.profiles import PROFILES, Profile, get_profile
from pairfree.media.safe_pickle import UnsafePickleError, load_npy
from pairfree.media.texts import TEXT_EXTENSIONS, load_texts

#: file extensions that count as inputs of each modality when scanning folders
EXTENSIONS = {"image": IMAGE_EXTENSIONS, "audio": AUDIO_EXTENSIONS, "3d": POINT_EXTENSIONS, "text": TEXT_EXTENSIONS}


def load(modality: str, src: Source, *, sample_rate: int | None = None, n_points: int | None = None,
         name: str | None = None, profile: str | Profile = "default"):
    """The item of one file for a non-text modality (image, audio, 3d), loaded as `profile` says
    (`pairfree.media.profiles`: "default" or "official")."""
    p = get_profile(profile)
    if modality == "image":
        return load_image(src, name=name, exif_transpose=p.exif_transpose, rgb=p.rgb)
    if modality == "audio":
        if sample_rate is None:
            raise ValueError("loading audio needs the encoder's sample_rate")
        return load_audio(src, sample_rate, name=name, length=p.audio_length)
    if modality == "3d":
        return load_points(src, n_points, name=name)
    raise ValueError(f"no per-file loader for modality {modality!r}; texts come from load_texts")


__all__ = [
    "MediaError", "UnsafePickleError", "Source", "EXTENSIONS", "load", "PROFILES", "Profile", "get_profile",
    "load_image", "to_rgb", "IMAGE_EXTENSIONS",
    "load_audio", "resample", "fix_length", "int16_roundtrip", "AUDIO_EXTENSIONS",
    "load_points", "sample_points", "sample_surface", "POINT_EXTENSIONS",
    "load_npy", "load_objaverse_record", "record_feature", "records_to_space",
    "load_texts", "TEXT_EXTENSIONS",
]
