"""Contrastive and intra-space alignment terms shared by C-MCR and Ex-MCR."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives; row i of a and b is the positive pair."""
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def squared_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared L2 distance between matched rows (C-MCR's intra-MCR term)."""
    return (a - b).pow(2).sum(dim=-1).mean()


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean (non-squared) L2 distance between matched rows (Ex-MCR's L_intra, as printed)."""
    return (a - b).norm(dim=-1).mean()


def add_noise(x: torch.Tensor, variance: float, generator: torch.Generator | None) -> torch.Tensor:
    """Semantic completion: Gaussian noise of the given per-dimension variance, then re-normalise."""
    if variance <= 0:
        return x
    # drawn on the generator's device (CPU) so runs are reproducible on any compute device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return F.normalize(x + noise * variance**0.5, dim=-1)
