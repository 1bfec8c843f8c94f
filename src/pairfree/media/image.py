"""Images -> RGB `PIL.Image` (the item type of the image modality)."""

from __future__ import annotations

import numpy as np

from pairfree.media._common import MediaError, Source, label, missing_extra, open_binary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - Pillow ships with the [media] extra
        raise missing_extra("Pillow", "loading images") from e
    return Image, ImageOps


def to_rgb(im, where: str = "image"):
    """Any Pillow mode -> RGB. Transparency is composited on white; 16/32-bit grey is rescaled to 8 bit."""
    Image, _ = _pil()
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info) or (
        mode in ("L", "RGB") and "transparency" in im.info
    ):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        elif mode == "I":
            a = a / 257.0 if a.max(initial=0) > 255 else a
        else:  # float images: [0, 1] or [0, 255]
            a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(f"{where}: cannot convert Pillow mode {mode!r} to RGB ({e})") from e


def load_image(src: Source, *, name: str | None = None, exif_transpose: bool = True, rgb: str = "composite"):
    """Decode an image file (any Pillow format) into an RGB `PIL.Image`.

    Defaults: EXIF orientation is applied; RGBA / LA / palette-with-transparency are composited on
    white; greyscale, palette, CMYK and 16-bit images become RGB. `exif_transpose=False,
    rgb="pil"` reproduces `Image.open(f).convert("RGB")` (what the official MCR trunks feed CLIP;
    see `pairfree.media.profiles`). Multi-frame files give their first frame. A missing, truncated
    or undecodable file raises `MediaError` naming it and the reason.
    """
    if rgb not in ("composite", "pil"):
        raise ValueError(f"rgb must be 'composite' or 'pil', got {rgb!r}")
    Image, ImageOps = _pil()
    where = label(src, name)
    with open_binary(src, name) as f:
        try:
            im = Image.open(f)
            im.load()  # decode now, while the file is open: truncation errors surface here
        except Image.DecompressionBombError as e:
            raise MediaError(f"{where}: image too large ({e})") from e
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            raise MediaError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e
    if exif_transpose:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a malformed EXIF block must not lose an otherwise valid image
            pass
    if rgb == "pil":
        try:
            out = im if im.mode == "RGB" else im.convert("RGB")
        except (ValueError, OSError) as e:
            raise MediaError(f"{where}: cannot convert Pillow mode {im.mode!r} to RGB ({e})") from e
    else:
        out = to_rgb(im, where)
    if out.width == 0 or out.height == 0:
        raise MediaError(f"{where}: empty image ({out.width}x{out.height})")
    return out
