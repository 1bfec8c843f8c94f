"""The one small contract every encoder follows (CLIP_benchmark style).

Items per modality (what the media loaders in `pairfree.media` return):
  image -> PIL.Image in RGB; text -> str; audio -> 1-D float32 numpy array at `sample_rate`;
  3d -> (N, 3) float32 numpy array of xyz points.

`preprocess` runs on the CPU, may run in DataLoader worker processes and must return picklable
data; `forward` runs the model on a collated batch. `encode` does all of it and returns
L2-normalised float32 numpy rows.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import numpy as np

MODALITIES = ("image", "text", "audio", "3d")


class Encoder(abc.ABC):
    """A pretrained contrastive model's encoders for the modalities it covers."""

    #: registry id it was loaded from, e.g. "hf-clip:openai/clip-vit-base-patch32"
    id: str = ""
    #: modalities it embeds, a subset of MODALITIES
    modalities: tuple[str, ...] = ()
    #: output embedding dimension
    dim: int = 0
    #: audio sample rate the model expects (audio encoders only)
    sample_rate: int | None = None

    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        self.device = device
        self.dtype = dtype

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"encoder {self.id!r} embeds {list(self.modalities)}, not {modality!r}")

    @abc.abstractmethod
    def preprocess(self, modality: str, item: Any) -> Any:
        """CPU-side transform of one raw item into model input (picklable)."""

    def collate(self, modality: str, items: list[Any]) -> Any:
        """Batch preprocessed items; default stacks tensors."""
        import torch

        return torch.stack([torch.as_tensor(i) for i in items])

    @abc.abstractmethod
    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        """Unnormalised features (B, dim) for a collated batch."""

    def encode(self, modality: str, items: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """L2-normalised float32 embeddings (len(items), dim)."""
        import torch
        import torch.nn.functional as F

        self.check_modality(modality)
        out = []
        with torch.inference_mode():
            for start in range(0, len(items), batch_size):
                batch = self.collate(modality, [self.preprocess(modality, i) for i in items[start : start + batch_size]])
                z = self.forward(modality, batch)
                out.append(F.normalize(z.float(), dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)
