"""Toy-world configuration: presets are plain data, any field given explicitly overrides its preset.

Sizes live in `PRESETS`; everything else (render noise, coverage skew, tower shapes) is shared by
all presets in `COMMON`, so "small" is the same world as "demo", only smaller and trained shorter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

#: bump when the generator changes in a way that changes the arrays: invalidates caches
FORMAT_VERSION = 1

#: (space, modality) tower shapes. Every tower differs: width, depth, nonlinearity, init seed.
#: Output dims differ per space (clip 64, clap 48, ulip 56) so dimension handling is exercised.
TOWERS: dict[str, dict[str, Any]] = {
    "clip/image": {"hidden": [256, 256], "act": "gelu"},
    "clip/text": {"hidden": [192], "act": "relu"},
    "clap/text": {"hidden": [256, 128], "act": "tanh"},
    "clap/audio": {"hidden": [256, 256], "act": "silu"},
    "ulip/image": {"hidden": [192, 192], "act": "relu"},
    "ulip/3d": {"hidden": [256], "act": "gelu"},
}

SPACE_MODALITIES: dict[str, tuple[str, str]] = {
    "clip": ("image", "text"),
    "clap": ("text", "audio"),
    "ulip": ("image", "3d"),
}

COMMON: dict[str, Any] = {
    # latent concept structure
    "d_latent": 32,
    "group_scale": 1.0,  # spread of group centres
    "offset_scale": 0.55,  # spread of concepts around their group centre
    "item_jitter": 0.45,  # instance-level detail shared by all renderings of one item
    "p_secondary": 0.4,  # probability an item also shows a second concept
    "secondary_weight": [0.15, 0.4],
    "p_secondary_same_group": 0.5,
    # raw modalities: dims, nuisance dims / strength, additive noise, chance a rendering omits the secondary concept
    "raw_dim": {"image": 96, "text": 64, "audio": 80, "3d": 72},
    "nuisance_dim": {"image": 16, "text": 8, "audio": 12, "3d": 8},
    "nuisance_scale": {"image": 1.0, "text": 0.7, "audio": 1.0, "3d": 0.8},
    "noise": {"image": 0.25, "text": 0.18, "audio": 0.3, "3d": 0.25},
    "p_drop_secondary": {"image": 0.1, "text": 0.3, "audio": 0.3, "3d": 0.5},
    "n_styles": 16,  # discrete nuisance modes (backgrounds, recording rooms, caption styles, scan rigs)
    # uneven concept coverage
    "zipf": 0.8,  # popularity exponent
    "frac_silent": 0.04,  # concepts with no audio in the audio memory
    "frac_shapeless": 0.04,  # concepts with no 3d in the 3d memory
    # spaces
    "space_dim": {"clip": 64, "clap": 48, "ulip": 56},
    "towers": TOWERS,
    "lr": 2e-3,
    "weight_decay": 0.01,
    "batch_size": 512,
    "init_temperature": 0.015,  # learnable; near where CLIP's ends up. Low temperature keeps the modality gap
    "n_templates": 8,
}

#: parameters a variant may set that are not in COMMON (absent = the default world, so adding one does
#: not change the cache key of the existing worlds)
EXTRA_KEYS: dict[str, Any] = {"clap_pretrain_like_clip": 0.0}

#: world variants for the method comparison (docs/methods.md): one property changed at a time
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    # the modality gap: CLIP's initial temperature (0.07) instead of 0.015 lets the towers close most of it
    "small-gap": {"init_temperature": 0.07},
    # the two text towers: same architecture, same width, same pretraining concept distribution
    "similar-text": {"towers": {"clap/text": {"hidden": [192], "act": "relu"}}, "space_dim": {"clap": 64},
                     "clap_pretrain_like_clip": 1.0},
    # concept coverage: uniform popularity, every concept has audio and 3D
    "even-coverage": {"zipf": 0.0, "frac_silent": 0.0, "frac_shapeless": 0.0},
}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {
        "n_concepts": 300,
        "n_groups": 30,
        "n_text": 20000,
        "n_image": 10000,
        "n_audio": 10000,
        "n_3d": 6000,
        "n_test": 1000,
        "n_train_pairs": 10000,  # as many true pairs as the image and audio memories have items
        "pretrain_pairs": {"clip": 40000, "clap": 25000, "ulip": 20000},
        "pretrain_epochs": {"clip": 12, "clap": 12, "ulip": 20},
    },
    "small": {
        "n_concepts": 100,
        "n_groups": 10,
        "n_text": 4000,
        "n_image": 2500,
        "n_audio": 2500,
        "n_3d": 2000,
        "n_test": 400,
        "n_train_pairs": 2500,
        "pretrain_pairs": {"clip": 8000, "clap": 6000, "ulip": 5000},
        "pretrain_epochs": {"clip": 12, "clap": 14, "ulip": 24},
    },
}


@dataclass(frozen=True)
class ToyWorldConfig:
    """Which toy world to build. Fields left as None take their value from `preset` (then COMMON)."""

    seed: int = 0
    preset: str = "demo"
    n_concepts: int | None = None
    n_groups: int | None = None
    n_text: int | None = None
    n_image: int | None = None
    n_audio: int | None = None
    n_3d: int | None = None
    n_test: int | None = None
    n_train_pairs: int | None = None
    n_templates: int | None = None
    pretrain_pairs: dict[str, int] | None = None
    pretrain_epochs: dict[str, int] | None = None
    batch_size: int | None = None
    lr: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # any COMMON key, e.g. {"noise": {...}}

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"ToyWorldConfig.preset: unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        unknown = set(self.overrides) - set(COMMON) - set(PRESETS[self.preset]) - set(EXTRA_KEYS)
        if unknown:
            raise ValueError(f"ToyWorldConfig.overrides: unknown keys {sorted(unknown)}; known: {sorted(COMMON)}")

    def resolved(self) -> dict[str, Any]:
        """Every parameter of the world: COMMON, then the preset, then overrides, then explicit fields.

        Dict-valued parameters merge key by key, so `pretrain_epochs={"ulip": 40}` changes ulip only.
        """
        out: dict[str, Any] = json.loads(json.dumps({**COMMON, **PRESETS[self.preset]}))  # deep copy
        explicit = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "overrides"}
        for layer in (self.overrides, {k: v for k, v in explicit.items() if v is not None}):
            for key, value in json.loads(json.dumps(layer)).items():
                if isinstance(out.get(key), dict) and isinstance(value, dict):
                    out[key] = {**out[key], **value}
                else:
                    out[key] = value
        return out

    def key(self) -> str:
        """Cache key: a hash of the resolved parameters and the generator version."""
        blob = json.dumps({"version": FORMAT_VERSION, **self.resolved()}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
