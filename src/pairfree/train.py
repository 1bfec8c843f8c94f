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
from torch.profiler import record_function

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
    precision: str = "fp32"


from pairfree.memory import COMPUTE_DTYPES, METHODS as AGGREGATIONS  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


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
    precision: str = option("fp32", choices=PRECISIONS, doc="training matmuls: fp32, or bf16 / fp16 autocast "
                            "(fp32 master weights and loss statistics; fp16 on CUDA only, with loss scaling)")
    aggregation: str = option("auto", choices=AGGREGATIONS, doc="memory aggregation: exact, ivf (approximate, "
                              "calibrated), topk, or auto (exact up to 5e10 query x memory pairs, ivf above)")
    aggregation_k: int = option(256, ge=1, doc="neighbours kept by aggregation='topk'")
    aggregation_dtype: str = option("float32", choices=COMPUTE_DTYPES, doc="compute dtype of the aggregation GEMMs "
                                    "(fp32 accumulation either way; ivf takes float32 or bfloat16); auto: "
                                    "bfloat16 where the device has it in hardware (AVX512-BF16 or AMX CPUs, "
                                    "Ampere or newer GPUs), else float32")
    aggregation_max_dropped: float = option(0.01, gt=0, le=0.5, doc="aggregation='ivf': bound on the softmax mass "
                                            "left out, at the 99th percentile of a calibration sample")
    aggregation_min_cosine: float | None = option(None, gt=0, le=1, doc="aggregation='ivf': instead of the mass "
                                                  "bound, the mean cosine to exact the probes must reach (e.g. 0.999)")
    aggregation_select: str = option("lists", choices=("lists", "groups"), doc="aggregation='ivf': scan the "
                                     "nearest lists per query, or share one row selection per group of nearby "
                                     "queries (needs aggregation_min_cosine; 10x faster than lists at 0.999 at paper scale)")
    aggregation_redo: float = option(0.0, ge=0, le=1, doc="aggregation_select=groups: the share of queries of "
                                     "largest estimated error redone exactly after the pass (0.002 on a paper-scale "
                                     "hop: its worst of 2000 check queries 0.937 -> 0.961 for 14 % more time)")
    aggregation_backend: str = option("local", choices=("local", "ray"), doc="run the aggregation here or as "
                                      "Ray tasks over query shards, or with aggregation_select=groups over "
                                      "query blocks and cells (grouping), sample shards (calibration's references) "
                                      "and batches of groups (RAY_ADDRESS, else a local Ray; the same result)")
    pseudo_pairs: str = option("aggregate", choices=("aggregate", "retrieve"), doc="pseudo partners: the "
                               "softmax aggregate of the memory (the papers) or its single nearest item "
                               "(OmniBind's pseudo item pairs)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.aggregation_select == "groups" and self.aggregation_min_cosine is None:
            raise ValueError("aggregation_select='groups' needs aggregation_min_cosine (its calibration target, "
                             "e.g. 0.999)")
        if self.aggregation_redo and self.aggregation_select != "groups":
            raise ValueError(f"aggregation_redo={self.aggregation_redo} needs aggregation_select='groups' (the "
                             "grouped selector's queries are the ones with an error estimate)")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config"):
        return config_from_dict(cls, d, source)

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(self.epochs, self.batch_size, self.lr, self.weight_decay, self.warmup_steps,
                            self.seed, self.device, self.precision)

    def aggregate_kwargs(self, cache_dir=None) -> dict:
        """Keyword arguments of `memory.aggregate` / `cached_aggregate` from these settings."""
        from pairfree.ivf import IVFSettings

        retrieve = self.pseudo_pairs == "retrieve"  # the nearest item: exact top-1
        return {"tau": self.tau1, "method": "topk" if retrieve else self.aggregation,
                "k": 1 if retrieve else self.aggregation_k, "device": self.device,
                "dtype": self.aggregation_dtype, "backend": self.aggregation_backend,
                "ivf": IVFSettings(max_dropped=self.aggregation_max_dropped, min_cosine=self.aggregation_min_cosine,
                                   select=self.aggregation_select, redo=self.aggregation_redo,
                                   cache_dir=None if cache_dir is None else str(cache_dir))}


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


class ConcatRows:
    """Several row-aligned arrays read as one (rows of the first, then the second, ...), never copied.

    The Ex-MCR pool is the passes' outputs next to the memories themselves: at paper scale tens of
    gigabytes of memory-mapped float16, which a concatenation would load whole. Indexing with a batch
    of row numbers reads just those rows (sorted per part, so a memory-mapped file is read forward)."""

    def __init__(self, parts):
        from pairfree.memory import as_tensor

        self.parts = [as_tensor(p) for p in parts]
        widths = {p.shape[1] for p in self.parts}
        if len(widths) != 1:
            raise ValueError(f"ConcatRows: parts have different widths {sorted(widths)}")
        self.bounds = torch.tensor([0] + [p.shape[0] for p in self.parts]).cumsum(0)
        self.shape = (int(self.bounds[-1]), widths.pop())

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        out = torch.empty((len(idx), self.shape[1]), dtype=torch.float32)
        part = torch.bucketize(idx, self.bounds[1:], right=True)
        for i, p in enumerate(self.parts):
            where = torch.nonzero(part == i).squeeze(1)
            if len(where):
                local, order = (idx[where] - self.bounds[i]).sort()
                out[where[order]] = p[local].float()
        return out


def batch_rows(t, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows `idx` of a training tensor (any float dtype, possibly memory-mapped) or ConcatRows, as fp32."""
    return t[idx].to(device=device, dtype=torch.float32, non_blocking=True)


def autocast_context(precision: str, device: torch.device):
    """The autocast context of a training precision (a no-op for fp32)."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (fp16 matmuls are slow on CPU and need loss "
                         "scaling); use 'bf16' on CPU")
    if precision == "bf16":
        from pairfree.devices import warn_if_slow_bf16

        warn_if_slow_bf16(torch.bfloat16, device, "training precision 'bf16'")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def run(
    module: torch.nn.Module,
    data: dict[str, torch.Tensor | ConcatRows],
    step: StepFn,
    settings: LoopSettings,
    *,
    ckpt_dir: str | Path | None = None,
    run_key: str = "",
    desc: str = "train",
    progress: bool = True,
    max_steps: int | None = None,
    on_epoch: Callable[[], dict[str, float]] | None = None,
    select: str | None = None,
) -> list[dict]:
    """Train `module` for settings.epochs over the rows of `data`; returns per-epoch history.

    `max_steps` stops after that many optimizer steps, without a checkpoint (benchmarks measure
    throughput on a slice of a paper-scale epoch with it). `on_epoch()` runs after every epoch with
    the module in eval mode; its numbers (label-free validation scores, `pairfree.selection`) join
    that epoch's history. `select`: one of those numbers; the weights of the epoch where it was
    highest are restored at the end (early stopping by selection; over the epochs run in this
    process when a run is resumed), and that epoch is marked `"selected": True`.

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
    scaler = torch.amp.GradScaler(device.type) if settings.precision == "fp16" else None
    autocast = autocast_context(settings.precision, device)
    start_epoch, history = 0, []
    ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir is not None else None
    if ckpt is not None and ckpt.exists():
        start_epoch, history = load_training_state(ckpt, module, opt, sched, gen, run_key)
    bar = progress_bar(total, desc, progress, unit="step", initial=start_epoch * n_batches)
    steps_done, best = 0, None
    for epoch in range(start_epoch, settings.epochs):
        module.train()
        t0, sums = time.perf_counter(), {}
        for idx in torch.tensor_split(torch.randperm(n, generator=gen), n_batches):
            with record_function("pairfree.batch"):
                b = {k: batch_rows(t, idx, device) for k, t in data.items()}
            with autocast, record_function("pairfree.forward"):
                loss, logs = step(b, gen)
            opt.zero_grad(set_to_none=True)
            with record_function("pairfree.backward"):
                (loss if scaler is None else scaler.scale(loss)).backward()
            with record_function("pairfree.optimizer"):
                if scaler is None:
                    opt.step()
                else:
                    scaler.step(opt)
                    scaler.update()
                sched.step()
            for k, v in {"loss": float(loss.detach()), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v / n_batches
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            steps_done += 1
            if max_steps is not None and steps_done >= max_steps:
                bar.close()
                module.eval()
                return history + [{"epoch": epoch + 1, "steps": steps_done, "partial": True,
                                   **{k: round(v * n_batches / steps_done, 6) for k, v in sums.items()},
                                   "seconds": round(time.perf_counter() - t0, 3)}]
        history.append({"epoch": epoch + 1, **{k: round(v, 6) for k, v in sums.items()},
                        "lr": opt.param_groups[0]["lr"], "seconds": round(time.perf_counter() - t0, 3)})
        if on_epoch is not None:
            module.eval()
            with torch.no_grad():
                history[-1].update({k: round(float(v), 6) for k, v in on_epoch().items()})
            if select is not None:
                if select not in history[-1]:
                    raise ValueError(f"select={select!r} is not among the epoch's scores {sorted(history[-1])}")
                if best is None or history[-1][select] > best[0]:
                    best = (history[-1][select], epoch, {k: v.detach().clone() for k, v in module.state_dict().items()})
        if ckpt is not None:
            save_training_state(ckpt, module, opt, sched, gen, epoch + 1, history, run_key)
    bar.close()
    if best is not None:
        module.load_state_dict(best[2])
        for h in history:
            h.pop("selected", None)
        history[best[1]]["selected"] = True
    module.eval()
    return history
