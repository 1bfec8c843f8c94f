"""The GPU checks, one script: fused kernels, aggregation (exact and IVF lists), a training epoch slice,
an encoder in fp16, and the IVF groups selector (last: the newest path; its row selection timed against
topk) on CUDA, with the same ratio tables as on CPU. Run by benchmarks/gpu.sh.

    python benchmarks/gpu.py [--device cuda] [--memory 1300000] [--queries 65536] [--out runs/bench/gpu]

Everything is synthetic or tiny (the machine may have no network and no datasets): the paper-scale
world's clip text -> clip image hop (`pairfree.toy.scale`, its first rows, regenerated on the device),
Ex-MCR heads at batch 4096,
and a tiny CLIP checkpoint written locally. Each part reports a ratio to the GEMM rate measured in the
same run, or an accuracy against fp32, never a bare time alone. `--device cpu --memory 50000
--queries 2048` runs the same code on a CPU (a dry run; `--quick --memory 8000 --queries 256
--train-steps 1 --train-batch 512`, which tests/test_gpu_script.py runs: ~1 min, where bf16 is in software too).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


#: FLOPs of all pseudo data of one Ex-MCR leaf at paper size, exact (benchmarks/paper_scale.py's hops):
#: 2·N·M·d per score GEMM and per value, over C-MCR's two hops and the leaf and base passes' four more.
PAPER_LEAF_FLOP = 2 * 512 * sum(n * m * (1 + v) for n, m, v in (
    (2_310_000, 1_300_000, 1), (2_310_000, 1_800_000, 1), (1_800_000, 2_310_000, 2), (1_800_000, 1_300_000, 1),
    (1_300_000, 2_310_000, 2), (1_300_000, 1_800_000, 1)))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, reps: int = 3) -> float:
    fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps


#: GEMM shapes (n, k, m) whose best rate is "the GEMM rate"; `--quick` takes the small ones (a CPU dry run:
#: float16 GEMMs on a CPU run at a tenth of the fp32 rate, and the full sweep alone takes a minute there)
GEMM_SHAPES = ((8192, 512, 8192), (4096, 512, 65536), (16384, 1024, 4096))
QUICK_GEMM_SHAPES = ((1024, 512, 2048), (512, 512, 8192), (2048, 1024, 512))


def gemm_rates(dev, shapes=GEMM_SHAPES) -> dict[str, float]:
    out = {}
    for name in ("float32", "float16", "bfloat16"):
        dt = getattr(torch, name)
        best = 0.0
        for n, k, m in shapes:
            a, b = torch.randn(n, k, device=dev, dtype=dt), torch.randn(m, k, device=dev, dtype=dt)
            best = max(best, 2 * n * k * m / timed(lambda: a @ b.T, dev) / 1e9)
        out[name] = round(best, 1)
    return out


def paper_rows(corpus: str, key: str, n: int, dev) -> torch.Tensor:
    """The first n rows of the paper-scale world's `key` array (`pairfree.toy.scale`), drawn chunk by
    chunk from the world's own seeded streams (the towers run on `dev`) and rounded to its float16
    storage: the same rows as `python -m pairfree.toy.scale` writes, without 9.5 GB to carry."""
    from pairfree.toy.scale import CHUNK, DIM, Latent, ScaleWorldConfig

    cfg = ScaleWorldConfig()
    if n > cfg.resolved_sizes()[corpus]:
        raise ValueError(f"paper_rows: the paper-scale world has {cfg.resolved_sizes()[corpus]} {corpus} rows, asked for {n}")
    latent = Latent(cfg)
    out = torch.empty((n, DIM), device=dev)
    for i, s in enumerate(range(0, n, CHUNK)):
        z, raw, _ = latent.chunk(corpus, i)
        keep = min(len(z), n - s)
        e = latent.encode_tensor(key, torch.from_numpy(z[:keep]).to(dev), torch.from_numpy(raw[:keep]).to(dev))
        out[s : s + keep] = e.half().float()
    return out


@functools.cache
def hop_rows(dev, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clip text -> clip image hop's first n queries and m memory rows, generated once per run."""
    t0 = time.perf_counter()
    q, k = paper_rows("text", "clip/text", n, dev), paper_rows("image", "clip/image", m, dev)
    print(f"paper-scale world, clip text -> clip image: {n} x {m} rows generated in {time.perf_counter() - t0:.1f} s",
          flush=True)
    return q, k


def aggregation(dev, n: int, m: int, rates: dict[str, float]) -> dict:
    from pairfree.memory import aggregate, fused_supported

    d = 512
    q, k = hop_rows(dev, n, m)
    res = {"queries": n, "memory": m, "fused": {dt: fused_supported(str(dev), d, f"torch.{dt}")
                                                for dt in ("float32", "float16", "bfloat16")}}
    ref = aggregate(q[:2048], k, device=dev, dtype="float32", kernel="chunked")
    for dt in ("float32", "float16", "bfloat16"):
        for kernel in ("sdpa", "chunked"):
            if kernel == "sdpa" and not res["fused"][dt] and dev.type != "cpu":
                continue
            try:
                t = timed(lambda: aggregate(q, k, device=dev, dtype=dt, kernel=kernel), dev, reps=1)
                out = aggregate(q[:2048], k, device=dev, dtype=dt, kernel=kernel)
            except Exception as e:  # noqa: BLE001 - one kernel failing must not cost the other measurements
                res[f"{kernel}/{dt}"] = {"failed": f"{type(e).__name__}: {e}"}
                print(f"aggregate {kernel:8s} {dt:9s}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            cos = (torch.from_numpy(out) * torch.from_numpy(ref)).sum(1)
            gf = 4 * n * m * d / t / 1e9
            res[f"{kernel}/{dt}"] = {"s": round(t, 2), "gflops": round(gf, 1), "ratio_to_gemm": round(gf / rates[dt], 3),
                                     "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                                     "paper_leaf_exact_min": round(PAPER_LEAF_FLOP / (gf * 1e9) / 60, 1)}
            print(f"aggregate {kernel:8s} {dt:9s}: {gf:8.1f} GFLOP/s ({gf / rates[dt]:.2f} of GEMM), "
                  f"cos to fp32 mean {float(cos.mean()):.6f} min {float(cos.min()):.5f}; "
                  f"all pseudo data of one Ex-MCR leaf exact at this rate: {PAPER_LEAF_FLOP / (gf * 1e9) / 60:.1f} min",
                  flush=True)
    res.update(approximate(dev, q, k, "lists"))
    return res


@functools.cache
def partition_cache() -> str:
    """One folder for the run's k-means partitions: the lists and groups runs share the memory's."""
    import tempfile

    return tempfile.mkdtemp(prefix="pairfree-gpu-")


def approximate(dev, q: torch.Tensor, k: torch.Tensor, select: str) -> dict:
    """`method="ivf"` against exact on the hop: select="lists" (per-query probes) at 0.99 and 0.999,
    fp32 and bf16, or "groups" (one sampled row selection per group of nearby queries, what the
    paper-scale runs use) with its per-query error estimates and a 0.2 % exact redo, at 0.99 and
    0.999 in fp32 and in bf16 where bf16 is native (0.99 is what a CPU dry run's small sizes can run
    approximately). A run that fails is recorded and the next one runs."""
    from pairfree.devices import native_bf16
    from pairfree.ivf import IVFSettings
    from pairfree.memory import aggregate

    n, res = len(q), {}
    runs = {"lists": (("float32", 0.99), ("float32", 0.999), ("bfloat16", 0.999)),
            "groups": (("float32", 0.99), ("float32", 0.999)) + ((("bfloat16", 0.999),) if native_bf16(dev) else ())}
    for dt, target in runs[select]:
        name = f"ivf {dt} cos>={target}" + (" groups" if select == "groups" else "")
        extra = {"select": "groups", "redo": 0.002} if select == "groups" else {}
        if select == "groups" and n < 8192:  # a dry run's few queries: a group per query's cell otherwise,
            extra["lists"] = max(1, n // 32)  # whose means cost more than exact does
        rep: dict = {}
        t0 = time.perf_counter()
        try:
            aggregate(q, k, method="ivf", device=dev, dtype=dt, report=rep,
                      ivf=IVFSettings(min_cosine=target, sample=1500, cache_dir=partition_cache(), **extra))
            sync(dev)
        except ImportError as e:  # no faiss: no partition for any of them
            print(f"ivf skipped: {e}", flush=True)
            return {"ivf": f"skipped: {e}"}
        except Exception as e:  # noqa: BLE001 - one run failing must not cost the others
            res[name] = {"failed": f"{type(e).__name__}: {e}"}
            print(f"{name}: failed: {type(e).__name__}: {e}", flush=True)
            continue
        rep["wall_s"] = round(time.perf_counter() - t0, 2)
        res[name] = rep
        print(f"{name}: " + (f"probes {rep.get('probes')}/{rep.get('lists')}, " if select == "lists" else "")
              + f"work {rep.get('work_fraction', 1):.3f}, cos {rep['cosine_to_exact']['mean']:.5f}"
              + (f" (1st pct {rep['cosine_to_exact']['p1']:.4f})" if select == "groups" else "")
              + f", {rep['wall_s']} s" + (" (ran exact)" if rep.get("ran") else ""), flush=True)
    return res


def row_selection(dev, q: torch.Tensor, k: torch.Tensor, batch: int = 64) -> dict:
    """`grouped.top_rows` against a plain `topk` on one batch of group means' scores, as the groups'
    pass selects (8,192 and 16,384 rows: the paper-scale hops' range), with the batch's score GEMM for
    scale. top_rows' threshold trick and its loop over rows (one sync per row on CUDA) were measured on
    CPUs only, where it is 2x faster than topk; this says whether a GPU should keep it."""
    from pairfree.grouped import top_rows

    s = q[:batch] @ k.T
    res = {"means": len(s), "memory": k.shape[0], "score_gemm_ms": round(1e3 * timed(lambda: q[:batch] @ k.T, dev), 2)}
    for rows in (8192, 16384):
        r = min(rows, k.shape[0] // 4)  # a dry run's small memory
        res[str(r)] = {"top_rows_ms": round(1e3 * timed(lambda: top_rows(s, r), dev), 2),
                       "topk_ms": round(1e3 * timed(lambda: s.topk(r, dim=1, sorted=False), dev), 2)}
    print(f"row selection, {len(s)} means x {k.shape[0]} rows: {res}", flush=True)
    return res


def training(dev, steps: int, rates: dict[str, float], batch: int = 4096) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from pairfree import train
    from pairfree.extend import ROLES, DecoupledProjector, ExMCRConfig, make_step

    out = {}
    g = torch.Generator().manual_seed(0)  # the same data in every run (the timing loops before draw a varying amount)
    data = {r: torch.nn.functional.normalize(torch.randn(batch * (steps + 1), 512, generator=g), dim=-1) for r in ROLES}
    for precision in ("fp32", "fp16", "bf16"):
        if precision == "fp16" and dev.type != "cuda":
            continue
        cfg = ExMCRConfig(precision=precision, epochs=1, device=str(dev), batch_size=batch)
        torch.manual_seed(0)  # one initial head for every precision: their first losses are comparable
        head = DecoupledProjector(512, 512).to(dev)
        step = make_step(head, cfg)
        first = {r: data[r][:batch].to(dev) for r in ROLES}
        with FlopCounterMode(display=False) as fc:
            with train.autocast_context(precision, dev):
                loss, _ = step(first, torch.Generator().manual_seed(0))
            loss.backward()
        flops = fc.get_total_flops()
        sync(dev)
        t0 = time.perf_counter()
        train.run(head, data, step, cfg.loop_settings(), progress=False, max_steps=steps)
        sync(dev)
        s = (time.perf_counter() - t0) / steps
        rate = rates["float32" if precision == "fp32" else "float16" if precision == "fp16" else "bfloat16"]
        out[precision] = {"s_per_step": round(s, 4), "gflops": round(flops / s / 1e9, 1),
                          "ratio_to_gemm": round(flops / s / 1e9 / rate, 3),
                          "epoch_s_5.41M": round(s * math.ceil(5_410_000 / batch), 1), "first_loss": float(loss),
                          "batch": batch}
        print(f"train {precision}: {s:.3f} s/step, {flops / s / 1e9:.1f} GFLOP/s ({flops / s / 1e9 / rate:.2f} of GEMM), "
              f"a 5.41M-tuple epoch {out[precision]['epoch_s_5.41M']} s, first loss {float(loss):.5f}", flush=True)
    return out


def encoder(dev, tmp: Path) -> dict:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from pairfree.encoders.common import import_torchvision

        import_torchvision()  # before transformers imports it (a CPU torch next to a CUDA torchvision)
        from tiny_checkpoints import write_tiny_hf_clip

        from pairfree.encoders.registry import load_encoder
    except ImportError as e:
        print(f"encoder skipped: {e}")
        return {"skipped": str(e)}
    (tmp / "tiny-clip").mkdir(parents=True, exist_ok=True)
    path = write_tiny_hf_clip(tmp / "tiny-clip")
    out = {}
    for dt in ("float32", "float16"):
        enc = load_encoder(f"hf-clip:{path}", device=str(dev), dtype=dt)
        texts = [f"a photo of thing {i}" for i in range(256)]
        t = timed(lambda: enc.encode("text", texts), dev)
        out[dt] = {"texts_per_s": round(len(texts) / t, 1)}
    a = load_encoder(f"hf-clip:{path}", device=str(dev), dtype="float32").encode("text", texts[:8])
    b = load_encoder(f"hf-clip:{path}", device=str(dev), dtype="float16").encode("text", texts[:8])
    out["fp16_cos_to_fp32_min"] = float((a * b).sum(1).min())
    print(f"encoder (tiny hf-clip): {out}", flush=True)
    return out


def groups(dev, q: torch.Tensor, k: torch.Tensor) -> dict:
    try:
        selection = row_selection(dev, q, k)
    except Exception as e:  # noqa: BLE001 - a side measurement must not cost the selector's runs
        selection = {"failed": f"{type(e).__name__}: {e}"}
    return {**approximate(dev, q, k, "groups"), "selection": selection}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--memory", type=int, default=1_300_000)
    p.add_argument("--queries", type=int, default=65536)
    p.add_argument("--train-steps", type=int, default=50)
    p.add_argument("--train-batch", type=int, default=4096,
                   help="Ex-MCR batch (the papers': 4096; a CPU dry run takes less: bf16 may be in software there)")
    p.add_argument("--out", default="runs/bench/gpu")
    p.add_argument("--quick", action="store_true",
                   help="small GEMM shapes for the rate (a dry run on a CPU; the tests run one)")
    args = p.parse_args()
    dev = torch.device(args.device)
    from pairfree.devices import cpu_features, native_bf16

    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_features(),
            "native_bf16": native_bf16(dev), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(info, flush=True)
    rates = gemm_rates(dev, QUICK_GEMM_SHAPES if args.quick else GEMM_SHAPES)
    print(f"GEMM GFLOP/s: {rates}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**info, "gemm_gflops": rates}
    # One failing part must not cost the others: a lent GPU is minutes, not hours.
    parts = {"aggregation": lambda: aggregation(dev, args.queries, args.memory, rates),
             "training": lambda: training(dev, args.train_steps, rates, args.train_batch),
             "encoder": lambda: encoder(dev, out),
             # last: the newest path, so that a timeout or a failure there costs no other part
             "groups": lambda: groups(dev, *hop_rows(dev, args.queries, args.memory))}
    for name, part in parts.items():
        t0 = time.perf_counter()
        try:
            result[name] = part()
        except Exception as e:  # noqa: BLE001 - reported in the JSON and on stderr, the run goes on
            traceback.print_exc()
            result[name] = {"failed": f"{type(e).__name__}: {e}"}
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)  # for sizing the next device run
        print(f"[{name}: {result['seconds'][name]} s]", flush=True)
        (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    text = tables(result)
    (out / "gpu.md").write_text(text)
    print("\n" + text + f"\nwrote {out / 'gpu.json'} and {out / 'gpu.md'}")


def tables(result: dict) -> str:
    """The run as the README's markdown tables: each kernel and dtype against its GEMM rate, each IVF
    run's work and cosine to exact, each training precision against its GEMM rate."""
    lines = [f"{result['device']}, torch {result['torch']}, {result['date']}; GEMM GFLOP/s: {result['gemm_gflops']}"]
    lines += [f"{part} failed: {result[part]['failed']}" for part in ("aggregation", "training", "encoder", "groups")
              if "failed" in result.get(part, {})]
    lines.append("seconds per part: " + ", ".join(f"{k} {v}" for k, v in result.get("seconds", {}).items()))
    lines += ["",
             "| aggregation (exact) | GFLOP/s | ratio to GEMM | cosine to fp32: min | one leaf's pseudo data exact |",
             "| --- | ---: | ---: | ---: | ---: |"]
    agg = result.get("aggregation", {})
    for name, r in agg.items():
        if "/" in name:
            lines.append(f"| {name} | " + (f"failed: {r['failed']} | | | |" if "failed" in r else
                                           f"{r['gflops']} | {r['ratio_to_gemm']:.2f} | {r['cos_min']:.6f} | "
                                           f"{r['paper_leaf_exact_min']} min |"))
    lines += ["", "| aggregation (IVF) | work (share of exact's) | cosine to exact: mean / 1st pct / min | s |",
              "| --- | ---: | ---: | ---: |"]
    for name, r in {**agg, **result.get("groups", {})}.items():
        if name.startswith("ivf "):
            if "failed" in r:
                lines.append(f"| {name} | failed: {r['failed']} | | |")
                continue
            c = r["cosine_to_exact"]
            lines.append(f"| {name}{' (ran exact)' if r.get('ran') else ''} | {r.get('work_fraction', 1):.3f} | "
                         f"{c['mean']:.5f} / {c['p1']:.4f} / {c['min']:.4f} | {r['wall_s']} |")
    lines += ["", "| training (Ex-MCR step) | s / step | GFLOP/s | ratio to GEMM | 5.41M-tuple epoch, s |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in result.get("training", {}).items():
        if isinstance(r, dict):
            lines.append(f"| {name}, batch {r['batch']} | {r['s_per_step']} | {r['gflops']} | {r['ratio_to_gemm']:.2f} | "
                         f"{r['epoch_s_5.41M']} |")
    sel = result.get("groups", {}).get("selection", {})
    if "score_gemm_ms" in sel:
        lines += ["", f"row selection, {sel['means']} means x {sel['memory']} rows (their score GEMM "
                      f"{sel['score_gemm_ms']} ms): " + "; ".join(
                          f"{r} rows: top_rows {v['top_rows_ms']} ms, topk {v['topk_ms']} ms"
                          for r, v in sel.items() if isinstance(v, dict))]
    enc = result.get("encoder", {})
    if "float16" in enc:
        lines += ["", f"encoder (tiny hf-clip): {enc['float32']['texts_per_s']} texts/s fp32, "
                      f"{enc['float16']['texts_per_s']} fp16, fp16 cosine to fp32 >= {enc['fp16_cos_to_fp32_min']:.5f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
