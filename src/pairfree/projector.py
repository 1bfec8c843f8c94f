"""Projector heads. Module names follow the official releases so their state dicts load as is.

- `mlp2` (C-MCR CLAP-CLIP, and each Ex-MCR f_m block): net1 = [Linear(d_in, h), BN, ReLU],
  net2 = [Linear(h, d_out), BN]; no residual despite upstream's `res_expansion` name.
- `mlp1` (C-MCR ULIP-CLIP): net = [Linear(d_in, d_out), BN, ReLU]; outputs are non-negative.
"""

from __future__ import annotations

import torch
from torch import nn

PRESETS = ("mlp1", "mlp2")
INIT_MODES = ("default", "xavier", "eye")
BN_MODES = ("joint", "separate")
#: largest embedding dimension a saved model may declare (checked before anything is allocated)
MAX_DIM = 65536


class MLP2(nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.net1 = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.net2 = nn.Sequential(nn.Linear(hidden, d_out), nn.BatchNorm1d(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net2(self.net1(x))


class MLP1(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_head(preset: str, d_in: int, d_out: int, hidden_mult: float = 2.0) -> nn.Module:
    """A C-MCR projector head of one of the official presets."""
    if preset == "mlp2":
        return MLP2(d_in, d_out, int(round(hidden_mult * d_in)))
    if preset == "mlp1":
        return MLP1(d_in, d_out)
    raise ValueError(f"unknown projector preset {preset!r}; choose one of {PRESETS}")


def init_weights(module: nn.Module, mode: str) -> None:
    """Upstream's init modes: 'xavier' (Xavier-uniform weights, zero bias), 'eye' (identity-like), 'default'."""
    if mode == "default":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if mode == "xavier":
                nn.init.xavier_uniform_(layer.weight)
            elif mode == "eye":
                nn.init.eye_(layer.weight)
            else:
                raise ValueError(f"unknown init mode {mode!r}; choose 'default', 'xavier' or 'eye'")
            nn.init.zeros_(layer.bias)
