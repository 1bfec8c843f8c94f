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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from pairfree.config import check_fields, option
from pairfree.config import from_dict as config_from_dict
from pairfree.fileio import atomic_path
from pairfree.progress import progress as progress_bar

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


AGGREGATIONS = ("exact", "topk")


@dataclass
class TrainConfig:
    """Optimisation and aggregation fields shared by CMCRConfig and ExMCRConfig (paper defaults)."""

    epochs: int = option(36, ge=1)
    batch_size: int = option(4096, ge=2)
    lr: float = option(1e-3, gt=0)
    weight_decay: float = option(0.01, ge=0)
    warmup_steps: int = option(0, ge=0)
    seed: int = option(0, ge=0)
    device: str = option("cpu", doc="torch device: cpu, cuda, cuda:1, mps")
    aggregation: str = option("exact", choices=AGGREGATIONS, doc="memory aggregation")
    aggregation_k: int = option(256, ge=1, doc="neighbours kept by aggregation='topk'")

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        return config_from_dict(cls, d, source)

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
        "threads": torch.get_num_threads(),
        "param_groups": opt_state["param_groups"],
        "sched_last_epoch": sched.last_epoch,
    }
    return tensors, {"pairfree_train": json.dumps(meta)}


def save_training_state(path: Path, module, opt, sched, gen, epoch, history, run_key) -> None:
    tensors, meta = _pack_state(module, opt, sched, gen, epoch, history, run_key)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def checkpoint_meta(path: Path) -> dict:
    """The JSON header of a training checkpoint; ValueError naming the file when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["pairfree_train"])
        for key, typ in (("epoch", int), ("history", list), ("run_key", str), ("param_groups", list),
                         ("sched_last_epoch", int)):
            if not isinstance(meta.get(key), typ):
                raise ValueError(f"field {key!r} missing or not {typ.__name__}")
    except Exception as e:  # corrupt, truncated or foreign file
        raise ValueError(f"cannot resume from {path}: not a pairfree training checkpoint ({e})") from None
    return meta


def check_resume(ckpt_dir: str | Path | None, run_key: str) -> None:
    """Raise before anything is touched when `ckpt_dir` holds a checkpoint another run wrote: other
    data or settings, or another CPU thread count (which changes float rounding, so a resumed run
    would no longer equal an uninterrupted one)."""
    if ckpt_dir is None or not (Path(ckpt_dir) / CKPT_NAME).exists():
        return
    path = Path(ckpt_dir) / CKPT_NAME
    meta = checkpoint_meta(path)
    if meta["run_key"] != run_key:
        raise ValueError(
            f"cannot resume from {path}: it was written for different data or settings "
            f"(run key {meta['run_key'][:12]} != {run_key[:12]}); use a new output folder or --restart"
        )
    threads = meta.get("threads")
    if threads is not None and threads != torch.get_num_threads():
        raise ValueError(
            f"cannot resume from {path}: it was written with {threads} CPU threads and this process uses "
            f"{torch.get_num_threads()}; results would differ from an uninterrupted run. Pass --threads {threads} "
            f"(or set OMP_NUM_THREADS={threads}), or --restart"
        )


def load_training_state(path: Path, module, opt, sched, gen, run_key: str) -> tuple[int, list]:
    check_resume(path.parent, run_key)
    meta = checkpoint_meta(path)
    try:
        tensors = load_file(str(path))
        module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, name = k.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        gen.set_state(tensors["rng"])
    except Exception as e:  # a tampered or damaged checkpoint: shapes, keys, RNG state
        raise ValueError(f"cannot resume from {path}: the checkpoint does not fit this model "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    sched.last_epoch = meta["sched_last_epoch"]
    sched._last_lr = [g["lr"] for g in opt.param_groups]
    return int(meta["epoch"]), list(meta["history"])


def start_run(checkpoints: dict[Path | None, str], restart: bool = False,
              on_start: Callable[[], None] | None = None) -> None:
    """What a fit does once its inputs are validated and before it writes anything: refuse a
    checkpoint of another run (unless `restart`), call `on_start` (the CLI writes config.yaml
    there), then forget the previous training state when restarting.
    `checkpoints`: {checkpoint folder or None: run key}."""
    if not restart:
        for ckpt_dir, key in checkpoints.items():
            check_resume(ckpt_dir, key)
    if on_start is not None:
        on_start()
    if restart:
        for ckpt_dir in checkpoints:
            if ckpt_dir is not None and (Path(ckpt_dir) / CKPT_NAME).exists():
                (Path(ckpt_dir) / CKPT_NAME).unlink()


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
    bar = progress_bar(total, desc, progress, unit="step", initial=start_epoch * n_batches)
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
