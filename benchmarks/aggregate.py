"""Memory aggregation: achieved GFLOP/s as a ratio to torch.matmul, and peak memory vs query count.

    python benchmarks/aggregate.py [--memory 50000] [--dim 512] [--device cpu|cuda] [--out runs/bench]

Counted work: 4·N·M·d flops (scores q·Mᵀ and weighted sum p·M). The matmul reference times the same
GEMM shapes the aggregation issues per block, in the same run, so the ratio is machine-independent.
Peak memory is measured in a fresh subprocess per query count (CPU: peak RSS above the inputs and
output; CUDA: max_memory_allocated above them) and must stay flat as N grows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pairfree.memory import aggregate


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_gflops(qc: int, mc: int, d: int, device: str, reps: int = 5) -> float:
    a = torch.randn(qc, d, device=device)
    b = torch.randn(mc, d, device=device)
    a @ b.T  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        s = a @ b.T
        s @ b
    sync(device)
    return reps * 4 * qc * mc * d / (time.perf_counter() - t0) / 1e9


def agg_gflops(n: int, m: int, d: int, device: str, **kw) -> tuple[float, float]:
    q, mem = unit(n, d, 0), unit(m, d, 1)
    aggregate(q[:256], mem, device=device, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    aggregate(q, mem, device=device, **kw)
    sync(device)
    dt = time.perf_counter() - t0
    return 4 * n * m * d / dt / 1e9, dt


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_child(n: int, m: int, d: int, device: str) -> None:
    """Runs in a subprocess: print working memory (MiB) of one aggregate call beyond inputs+output."""
    import threading

    q, mem = unit(n, d, 0), unit(m, d, 1)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        aggregate(q, mem, device=device, resident_bytes=0)
        extra = torch.cuda.max_memory_allocated() - base
    else:
        # sample the resident set while aggregate runs; ru_maxrss would include input-building temporaries
        base, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss())
                time.sleep(0.002)

        t = threading.Thread(target=sample)
        t.start()
        aggregate(q, mem, device=device)
        done.set()
        t.join()
        extra = max(peak[0], _rss()) - base - n * d * 4  # minus the (n, d) result itself
    print(json.dumps({"n": n, "extra_mib": extra / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--memory", type=int, default=32_768)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--peak-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        peak_child(*args.peak_child, args.device)
        return
    m, d, n, dev = args.memory, args.dim, args.queries, args.device
    ref = matmul_gflops(4096, 32768 if m >= 32768 else m, d, dev)
    exact, t_exact = agg_gflops(n, m, d, dev)
    topk, t_topk = agg_gflops(n, m, d, dev, method="topk", k=256)
    q, mem = unit(2048, d, 0), unit(m, d, 1)
    e, a = aggregate(q, mem, device=dev), aggregate(q, mem, device=dev, method="topk", k=256)
    cos = (e * a).sum(1)
    peaks = []
    for nq in (4096, 16384, 65536):  # a small memory keeps this quick; the block sizes set the peak
        out = subprocess.run([sys.executable, __file__, "--device", dev, "--peak-child", str(nq), str(8192), str(d)],
                             capture_output=True, text=True, check=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {
        "device": dev, "memory_rows": m, "dim": d, "queries": n, "threads": torch.get_num_threads(),
        "matmul_gflops": round(ref, 2), "exact_gflops": round(exact, 2), "exact_ratio_to_matmul": round(exact / ref, 3),
        "topk256_speedup_vs_exact": round(t_exact / t_topk, 3),
        "topk256_min_cosine_to_exact": float(cos.min()), "topk256_mean_cosine_to_exact": float(cos.mean()),
        "peak_working_mib_by_queries": {str(r["n"]): round(r["extra_mib"], 1) for r in peaks},
        "paper_scale_estimate_hours": round(4 * 2.31e6 * (1.3e6 + 1.8e6) * 512 / (exact * 1e9) / 3600, 2),
    }
    print(f"{'quantity':38s} value")
    for k, v in result.items():
        print(f"{k:38s} {v}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "aggregate.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
