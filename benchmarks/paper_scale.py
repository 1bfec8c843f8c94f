"""Paper scale on this machine: the papers' corpus sizes, their pseudo data and their training batch.

    python benchmarks/paper_scale.py [--world DIR] [--preset paper|mini] [--stages world,cmcr,exmcr,train]
                                     [--sample 4000] [--train-steps 150] [--out runs/bench/paper_scale]

Stages, each in its own subprocess (so each peak memory is its own):
- world: the scale world (`pairfree.toy.scale`: 2.31M texts in two towers, 1.3M images in two towers,
  1.8M audio, 0.8M point clouds, d = 512, float16 memory-mapped), its build time and statistics;
- cmcr: C-MCR's pseudo pairs (CLIP texts -> CLIP images, CLAP texts -> CLAP audio);
- exmcr: the three modality-centric passes of the CLAP leaf of Ex-MCR (six aggregation hops);
- train: Ex-MCR training on that leaf's 5.41M-tuple pool (memory-mapped, gathered per batch) at batch
  4096, fp32 and bf16 autocast, for --train-steps steps of an epoch; FLOPs per step counted by
  torch's FlopCounterMode, as a ratio to the GEMM rate of the same dtype measured in the same run.

The aggregation runs with method "auto" (= "ivf" at these sizes); every hop reports the dropped
softmax mass and the cosine to the exact aggregation on half of --sample queries (the other half
calibrates the probes). Peak memory: the process's peak anonymous RSS (sampled; file-backed pages of
the memory-mapped inputs are the page cache, not the process's) and VmHWM (all resident pages).
Output: one JSON per stage, summary.json, and markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

STAGES = ("world", "cmcr", "exmcr", "train")


class PeakMemory:
    """Peak anonymous RSS of this process, sampled every 50 ms."""

    def __init__(self) -> None:
        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.status().get("RssAnon", 0))
            time.sleep(0.05)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.status().get("RssAnon", 0))

    def summary(self) -> dict[str, float]:
        return {"peak_anon_rss_gib": round(self.peak / 2**30, 2), "vm_hwm_gib": round(self.status()["VmHWM"] / 2**30, 2)}


def gemm_rate(dtype, n: int = 4096, k: int = 512, m: int = 4096, reps: int = 10) -> float:
    """Best GFLOP/s over a sweep of the GEMM shapes training and aggregation issue."""
    import torch

    best = 0.0
    for a_rows, inner, b_rows in ((n, k, m), (n, k, 2 * k), (n, 2 * k, k), (2048, k, 32768)):
        a, b = torch.randn(a_rows, inner, dtype=dtype), torch.randn(b_rows, inner, dtype=dtype)
        a @ b.T
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b.T
        best = max(best, 2 * a_rows * inner * b_rows * reps / (time.perf_counter() - t0) / 1e9)
    return best


def stage_world(args) -> dict:
    from pairfree.toy.scale import ScaleWorldConfig, build

    t0 = time.perf_counter()
    folder = build(args.world, ScaleWorldConfig(preset=args.preset), progress=True)
    info = json.loads((folder / "world.json").read_text())
    if "realism" not in info:  # built without statistics earlier
        from pairfree.fileio import write_json
        from pairfree.toy.scale import realism

        info["realism"] = realism(folder)
        write_json(folder / "world.json", info)
    size = sum(f.stat().st_size for f in folder.rglob("*.npy"))
    return {"seconds": round(time.perf_counter() - t0, 1), "build_seconds": info.get("build_seconds"),
            "sizes": info["sizes"], "disk_gib": round(size / 2**30, 2), "realism": info.get("realism")}


def _hops(reports: dict) -> list[dict]:
    rows = []
    for hop, r in reports.items():
        sec = r.get("seconds", {})
        rows.append({"hop": hop, "method": r.get("method"), "queries": r.get("queries"), "memory": r.get("memory"),
                     "lists": r.get("lists"), "probes": r.get("probes"), "work_fraction": r.get("work_fraction"),
                     "dropped_mass": r.get("dropped_mass"), "cosine_to_exact": r.get("cosine_to_exact"),
                     "seconds": sec, "total_s": round(sum(sec.values()), 1) if sec else None})
    return rows


def _ivf(args):
    from pairfree.ivf import IVFSettings

    return IVFSettings(sample=args.sample, cache_dir=str(Path(args.cache)))


def stage_cmcr(args) -> dict:
    from pairfree.memory import cached_aggregate
    from pairfree.toy.scale import load

    w = load(args.world)
    reports, t0 = {}, time.perf_counter()
    for space, (q_mod, m_mod) in (("clip", ("text", "image")), ("clap", ("text", "audio"))):
        sp = w["spaces"][space]
        rep: dict = {}
        cached_aggregate(Path(args.cache) / "cmcr", sp[q_mod], sp[m_mod], method="auto", ivf=_ivf(args), report=rep,
                         progress=f"C-MCR {space} {q_mod}->{m_mod}")
        reports[f"{space}: {q_mod}->{m_mod}"] = rep
    return {"seconds": round(time.perf_counter() - t0, 1), "hops": _hops(reports)}


def _roles(w):
    from pairfree.extend import Roles

    return Roles.of(w["spaces"]["clip"], w["spaces"]["clap"], "text", "clap")


def stage_exmcr(args) -> dict:
    from pairfree.extend import PASSES, cached_pass
    from pairfree.toy.scale import load

    w = load(args.world)
    roles = _roles(w)
    out, t_all = {}, time.perf_counter()
    for name in PASSES:
        reports: dict = {}
        t0 = time.perf_counter()
        pool = cached_pass(Path(args.cache) / "exmcr", roles, name, method="auto", ivf=_ivf(args), reports=reports,
                           progress=True)
        out[name] = {"seconds": round(time.perf_counter() - t0, 1), "rows": int(pool["c"].shape[0]),
                     "hops": _hops(reports)}
    return {"seconds": round(time.perf_counter() - t_all, 1), "passes": out}


def stage_train(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop

    from pairfree import train
    from pairfree.extend import PASSES, ROLES, ExMCRConfig, DecoupledProjector, cached_pass, make_step
    from pairfree.toy.scale import load

    w = load(args.world)
    roles = _roles(w)
    pools = [cached_pass(Path(args.cache) / "exmcr", roles, p, method="auto", ivf=_ivf(args)) for p in PASSES]
    data = {r: train.ConcatRows([p[r] for p in pools]) for r in ROLES}
    rows = len(data["c"])
    result = {"pool_rows": rows, "batch": 4096, "steps_per_epoch": -(-rows // 4096), "precisions": {}}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg = ExMCRConfig(precision=precision, epochs=1)
        head = DecoupledProjector(512, 512)
        step = make_step(head, cfg)
        batch = {r: train.batch_rows(data[r], torch.arange(4096) * (rows // 4096), torch.device("cpu")) for r in ROLES}
        gen = torch.Generator().manual_seed(0)
        # in-place addmm_ (the InfoNCE backward accumulates with it) is not in torch's table
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as fc:
            with train.autocast_context(precision, torch.device("cpu")):
                loss, _ = step(batch, gen)
            loss.backward()
        flops = fc.get_total_flops()
        rate = gemm_rate(dtype)
        t0 = time.perf_counter()
        history = train.run(head, data, step, cfg.loop_settings(), progress=True, max_steps=args.train_steps,
                            desc=f"Ex-MCR train {precision}")
        dt = time.perf_counter() - t0
        s_per_step = dt / args.train_steps
        achieved = flops / s_per_step / 1e9
        result["precisions"][precision] = {
            "steps": args.train_steps, "seconds": round(dt, 1), "s_per_step": round(s_per_step, 3),
            "tuples_per_s": round(4096 / s_per_step), "flops_per_step": flops, "achieved_gflops": round(achieved, 1),
            "gemm_gflops": round(rate, 1), "ratio_to_gemm": round(achieved / rate, 3),
            "epoch_minutes": round(s_per_step * result["steps_per_epoch"] / 60, 1),
            "paper_schedule_hours": round(s_per_step * result["steps_per_epoch"] * 36 / 3600, 1),
            "loss": history[-1].get("loss")}
    return result


def run_stage(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = {"world": stage_world, "cmcr": stage_cmcr, "exmcr": stage_exmcr, "train": stage_train}[name](args)
    result.update({"stage": name, "wall_s": round(time.perf_counter() - t0, 1), **mem.summary(),
                   "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")})
    return result


def tables(summary: dict) -> str:
    lines = []
    hop_rows = []
    for stage in ("cmcr", "exmcr"):
        r = summary.get(stage)
        if not r:
            continue
        groups = [("C-MCR", r["hops"])] if stage == "cmcr" else [(f"Ex-MCR {p}", v["hops"]) for p, v in r["passes"].items()]
        for label, hops in groups:
            for h in hops:
                if h["method"] != "ivf":
                    hop_rows.append(f"| {label}: {h['hop']} | {h['queries']:,} x {h['memory']:,} | {h['method']} | "
                                    "100 % | 1 | 0 | - |")
                    continue
                hop_rows.append(
                    f"| {label}: {h['hop']} | {h['queries']:,} x {h['memory']:,} | {h['probes']}/{h['lists']} | "
                    f"{100 * h['work_fraction']:.2f} % | {h['cosine_to_exact']['mean']:.5f} / "
                    f"{h['cosine_to_exact']['p1']:.4f} | {h['dropped_mass']['mean']:.4f} / {h['dropped_mass']['p99']:.4f} | "
                    f"{h['total_s']} |")
    if hop_rows:
        lines += ["| hop | queries x memory | probes / lists | work vs exact | cos to exact mean / p1 | "
                  "dropped mass mean / p99 | s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |", *hop_rows, ""]
    stage_rows = []
    for stage in STAGES:
        r = summary.get(stage)
        if r:
            stage_rows.append(f"| {stage} | {r['wall_s']} | {r['peak_anon_rss_gib']} | {r['vm_hwm_gib']} |")
    if stage_rows:
        lines += ["| stage | wall s | peak anon RSS GiB | VmHWM GiB |", "| --- | ---: | ---: | ---: |", *stage_rows, ""]
    tr = summary.get("train")
    if tr:
        lines += ["| training | s / step | tuples / s | GFLOP/s | GEMM GFLOP/s | ratio | epoch min | 36 epochs h |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for p, v in tr["precisions"].items():
            lines.append(f"| {p} | {v['s_per_step']} | {v['tuples_per_s']:,} | {v['achieved_gflops']} | "
                         f"{v['gemm_gflops']} | {v['ratio_to_gemm']} | {v['epoch_minutes']} | {v['paper_schedule_hours']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", default=None, help="scale world folder (default: the user cache)")
    p.add_argument("--preset", default="paper", choices=["paper", "mini"])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--sample", type=int, default=3000,
                   help="queries with an exact reference per hop (1000 calibrate the probes, the rest check)")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, help="pseudo-data cache (default: next to the world)")
    p.add_argument("--out", default="runs/bench/paper_scale")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.world is None:
        from pairfree.fileio import user_cache_dir

        args.world = str(user_cache_dir("scale", args.preset))
    args.cache = args.cache or str(Path(args.world).parent / f"{Path(args.world).name}-pools")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:  # inside the subprocess of one stage
        result = run_stage(args.stage, args)
        (out / f"{args.stage}.json").write_text(json.dumps(result, indent=1) + "\n")
        return
    summary = {}
    for name in args.stages.split(","):
        cmd = [sys.executable, __file__, "--stage", name] + [a for a in sys.argv[1:]]
        print(f"== {name}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PAIRFREE_PROGRESS": os.environ.get("PAIRFREE_PROGRESS", "")})
        summary[name] = json.loads((out / f"{name}.json").read_text())
    for name in STAGES:
        if name not in summary and (out / f"{name}.json").exists():
            summary[name] = json.loads((out / f"{name}.json").read_text())
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(tables(summary))


if __name__ == "__main__":
    main()
