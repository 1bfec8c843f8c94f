"""Memory aggregation at the GEMM limit: effective GFLOP/s as a ratio to the best GEMM rate of the same
dtype, over a sweep of shapes, for fp32 and bf16, per kernel; bf16's accuracy; peak memory vs query count.

    python benchmarks/aggregate.py [--dim 512] [--device cpu|cuda] [--quick] [--out runs/bench]

Counted work: 4·N·M·d flops (scores q·Mᵀ and the weighted sum p·M). The GEMM reference is the best
rate of `a @ b.T` over the same sweep's shapes and the same dtype, measured in the same run, so the
ratio is machine-independent (above 1 is possible: the fused kernel may beat a plain GEMM call).
Kernels: "sdpa" (torch's fused scaled-dot-product attention with scale 1/τ, log-sum-exp merged over
memory chunks) and "chunked" (our score blocks; bf16 with the score shift folded into the GEMM).
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

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(n: int, d: int, seed: int, centres: np.ndarray) -> np.ndarray:
    """Rows around shared centres (cosine to the centre ~0.7), so that softmax weights at τ = 0.01
    concentrate as they do on real embeddings rather than spreading over random directions."""
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(len(centres), size=n)] + 0.6 * unit(n, d, seed + 1) + 0.3 * unit(1, d, 99)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_gflops(n: int, m: int, d: int, dtype: torch.dtype, device: str, reps: int = 3) -> float:
    a = torch.randn(n, d, device=device).to(dtype)
    b = torch.randn(m, d, device=device).to(dtype)
    a @ b.T  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b.T
    sync(device)
    return reps * 2 * n * m * d / (time.perf_counter() - t0) / 1e9


def agg_gflops(q: np.ndarray, mem: np.ndarray, device: str, **kw) -> tuple[float, np.ndarray]:
    aggregate(q[:256], mem, device=device, **kw)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = aggregate(q, mem, device=device, **kw)
    sync(device)
    return 4 * len(q) * len(mem) * q.shape[1] / (time.perf_counter() - t0) / 1e9, out


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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="two shapes instead of four")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--peak-child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak_child:
        peak_child(*args.peak_child, args.device)
        return
    d, dev = args.dim, args.device
    shapes = [(4096, 32768), (8192, 131072)] if args.quick else [(2048, 8192), (4096, 32768), (4096, 131072),
                                                                  (16384, 131072)]
    gemm = {name: max(gemm_gflops(n, m, d, dt, dev) for n, m in shapes) for name, dt in DTYPES.items()}
    centres = unit(512, d, 7)
    rows = []
    for n, m in shapes:
        q, mem = clustered(n, d, 1, centres), clustered(m, d, 2, centres)
        ref = None
        for name, dt in DTYPES.items():
            for kernel in ("sdpa", "chunked"):
                rate, out = agg_gflops(q, mem, dev, dtype=dt, kernel=kernel)
                ref = out if ref is None else ref  # fp32 sdpa first: the reference
                cos = (out * ref).sum(1)
                rows.append({"queries": n, "memory": m, "dtype": name, "kernel": kernel, "gflops": round(rate, 1),
                             "ratio_to_gemm": round(rate / gemm[name], 3), "cos_to_fp32_mean": round(float(cos.mean()), 6),
                             "cos_to_fp32_min": round(float(cos.min()), 6)})
                r = rows[-1]
                print(f"N {n:6d} M {m:7d} {name:9s} {kernel:8s} {r['gflops']:7.1f} GFLOP/s  {r['ratio_to_gemm']:.2f} of "
                      f"GEMM  cos to fp32 mean {r['cos_to_fp32_mean']:.6f} min {r['cos_to_fp32_min']:.5f}", flush=True)
    peaks = []
    for nq in (4096, 16384, 65536):  # a small memory keeps this quick; the block sizes set the peak
        out = subprocess.run([sys.executable, __file__, "--device", dev, "--peak-child", str(nq), str(8192), str(d)],
                             capture_output=True, text=True, check=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from pairfree.devices import cpu_features, native_bf16

    result = {"device": dev, "dim": d, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": cpu_features(), "native_bf16": native_bf16(dev),
              "gemm_gflops": {k: round(v, 1) for k, v in gemm.items()}, "sweep": rows,
              "peak_working_mib_by_queries": {str(r["n"]): round(r["extra_mib"], 1) for r in peaks}}
    print("\n| dtype | kernel | ratio to GEMM (min - max over shapes) | cos to fp32 (min) |\n| --- | --- | ---: | ---: |")
    for name in DTYPES:
        for kernel in ("sdpa", "chunked"):
            sel = [r for r in rows if r["dtype"] == name and r["kernel"] == kernel]
            print(f"| {name} | {kernel} | {min(r['ratio_to_gemm'] for r in sel):.2f} - "
                  f"{max(r['ratio_to_gemm'] for r in sel):.2f} | {min(r['cos_to_fp32_min'] for r in sel):.5f} |")
    print(f"GEMM GFLOP/s: {result['gemm_gflops']}; peak working MiB by queries: {result['peak_working_mib_by_queries']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "aggregate.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
