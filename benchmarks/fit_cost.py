"""Why an Ex-MCR leaf costs more than a C-MCR fit on the same spaces: the time broken down.

    python benchmarks/fit_cost.py [--preset demo] [--epochs 30] [--batch-size 4096] [--out runs/bench]

Both fit the demo toy world's CLAP space to its CLIP space through texts (Ex-MCR: CLIP as the base,
CLAP as the one leaf), same epochs and batch, no pseudo-data cache (the aggregation is timed too).
Reported per method: aggregation seconds (C-MCR: the two semantic-consistency hops; Ex-MCR: the three
passes' hops), training rows per epoch, optimizer steps and seconds per step. Ratios of the two
methods are machine-independent.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    from pairfree.connect import CMCR, CMCRConfig
    from pairfree.extend import ExMCR, ExMCRConfig
    from pairfree.fileio import user_cache_dir
    from pairfree.toy import ToyWorldConfig, make_world

    world = make_world(ToyWorldConfig(seed=0, preset=args.preset), cache_dir=user_cache_dir("toy"), progress=False)
    clip, clap = world.spaces["clip"], world.spaces["clap"]
    sched = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0}
    result: dict = {"preset": args.preset, "schedule": sched, "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    cm = CMCR(CMCRConfig(**sched))
    cm.pseudo_pairs(clip, clap, "text", progress=False)
    agg = time.perf_counter() - t0
    t0 = time.perf_counter()
    CMCR(CMCRConfig(**sched)).fit(clip, clap, "text", progress=False)
    total = time.perf_counter() - t0
    rows = clip.count("text")
    steps = args.epochs * math.ceil(rows / args.batch_size)
    result["cmcr"] = {"total_s": round(total, 1), "aggregation_s": round(agg, 1), "rows_per_epoch": rows, "steps": steps,
                      "s_per_step": round((total - agg) / steps, 3)}
    print(f"C-MCR: {result['cmcr']}", flush=True)

    t0 = time.perf_counter()
    ex = ExMCR(ExMCRConfig(**sched)).fit(clip, {"clap": (clap, "text")}, progress=False)
    total = time.perf_counter() - t0
    agg = ex.timings["clap/aggregation_s"]
    rows = ex.timings["clap/pool_rows"]
    steps = args.epochs * math.ceil(rows / args.batch_size)
    result["exmcr"] = {"total_s": round(total, 1), "aggregation_s": round(agg, 1), "rows_per_epoch": rows,
                       "steps": steps, "s_per_step": round((total - agg) / steps, 3)}
    print(f"Ex-MCR: {result['exmcr']}", flush=True)
    c, e = result["cmcr"], result["exmcr"]
    result["ratios"] = {"total": round(e["total_s"] / c["total_s"], 2), "steps": round(e["steps"] / c["steps"], 2),
                        "s_per_step": round(e["s_per_step"] / c["s_per_step"], 2),
                        "aggregation": round(e["aggregation_s"] / max(c["aggregation_s"], 1e-9), 2)}
    print("\n| | C-MCR | Ex-MCR | ratio |\n| --- | ---: | ---: | ---: |")
    for key, label in (("total_s", "fit, s"), ("aggregation_s", "aggregation, s"), ("rows_per_epoch", "rows per epoch"),
                       ("steps", "optimizer steps"), ("s_per_step", "s per step")):
        print(f"| {label} | {c[key]} | {e[key]} | {e[key] / max(c[key], 1e-9):.2f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fit_cost.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
