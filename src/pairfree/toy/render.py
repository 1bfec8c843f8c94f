"""Raw modalities: FIXED random nonlinear maps from an item's latent view plus nuisance and noise.

Why: each space only ever sees raw vectors, never latents, so its towers must really learn what is
semantic. Each modality gets its own map and nonlinearity, its own nuisance (image: style and
background, text: paraphrase / caption style, audio: recording conditions, 3d: pose / density),
drawn from a few discrete modes plus continuous variation, and its own additive noise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pairfree.toy.concepts import rng_for

MODALITIES = ("image", "text", "audio", "3d")

_ACTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "sin": np.sin,
    "softplus": lambda x: np.logaddexp(0.0, x),
    "abs": np.abs,
    "relu": lambda x: np.maximum(x, 0.0),
}

#: per modality: hidden widths and nonlinearities of its fixed render map (part of FORMAT_VERSION)
RENDER_MAPS: dict[str, list[tuple[int, str]]] = {
    "image": [(160, "tanh"), (160, "relu")],
    "text": [(128, "softplus")],
    "audio": [(160, "sin"), (128, "tanh")],
    "3d": [(128, "abs")],
}


@dataclass
class Renderer:
    """One modality's fixed rendering: latent view + nuisance -> raw vector."""

    modality: str
    visible: np.ndarray  # (d_latent,) how much of each instance-detail dim this modality shows
    styles: np.ndarray  # (n_styles, nuisance_dim) discrete nuisance modes
    templates: np.ndarray  # (n_templates, nuisance_dim) prompt templates (text only; zeros elsewhere)
    layers: list[tuple[np.ndarray, np.ndarray, str]]
    out: np.ndarray
    scale: float  # fixed output scale, calibrated once on a probe batch (rendering is per item)
    nuisance_scale: float
    noise: float
    p_drop: float

    def nuisance(self, n: int, rng: np.random.Generator) -> np.ndarray:
        style = self.styles[rng.integers(len(self.styles), size=n)]
        return self.nuisance_scale * (style + 0.6 * rng.normal(size=style.shape))

    def clean(self, z: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
        h = np.concatenate([z, nuisance], axis=1)
        for w, b, act in self.layers:
            h = _ACTS[act](h @ w + b)
        return (h @ self.out) * self.scale

    def __call__(self, z: np.ndarray, nuisance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = self.clean(z, nuisance)
        return (x + self.noise * rng.normal(size=x.shape)).astype(np.float32)


def make_renderer(modality: str, p: dict[str, Any], seed: int) -> Renderer:
    rng = rng_for(seed, f"render/{modality}")
    d, k = p["d_latent"], p["nuisance_dim"][modality]
    visible = rng.uniform(0.2, 1.0, size=d)
    styles = rng.normal(size=(p["n_styles"], k))
    templates = rng.normal(size=(p["n_templates"], k))
    layers, width = [], d + k
    for hidden, act in RENDER_MAPS[modality]:
        w = rng.normal(size=(width, hidden)) / np.sqrt(width) * (1.0 if act == "sin" else 1.3)
        layers.append((w, rng.normal(size=hidden) * 0.3, act))
        width = hidden
    out = rng.normal(size=(width, p["raw_dim"][modality])) / np.sqrt(width)
    r = Renderer(
        modality,
        visible,
        styles,
        templates,
        layers,
        out,
        1.0,
        float(p["nuisance_scale"][modality]),
        float(p["noise"][modality]),
        float(p["p_drop_secondary"][modality]),
    )
    spread = float(np.hypot(p["group_scale"], p["offset_scale"]))
    probe = rng.normal(size=(2048, d)) * spread
    r.scale = 1.0 / float(r.clean(probe, r.nuisance(2048, rng)).std() + 1e-12)
    return r
