"""Synthetic toy world: latent concepts rendered into four raw modalities, and three small
contrastive spaces (clip, clap, ulip) really trained on them. It is the measuring instrument for
the pair-free methods when no real pretrained weights or datasets are available (DESIGN.md §8).
"""

from __future__ import annotations

from pairfree.toy.config import PRESETS, ToyWorldConfig
from pairfree.toy.world import PAIRED_KEYS, ToyWorld, make_world

__all__ = ["PAIRED_KEYS", "PRESETS", "ToyWorld", "ToyWorldConfig", "make_world"]
