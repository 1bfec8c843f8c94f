"""CLAP through transformers: registry id "hf-clap:<hub id or local dir>" (e.g. laion/clap-htsat-unfused).

audio: float32 mono at the feature extractor's rate (48 kHz) -> ClapFeatureExtractor's mel
       features with its own truncation ("fusion" / "rand_trunc") and padding ("repeatpad"), one
       item at a time, plus the item's `is_longer` flag.
       Deliberate difference: the extractor, when no clip in a call is longer than 10 s and
       truncation is "fusion", flags one random clip as longer anyway, so a clip's embedding would
       depend on its batch (and a lone short clip is always flagged). pairfree keeps each clip's
       true flag (as laion_clap does). Crops of clips over 10 s are random upstream; `crop_seed`
       (default 0) fixes them per clip, None restores numpy's global RNG.
       Mel features are computed from float64 samples, as the extractor does for a list of clips.
text:  str -> the checkpoint's RoBERTa tokenizer, truncated to `max_text_tokens` (77: the length
       laion_clap trains and embeds with; fewer if the model has fewer positions); `collate` pads
       to the batch's longest with a mask.
Features are `get_audio_features` / `get_text_features`.
Note (DESIGN.md §6): laion/clap-htsat-fused was converted from a different file than the papers'
630k-fusion-best.pt; use "laion-clap:" for the papers' checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pairfree.encoders.base import Encoder
from pairfree.encoders.hf_clip import model_features, pad_token_batch, tokenize_ids
from pairfree.encoders.common import fixed_numpy_seed, import_torchvision, loading, require, torch_dtype

__all__ = ["HFCLAPEncoder", "mel_features"]


def mel_features(feature_extractor: Any, audio: np.ndarray) -> tuple[np.ndarray, bool]:
    """One clip -> (mel features (C, T, F) float32, is_longer), by the extractor's own rules.

    The waveform goes in as float64, as `feature_extractor([clip, ...])` converts a list of clips.
    """
    wave = np.asarray(audio, dtype=np.float64)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"audio item: expected a non-empty 1-D mono waveform, got shape {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError("audio item: the waveform contains NaN or infinite samples")
    if hasattr(feature_extractor, "_get_input_mel"):  # per clip, without the batch-level random flag
        mel, longer = feature_extractor._get_input_mel(
            wave, feature_extractor.nb_max_samples, feature_extractor.truncation, feature_extractor.padding
        )
    else:  # pragma: no cover - transformers without the per-clip helper: upstream's flag as it comes
        out = feature_extractor(wave, sampling_rate=feature_extractor.sampling_rate, return_tensors="np")
        mel, longer = out["input_features"][0], bool(np.asarray(out["is_longer"]).reshape(-1)[0])
    return np.asarray(mel, dtype=np.float32), bool(longer)


class HFCLAPEncoder(Encoder):
    """transformers ClapModel; `from_pretrained` options (revision, cache_dir, ...) pass through."""

    modalities = ("audio", "text")
    sample_rate = 48_000  # the checkpoint's feature extractor's rate once loaded

    def __init__(
        self,
        path_or_id: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "float32",
        max_text_tokens: int = 77,
        crop_seed: int | None = 0,
        **from_pretrained: Any,
    ):
        super().__init__(device=device, dtype=dtype)
        require("transformers", "clap")
        import_torchvision()  # transformers imports torchvision when it is installed
        from transformers import ClapModel, ClapProcessor

        self.path = os.fspath(path_or_id)
        self.id = f"hf-clap:{self.path}"
        self.torch_dtype = torch_dtype(dtype)
        with loading("hf-clap", self.path, os.path.isdir(self.path)):
            model = ClapModel.from_pretrained(self.path, **from_pretrained)
            processor = ClapProcessor.from_pretrained(self.path, **from_pretrained)
        self.model = model.to(device=device, dtype=self.torch_dtype).eval()
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.sample_rate = int(self.feature_extractor.sampling_rate)
        self.dim = int(model.config.projection_dim)
        self.enable_fusion = bool(getattr(model.config.audio_config, "enable_fusion", False))
        self.truncation = self.feature_extractor.truncation
        # RoBERTa positions start after the padding index: n tokens need n + pad_id + 1 positions
        text_cfg = model.config.text_config
        positions = int(text_cfg.max_position_embeddings) - int(text_cfg.pad_token_id or 0) - 1
        self.max_text_tokens = min(int(max_text_tokens), positions)
        self.crop_seed = crop_seed
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 1

    def preprocess(self, modality: str, item: Any) -> Any:
        self.check_modality(modality)
        if modality == "text":
            return tokenize_ids(self.tokenizer, item, self.max_text_tokens)
        with fixed_numpy_seed(self.crop_seed):
            mel, longer = mel_features(self.feature_extractor, item)
        return {"input_features": mel, "is_longer": np.array([longer])}

    def collate(self, modality: str, items: list[Any]) -> Any:
        import torch

        if modality == "text":
            return pad_token_batch(items, self.pad_id)
        return {k: torch.stack([torch.as_tensor(i[k]) for i in items]) for k in ("input_features", "is_longer")}

    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        self.check_modality(modality)
        if modality == "audio":
            out = self.model.get_audio_features(
                input_features=batch["input_features"].to(self.device, self.torch_dtype),
                is_longer=batch["is_longer"].to(self.device),
            )
        else:
            out = self.model.get_text_features(**{k: v.to(self.device) for k, v in batch.items()})
        return model_features(out)
