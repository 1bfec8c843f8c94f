"""ULIP-2 PointBERT behind the `Encoder` contract: registry id "ulip2:<path to pointbert_ULIP-2.pt>".

Modalities "3d", "image" and "text" in ULIP-2's 512-d space. The model itself (architecture,
safe strict loading of the official file) is `pairfree.encoders.pointbert`.

Preprocessing (CPU side, picklable numpy outputs):

- 3d: an (N, 3) array of xyz points -> (n_points, 3) float32, following ULIP's ModelNet40 pipeline
  (`farthest_point_sample` down to `npoints`, then `pc_normalize`):
    1. resample to `n_points` (default 8192, ULIP-2 PointBERT's input size) when N differs:
       N > n_points: farthest point sampling starting from point index 0 (deterministic; ULIP's
       numpy FPS starts from a random point), or with `resample="random"` a subset drawn by a
       fixed-seed generator (cheaper: FPS costs O(N * n_points));
       N < n_points: the points are repeated in order (index i -> i mod N), which adds only
       duplicates: the model's FPS and max-pooling see the same shape.
       `n_points=None` keeps the cloud as it is (a batch then needs clouds of equal size).
    2. with `normalize=True` (default), ULIP's `pc_normalize`: subtract the centroid (mean of the
       points), divide by the largest distance to it (the cloud then fits the unit sphere). The
       statistics are taken from the distinct points: after FPS down-sampling (as ULIP), before
       repeat-padding. A cloud whose points all coincide is only centred.
  Note: the official C-MCR/Ex-MCR demo feeds the Objaverse records' 10,000 points to the model as
  they are (no resampling, no normalisation; those records are already centred on their bounding
  box and scaled to the unit sphere); `n_points=None, normalize=False` reproduces that input.
- image: a PIL image -> (3, 224, 224) float32: RGB, shorter side resized to 224 (bilinear, as
  torchvision's `Resize(224)` on PIL images), centre crop 224, /255, ImageNet mean/std: ULIP's and
  SLIP's validation transform, computed with PIL + numpy so torchvision is not needed.
- text: a str -> (77,) int64 CLIP BPE ids from open_clip's tokenizer (`pairfree[ulip]`).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Any

import numpy as np

from pairfree.encoders.base import Encoder

__all__ = ["ULIP2Encoder", "pc_normalize", "preprocess_image", "preprocess_points", "tokenize"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
DEFAULT_N_POINTS = 8192
_RANDOM_SUBSET_SEED = 0
_EXTRA = "pip install 'pairfree[ulip]'"


def pc_normalize(points: np.ndarray) -> np.ndarray:
    """ULIP's `pc_normalize`: centre on the centroid, scale the farthest point to distance 1."""
    p = np.asarray(points, dtype=np.float64)
    p = p - p.mean(axis=0)
    radius = float(np.sqrt((p**2).sum(axis=1)).max()) if len(p) else 0.0
    if radius > 0:
        p = p / radius
    return p.astype(np.float32)


def _fps_indices(points: np.ndarray, n: int) -> np.ndarray:
    import torch

    from pairfree.encoders.pointbert import farthest_point_sample

    with torch.inference_mode():
        return farthest_point_sample(torch.from_numpy(points)[None], n)[0].numpy()


def preprocess_points(
    points: Any,
    n_points: int | None = DEFAULT_N_POINTS,
    normalize: bool = True,
    resample: str = "fps",
) -> np.ndarray:
    """(N, 3) xyz -> (n_points, 3) float32, deterministic (see the module docstring)."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"3d item: expected an (N, 3) array of xyz points, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"3d item: expected numeric xyz points, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    n = len(arr)
    if n == 0:
        raise ValueError("3d item: the point cloud is empty")
    if not np.isfinite(arr).all():
        raise ValueError("3d item: the point cloud holds NaN or infinite coordinates")
    if resample not in ("fps", "random"):
        raise ValueError(f"resample must be 'fps' or 'random', got {resample!r}")
    if n_points is not None and n_points < 1:
        raise ValueError(f"n_points must be positive or None, got {n_points}")
    if n_points is not None and n > n_points:
        if resample == "fps":
            idx = _fps_indices(arr, n_points)
        else:
            idx = np.sort(np.random.default_rng(_RANDOM_SUBSET_SEED).choice(n, n_points, replace=False))
        arr = arr[idx]
    if normalize:
        arr = pc_normalize(arr)
    if n_points is not None and n < n_points:
        arr = arr[np.arange(n_points) % n]
    return np.ascontiguousarray(arr, dtype=np.float32)


def preprocess_image(image: Any, size: int = 224) -> np.ndarray:
    """PIL image -> (3, size, size) float32: Resize(size) bilinear, CenterCrop(size), ImageNet mean/std."""
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow comes with the media extra
        raise ImportError(f"ULIP-2 image preprocessing needs Pillow: {_EXTRA} (or pairfree[media])") from e
    if not isinstance(image, Image.Image):
        raise TypeError(f"image item: expected a PIL.Image, got {type(image).__name__}")
    img = image.convert("RGB")
    w, h = img.size
    if w <= h:  # torchvision: the shorter side becomes `size`, the longer int(size * long / short)
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    top, left = round((nh - size) / 2.0), round((nw - size) / 2.0)
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _clip_tokenizer() -> Any:
    """open_clip's `tokenize(texts, context_length)` (CLIP's BPE, the ids of ULIP/SLIP's tokenizer)."""
    try:
        from open_clip.tokenizer import tokenize as clip_tokenize

        return clip_tokenize
    except ImportError as e:
        if importlib.util.find_spec("open_clip") is None:
            raise ImportError(f"ULIP-2 text encoding uses open_clip's CLIP tokenizer: {_EXTRA}") from e
        first_error: Exception = e
    except Exception as e:  # open_clip is installed but its package fails to import (e.g. a torchvision
        first_error = e  # build that does not match torch): its tokenizer module stands alone
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = os.path.join(locations[0], "tokenizer.py") if locations else ""
    try:
        mod_spec = importlib.util.spec_from_file_location("_pairfree_open_clip_tokenizer", path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module
        mod_spec.loader.exec_module(module)
        return module.tokenize
    except Exception as e:
        sys.modules.pop("_pairfree_open_clip_tokenizer", None)
        raise ImportError(
            f"ULIP-2 text encoding uses open_clip's CLIP tokenizer, which failed to import "
            f"({type(first_error).__name__}: {first_error}); {_EXTRA}"
        ) from e


def tokenize(text: str, context_length: int = 77) -> np.ndarray:
    """CLIP BPE ids (context_length,) int64: <start> ids <end>, zero-padded; over-long texts are cut
    and end with <end> (open_clip's rule; ULIP's own tokenizer cut without keeping <end>)."""
    if not isinstance(text, str):
        raise TypeError(f"text item: expected a str, got {type(text).__name__}")
    ids = _clip_tokenizer()([text], context_length=context_length)[0]
    return np.asarray(ids.numpy() if hasattr(ids, "numpy") else ids, dtype=np.int64)


class ULIP2Encoder(Encoder):
    """ULIP-2 PointBERT (point cloud, image, text towers) from an official-layout checkpoint file.

    `n_points`, `normalize` and `resample` set the 3d preprocessing (module docstring);
    `model_overrides` are `ULIP2Config` fields the file cannot tell (head counts, group count/size).
    """

    modalities = ("3d", "image", "text")

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "float32",
        n_points: int | None = DEFAULT_N_POINTS,
        normalize: bool = True,
        resample: str = "fps",
        **model_overrides: int,
    ):
        super().__init__(device=device, dtype=dtype)
        import torch

        from pairfree.encoders.pointbert import load_ulip2

        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        if resample not in ("fps", "random"):
            raise ValueError(f"resample must be 'fps' or 'random', got {resample!r}")
        if n_points is not None and n_points < 1:
            raise ValueError(f"n_points must be positive or None, got {n_points}")
        self.path = os.fspath(path)
        self.id = f"ulip2:{self.path}"
        self.torch_dtype = dtypes[dtype]
        self.model = load_ulip2(self.path, device=device, dtype=self.torch_dtype, **model_overrides)
        self.config = self.model.config
        self.dim = int(self.model.pc_projection.shape[1])
        self.n_points = n_points
        self.normalize = normalize
        self.resample = resample

    def preprocess(self, modality: str, item: Any) -> Any:
        self.check_modality(modality)
        if modality == "3d":
            return preprocess_points(item, self.n_points, self.normalize, self.resample)
        if modality == "image":
            return preprocess_image(item, self.config.image_size)
        return tokenize(item, self.config.context_length)

    def collate(self, modality: str, items: list[Any]) -> Any:
        if modality == "3d":
            shapes = {tuple(np.shape(i)) for i in items}
            if len(shapes) > 1:
                raise ValueError(
                    f"encoder {self.id!r}: a 3d batch needs clouds of one size, got shapes {sorted(shapes)[:4]}; "
                    "set n_points (resampling) or use batch_size=1"
                )
        return super().collate(modality, items)

    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        import torch

        self.check_modality(modality)
        batch = torch.as_tensor(batch).to(self.device)
        if modality == "3d":
            return self.model.encode_pc(batch.float())
        if modality == "image":
            return self.model.encode_image(batch.to(self.torch_dtype))
        return self.model.encode_text(batch.long())
