"""Small dual encoders, really trained with symmetric InfoNCE (CLIP recipe, learnable temperature).

Why train rather than construct: the modality gap, the imperfect alignment and the non-linear
relation between two spaces' text towers then arise the way they do in real CLIP / CLAP, instead of
being written in by hand.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Tower(nn.Module):
    """Standardise raw input (fixed stats, like image preprocessing), MLP, LayerNorm, bias-free projection, L2-normalise.

    The LayerNorm + bias-free projection head is CLIP's (`ln_post`, `proj`); it also means the
    embedding cone a tower starts in cannot be moved by a single output bias.
    """

    def __init__(self, d_in: int, hidden: list[int], act: str, d_out: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in))
        self.register_buffer("std", torch.ones(d_in))
        layers: list[nn.Module] = []
        width = d_in
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTS[act]()]
            width = h
        layers += [nn.LayerNorm(width), nn.Linear(width, d_out, bias=False)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net((x - self.mean) / self.std), dim=-1)


def make_tower(spec: dict[str, Any], d_in: int, d_out: int, seed: int) -> Tower:
    """Seeded init without touching the caller's global torch RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Tower(d_in, list(spec["hidden"]), spec["act"], d_out)


def train_dual(
    towers: tuple[Tower, Tower],
    data: tuple[np.ndarray, np.ndarray],
    epochs: int,
    p: dict[str, Any],
    seed: int,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """Symmetric InfoNCE over in-batch negatives, AdamW, cosine decay; returns final loss / temperature."""
    from pairfree.progress import progress as progress_bar

    a_raw, b_raw = (torch.from_numpy(np.ascontiguousarray(x)) for x in data)
    for tower, raw in zip(towers, (a_raw, b_raw)):
        tower.mean.copy_(raw.mean(0))
        tower.std.copy_(raw.std(0) + 1e-6)
    log_scale = nn.Parameter(torch.tensor(math.log(1.0 / p["init_temperature"])))
    params = [*towers[0].parameters(), *towers[1].parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=p["weight_decay"])
    n, bs = a_raw.shape[0], p["batch_size"]
    steps_per_epoch = n // bs
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(bs)
    ema = None
    for t in towers:
        t.train()
    with progress_bar(total, desc, progress, unit="step") as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(steps_per_epoch):
                idx = order[s * bs : (s + 1) * bs]
                za, zb = towers[0](a_raw[idx]), towers[1](b_raw[idx])
                logits = log_scale.clamp(max=math.log(100.0)).exp() * za @ zb.T
                loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
                bar.update(1)
                if s % 20 == 0:
                    bar.set_postfix(loss=f"{ema:.3f}")
    for t in towers:
        t.eval()
    temp = 1.0 / float(log_scale.detach().clamp(max=math.log(100.0)).exp())
    return {"final_loss": float(ema or 0.0), "temperature": temp, "steps": total}


@torch.no_grad()
def encode(tower: Tower, raw: np.ndarray, batch: int = 8192) -> np.ndarray:
    """Unit float32 rows; eval mode, fixed batching so the result is reproducible."""
    out = [tower(torch.from_numpy(np.ascontiguousarray(raw[i : i + batch]))) for i in range(0, len(raw), batch)]
    x = torch.cat(out).numpy().astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
