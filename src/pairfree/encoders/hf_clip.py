"""CLIP through transformers: registry id "hf-clip:<hub id or local dir>" (e.g. openai/clip-vit-base-patch32).

image: PIL RGB -> the checkpoint's CLIPImageProcessor (resize, centre crop, normalise) -> (3, H, W).
text:  str -> the checkpoint's tokenizer, truncated to the text model's positions (77 for CLIP);
       `collate` pads to the batch's longest with the tokenizer's pad id plus an attention mask,
       exactly as `processor(text=..., padding=True)` does, so a batch costs its longest text
       rather than 77 tokens.
Features are `get_image_features` / `get_text_features` (the projected embeddings).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pairfree.encoders.base import Encoder
from pairfree.encoders.common import import_torchvision, loading, require, torch_dtype

__all__ = ["HFCLIPEncoder", "model_features", "pad_token_batch", "tokenize_ids"]


def model_features(out: Any) -> "torch.Tensor":  # noqa: F821
    """The (B, dim) tensor from `get_*_features`, across transformers versions.

    Why: transformers 4.x returns the projected features as a tensor; 5.x returns an output object
    whose `pooler_output` holds them (CLIP: projected; CLAP: projected and already L2-normalised,
    which the base `encode` normalising again leaves unchanged).
    """
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = out.get("pooler_output") if hasattr(out, "get") else getattr(out, "pooler_output", None)
    if pooled is None and isinstance(out, (tuple, list)) and len(out) > 1:
        pooled = out[1]  # return_dict=False: (last_hidden_state, pooler_output, ...)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find the features in a {type(out).__name__} returned by transformers")
    return pooled


def tokenize_ids(tokenizer: Any, text: str, max_length: int) -> np.ndarray:
    """One text -> int64 token ids with the tokenizer's special tokens, at most `max_length` long."""
    if not isinstance(text, str):
        raise TypeError(f"text item: expected a str, got {type(text).__name__}")
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def pad_token_batch(items: list[np.ndarray], pad_id: int) -> dict[str, "torch.Tensor"]:  # noqa: F821
    """Right-pad token id rows to the longest with `pad_id`; attention mask 1 on real tokens."""
    import torch

    n = max(len(i) for i in items)
    ids = torch.full((len(items), n), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for row, item in enumerate(items):
        ids[row, : len(item)] = torch.as_tensor(item, dtype=torch.long)
        mask[row, : len(item)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pil_image_processor(path: str, from_pretrained: dict) -> Any:
    """The checkpoint's CLIP image processor on the PIL backend: what transformers 4.x used by
    default, and so what the official C-MCR / Ex-MCR code computed (transformers 5 defaults to a
    torchvision backend whose resizing differs by up to ~0.015 in normalised pixel values)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(path, backend="pil", **from_pretrained)
    return AutoImageProcessor.from_pretrained(path, use_fast=False, **from_pretrained)  # 4.x: the "slow" one


def as_rgb(image: Any) -> Any:
    if not hasattr(image, "convert"):
        raise TypeError(f"image item: expected a PIL image, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class HFCLIPEncoder(Encoder):
    """transformers CLIPModel; `from_pretrained` options (revision, cache_dir, ...) pass through."""

    modalities = ("image", "text")

    def __init__(self, path_or_id: str | os.PathLike, device: str = "cpu", dtype: str = "float32",
                 image_backend: str | None = None, **from_pretrained: Any):
        super().__init__(device=device, dtype=dtype)
        require("transformers", "clip")
        import_torchvision()  # transformers' image processors import torchvision when it is installed
        from transformers import CLIPModel, CLIPProcessor

        self.path = os.fspath(path_or_id)
        self.id = f"hf-clip:{self.path}"
        self.torch_dtype = torch_dtype(dtype)
        if image_backend not in (None, "pil"):
            raise ValueError(f"image_backend must be None (the checkpoint's processor) or 'pil', got {image_backend!r}")
        with loading("hf-clip", self.path, os.path.isdir(self.path)):
            model = CLIPModel.from_pretrained(self.path, **from_pretrained)
            processor = CLIPProcessor.from_pretrained(self.path, **from_pretrained)
            image_processor = processor.image_processor
            if image_backend == "pil":
                image_processor = pil_image_processor(self.path, from_pretrained)
        self.model = model.to(device=device, dtype=self.torch_dtype).eval()
        self.tokenizer = processor.tokenizer
        self.image_processor = image_processor
        self.dim = int(model.config.projection_dim)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def preprocess(self, modality: str, item: Any) -> Any:
        self.check_modality(modality)
        if modality == "image":
            pixels = self.image_processor(images=as_rgb(item), return_tensors="np")["pixel_values"][0]
            return np.asarray(pixels, dtype=np.float32)
        return tokenize_ids(self.tokenizer, item, self.context_length)

    def collate(self, modality: str, items: list[Any]) -> Any:
        if modality == "text":
            return pad_token_batch(items, self.pad_id)
        return super().collate(modality, items)

    def patch_embeddings(self, image: Any) -> np.ndarray:
        """(g, g, dim) CLIP-space embeddings of the image's patch tokens, for localization maps.

        The whole image is resized to the model's input size without cropping (boxes are given over
        the whole frame), the patch tokens of the last layer go through `post_layernorm` and
        `visual_projection` as the class token does for the image embedding (the MaskCLIP reading of
        dense CLIP features)."""
        import torch
        from PIL import Image

        size = int(self.model.config.vision_config.image_size)
        patch = int(self.model.config.vision_config.patch_size)
        img = as_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
        mean = np.asarray(self.image_processor.image_mean, np.float32)
        std = np.asarray(self.image_processor.image_std, np.float32)
        x = (np.asarray(img, np.float32) / 255.0 - mean) / std
        pixels = torch.from_numpy(x.transpose(2, 0, 1)[None].copy()).to(self.device, self.torch_dtype)
        with torch.inference_mode():
            vision = self.model.vision_model
            tokens = vision(pixel_values=pixels).last_hidden_state[:, 1:, :]
            z = self.model.visual_projection(vision.post_layernorm(tokens))
        g = size // patch
        return z.float().cpu().numpy().reshape(g, g, -1)

    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        self.check_modality(modality)
        if modality == "image":
            out = self.model.get_image_features(pixel_values=batch.to(self.device, self.torch_dtype))
        else:
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()})
        return model_features(out)
