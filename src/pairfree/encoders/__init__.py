"""Pretrained encoders behind one contract (see `base.Encoder`); heavy libraries load lazily."""

from pairfree.encoders.base import MODALITIES, Encoder

__all__ = ["Encoder", "MODALITIES"]
