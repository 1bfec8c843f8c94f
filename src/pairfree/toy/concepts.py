"""Latent concepts, their uneven coverage per corpus, and items that mix concepts.

Why this shape: real corpora are long-tailed and biased by modality (AudioSet has no chairs,
Objaverse few animals), and real items show more than one thing. Coverage differences between a
space's pretraining data and the memories are part of what a pair-free method has to survive.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np


def rng_for(seed: int, tag: str) -> np.random.Generator:
    """Independent, stable stream per (world seed, purpose) so adding a stream never shifts others."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(tag.encode())]))


@dataclass
class Concepts:
    """Concept latents plus per-concept traits that drive coverage."""

    mu: np.ndarray  # (n_concepts, d_latent) float64
    group: np.ndarray  # (n_concepts,) int64
    popularity: np.ndarray  # (n_concepts,) sums to 1, Zipf-like over a random order
    sound: np.ndarray  # (n_concepts,) in (0, 1): how sound-bearing a concept is
    shape: np.ndarray  # (n_concepts,) in (0, 1): how much a concept is a 3d object
    silent: np.ndarray  # (n_concepts,) bool: never in the audio memory
    shapeless: np.ndarray  # (n_concepts,) bool: never in the 3d memory

    @property
    def n(self) -> int:
        return int(self.mu.shape[0])

    @property
    def names(self) -> list[str]:
        width = max(3, len(str(self.n - 1)))
        return [f"c{i:0{width}d}" for i in range(self.n)]


def _trait(rng: np.random.Generator, mu: np.ndarray, sharpness: float = 1.5) -> np.ndarray:
    """A semantically smooth trait: sigmoid of a random direction, so whole groups share it."""
    direction = rng.normal(size=mu.shape[1])
    score = (mu - mu.mean(0)) @ direction / np.sqrt(mu.shape[1])
    score = score / (score.std() + 1e-12)
    return 1.0 / (1.0 + np.exp(-sharpness * score + 0.3 * rng.normal(size=len(score))))


def make_concepts(p: dict[str, Any], seed: int) -> Concepts:
    rng = rng_for(seed, "concepts")
    n, g, d = p["n_concepts"], p["n_groups"], p["d_latent"]
    centres = rng.normal(size=(g, d)) * p["group_scale"]
    group = rng.permutation(np.arange(n) % g)
    mu = centres[group] + p["offset_scale"] * rng.normal(size=(n, d))
    ranks = rng.permutation(n)
    popularity = (1.0 + ranks) ** -p["zipf"]
    popularity /= popularity.sum()
    sound, shape = _trait(rng, mu), _trait(rng, mu)
    n_silent = max(1, round(p["frac_silent"] * n))
    n_shapeless = max(1, round(p["frac_shapeless"] * n))
    silent = np.zeros(n, bool)
    silent[np.argsort(sound)[:n_silent]] = True
    shapeless = np.zeros(n, bool)
    shapeless[np.argsort(shape)[:n_shapeless]] = True
    return Concepts(mu, group.astype(np.int64), popularity, sound, shape, silent, shapeless)


def _norm(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def distributions(c: Concepts, clap_like_clip: float = 0.0) -> dict[str, np.ndarray]:
    """Primary-concept distribution of every corpus. Only test / train_pairs are uniform.

    `clap_like_clip` in [0, 1] mixes CLIP's pretraining distribution into CLAP's (1: both text towers
    learn from the same concept distribution; the world variant "similar-text")."""
    uniform = np.full(c.n, 1.0 / c.n)
    pop = c.popularity
    clip_pre = _norm(0.9 * _norm(pop**0.8) + 0.1 * uniform)
    clap_pre = _norm(pop**0.5 * c.sound**2 + 0.002 / c.n)  # sound-bearing concepts dominate
    clap_pre = _norm((1 - clap_like_clip) * clap_pre + clap_like_clip * clip_pre)
    ulip_pre = _norm(c.shape**2 + 0.002 / c.n)  # object-like concepts dominate
    audio = _norm(pop**0.5 * c.sound**1.5 * ~c.silent)
    shape3d = _norm(c.shape * ~c.shapeless)
    return {
        "pretrain/clip": clip_pre,
        "pretrain/clap": clap_pre,
        "pretrain/ulip": ulip_pre,
        "memory/text": _norm(0.55 * clip_pre + 0.45 * clap_pre),  # image captions + audio captions
        "memory/image": _norm(0.7 * uniform + 0.3 * pop),  # ImageNet-like, fairly balanced
        "memory/audio": audio,
        "memory/3d": shape3d,
        "test": uniform,
        "train_pairs": uniform,
    }


@dataclass
class Items:
    """Sampled items: what each rendering of an item may show."""

    primary: np.ndarray  # (n,) int64
    secondary: np.ndarray  # (n,) int64, -1 when the item shows one concept
    weight: np.ndarray  # (n,) weight of the secondary concept (0 when none)
    jitter: np.ndarray  # (n, d_latent) instance detail

    def __len__(self) -> int:
        return int(self.primary.shape[0])


def sample_items(c: Concepts, probs: np.ndarray, n: int, p: dict[str, Any], rng: np.random.Generator) -> Items:
    primary = rng.choice(c.n, size=n, p=probs)
    has2 = rng.random(n) < p["p_secondary"]
    same = rng.random(n) < p["p_secondary_same_group"]
    other = rng.choice(c.n, size=n, p=probs)
    # a same-group partner: a random member of the primary's group
    members = [np.flatnonzero(c.group == g) for g in range(int(c.group.max()) + 1)]
    pick = rng.random(n)
    same_group = np.array([members[c.group[i]][int(u * len(members[c.group[i]]))] for i, u in zip(primary, pick)])
    secondary = np.where(same, same_group, other)
    has2 &= secondary != primary
    lo, hi = p["secondary_weight"]
    weight = np.where(has2, rng.uniform(lo, hi, n), 0.0)
    secondary = np.where(has2, secondary, -1)
    jitter = p["item_jitter"] * rng.normal(size=(n, c.mu.shape[1]))
    return Items(primary.astype(np.int64), secondary.astype(np.int64), weight, jitter)


def view(c: Concepts, items: Items, visible: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """Latent one modality shows: the mix (secondary maybe dropped) plus the visible part of the detail."""
    w = np.where(drop, 0.0, items.weight)[:, None]
    sec = c.mu[np.maximum(items.secondary, 0)]
    return (1.0 - w) * c.mu[items.primary] + w * sec + items.jitter * visible
