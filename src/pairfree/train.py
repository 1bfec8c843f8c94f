"""The training loop shared by C-MCR and Ex-MCR.

Inputs are precomputed embedding tensors (rows aligned across keys); only projectors learn, so a run
is cheap and is made exactly reproducible: one seeded generator drives shuffling and noise, and the
per-epoch checkpoint stores model, optimiser, schedule and generator state in ONE safetensors file
(written atomically), so a resumed run continues bit-for-bit where the crashed one stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pairfree.fileio import atomic_path

StepFn = Callable[[dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, dict[str, float]]]
CKPT_NAME = "last.safetensors"


@dataclass
class LoopSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    seed: int
    device: str = "cpu"


@dataclass
class TrainConfig:
    """Optimisation and aggregation fields shared by CMCRConfig and ExMCRConfig (paper defaults)."""

    epochs: int = 36
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 0
    seed: int = 0
    device: str = "cpu"
    aggregation: str = "exact"  # "exact" | "topk"
    aggregation_k: int = 256

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.aggregation not in ("exact", "topk"):
            raise ValueError(f"{name}.aggregation must be 'exact' or 'topk', got {self.aggregation!r}")
        for field in ("lr", "epochs", "batch_size", "aggregation_k"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{name}.{field} must be > 0, got {getattr(self, field)}")
        for field in ("weight_decay", "warmup_steps"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.batch_size, self.lr, self.weight_decay, self.warmup_steps,
                            self.seed, self.device)


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero over `total` steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _pack_state(module, opt, sched, gen, epoch: int, history: list, run_key: str) -> tuple[dict, dict]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for name, val in st.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(val).detach().cpu().contiguous()
    tensors["rng"] = gen.get_state()
    meta = {
        "epoch": epoch,
        "history": history,
        "run_key": run_key,
        "param_groups": opt_state["param_groups"],
        "sched_last_epoch": sched.last_epoch,
    }
    return tensors, {"pairfree_train": json.dumps(meta)}


def save_training_state(path: Path, module, opt, sched, gen, epoch, history, run_key) -> None:
    tensors, meta = _pack_state(module, opt, sched, gen, epoch, history, run_key)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_training_state(path: Path, module, opt, sched, gen, run_key: str) -> tuple[int, list]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["pairfree_train"])
        tensors = load_file(str(path))
    except Exception as e:  # corrupt or foreign file
        raise ValueError(f"cannot resume from {path}: not a pairfree training checkpoint ({e})") from e
    if meta["run_key"] != run_key:
        raise ValueError(
            f"cannot resume from {path}: it was written for different data or settings "
            f"(run key {meta['run_key'][:12]} != {run_key[:12]}); use a new output folder or --restart"
        )
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.last_epoch = meta["sched_last_epoch"]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    gen.set_state(tensors["rng"])
    return int(meta["epoch"]), list(meta["history"])


def run(
    module: torch.nn.Module,
    data: dict[str, torch.Tensor],
    step: StepFn,
    settings: LoopSettings,
    *,
    ckpt_dir: str | Path | None = None,
    run_key: str = "",
    desc: str = "train",
    progress: bool = True,
) -> list[dict]:
    """Train `module` for settings.epochs over the rows of `data`; returns per-epoch history.

    `step(batch, generator)` returns (loss, logs). With ckpt_dir set, state is saved after every
    epoch and an existing checkpoint there (with the same run_key) is resumed.
    """
    n = next(iter(data.values())).shape[0]
    if any(t.shape[0] != n for t in data.values()):
        raise ValueError(f"training tensors have different row counts: { {k: t.shape[0] for k, t in data.items()} }")
    if n < 2:
        raise ValueError(f"need at least 2 training rows for contrastive training, got {n}")
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    module.to(device)
    batch = min(settings.batch_size, n)
    n_batches = math.ceil(n / batch)
    total = settings.epochs * n_batches
    opt = torch.optim.AdamW(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total, settings.warmup_steps))
    gen = torch.Generator().manual_seed(settings.seed)
    start_epoch, history = 0, []
    ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir is not None else None
    if ckpt is not None and ckpt.exists():
        start_epoch, history = load_training_state(ckpt, module, opt, sched, gen, run_key)
    bar = tqdm(total=total, initial=start_epoch * n_batches, desc=desc, disable=not progress, leave=False)
    for epoch in range(start_epoch, settings.epochs):
        module.train()
        t0, sums = time.perf_counter(), {}
        for idx in torch.tensor_split(torch.randperm(n, generator=gen), n_batches):
            b = {k: t[idx].to(device, non_blocking=True) for k, t in data.items()}
            loss, logs = step(b, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v / n_batches
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
        history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in sums.items()},
                        "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)})
        if ckpt is not None:
            save_training_state(ckpt, module, opt, sched, gen, epoch + 1, history, run_key)
    bar.close()
    module.eval()
    return history
