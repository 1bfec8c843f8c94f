"""OpenCLIP: registry id "open_clip:<model>/<pretrained tag or path to weights>".

Examples: "open_clip:ViT-B-32/openai" (the papers' CLIP ViT-B/32), "open_clip:ViT-B-32//data/w.pt"
(weights file), "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K" and
"open_clip:local-dir:/models/clip" (open_clip's own schemas carry their weights: no "/pretrained").
A bare "<model>" builds the architecture with random weights.

image: PIL RGB -> open_clip's validation transform for the model -> (3, H, W).
text:  str -> open_clip's tokenizer for the model -> (context_length,) int64, already padded.
Features are `encode_image` / `encode_text` (unnormalised; the base `encode` normalises).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pairfree.encoders.base import Encoder
from pairfree.encoders.hf_clip import as_rgb
from pairfree.encoders.common import import_torchvision, loading, require, torch_dtype

__all__ = ["OpenCLIPEncoder", "split_model_pretrained"]

_SCHEMAS = ("hf-hub:", "local-dir:")


def split_model_pretrained(rest: str) -> tuple[str, str | None]:
    """'<model>/<pretrained>' -> (model, pretrained); schema names (hf-hub:, local-dir:) keep their '/'."""
    if rest.startswith(_SCHEMAS):
        return rest, None
    model, _, pretrained = rest.partition("/")
    if not model:
        raise ValueError(f"open_clip spec needs '<model>/<pretrained>', got {rest!r}")
    return model, pretrained or None


class OpenCLIPEncoder(Encoder):
    """An open_clip model; `create_options` go to `open_clip.create_model_and_transforms`."""

    modalities = ("image", "text")

    def __init__(self, spec: str, device: str = "cpu", dtype: str = "float32", **create_options: Any):
        super().__init__(device=device, dtype=dtype)
        import_torchvision()
        open_clip = require("open_clip", "clip")

        self.model_name, self.pretrained = split_model_pretrained(spec)
        self.id = f"open_clip:{spec}"
        self.torch_dtype = torch_dtype(dtype)
        local = self.pretrained is None and not self.model_name.startswith("hf-hub:") or (
            self.pretrained is not None and os.path.isfile(self.pretrained))
        with loading("open_clip", spec, local):
            model, _, self.transform = open_clip.create_model_and_transforms(
                self.model_name, pretrained=self.pretrained, device="cpu", **create_options
            )
        self.model = model.to(device=device, dtype=self.torch_dtype).eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        config = open_clip.get_model_config(self.model_name) or {}
        self.dim = int(config.get("embed_dim") or model.visual.output_dim)

    def preprocess(self, modality: str, item: Any) -> Any:
        self.check_modality(modality)
        if modality == "image":
            return np.asarray(self.transform(as_rgb(item)), dtype=np.float32)
        if not isinstance(item, str):
            raise TypeError(f"text item: expected a str, got {type(item).__name__}")
        return np.asarray(self.tokenizer([item])[0], dtype=np.int64)

    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        self.check_modality(modality)
        if modality == "image":
            return self.model.encode_image(batch.to(self.device, self.torch_dtype))
        return self.model.encode_text(batch.to(self.device))
