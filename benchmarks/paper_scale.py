"""Paper scale on this machine: the papers' corpus sizes, their pseudo data and their training batch.

    python benchmarks/paper_scale.py [--world DIR] [--preset paper|mini] [--stages world,exact,aggregation,bound,groups,second,ray,train]
                                     [--sample 3000] [--train-steps 150] [--out runs/bench/paper_scale]

Stages, each in its own subprocess (so each peak memory is its own):
- world: the scale world (`pairfree.toy.scale`: 2.31M texts in two towers, 1.3M images in two towers,
  1.8M audio, 0.8M point clouds, d = 512, float16 memory-mapped), its build time and statistics;
- exact: per hop, exact aggregation in fp32 (fused SDPA) and bf16 (the shifted chunked kernel) on
  --exact-block queries: effective GFLOP/s against each dtype's GEMM rate, bf16's cosine to fp32, and
  the projected hop and leaf times;
- aggregation: the four distinct hops of C-MCR's pseudo pairs and of the three Ex-MCR passes of the
  CLAP leaf (CLIP text -> image and CLAP text -> audio are C-MCR's and the overlap pass's; the leaf
  and base passes' first hops carry two values; their second hops query the first two hops'
  memories), each with the exact fused kernel and with IVF at three targets (mean cosine to exact
  >= 0.99, >= 0.999, and the default dropped mass <= 0.01): probes calibrated on 1000 queries with
  an exact reference, accuracy measured on the other --sample - 1000, throughput timed on a block of
  --block queries (--exact-block for the exact kernel) and projected to the hop's query count;
- bound: what a perfect selector would need per hop (`pairfree.ivf.oracle_rows`: the rows of largest
  softmax weight, found for free, that reach cosine 0.99 / 0.999 to exact, on --bound-queries queries),
  and the time all pseudo data would then take at the fp32 and bf16 GEMM rates measured in the same
  run (selection not counted): how far IVF is from the rows that matter, and a floor for any method
  that scores a subset of the rows chosen by weight;
- groups: per hop, one row selection per group of nearby queries (`IVFSettings(select="groups")`) in
  --gemm-dtype (auto: bf16 where the CPU has it in hardware, else fp32) at mean cosine 0.999: rows
  calibrated on 1000 queries (stratified by their cosine to their group's mean) against exact in that
  dtype and measured on the other --sample - 1000 (uniform) against fp32 exact, throughput timed on
  whole groups holding --groups-share of the queries, projected with the grouping and calibration
  time added (--hops and --group-size run a subset or another group size). The check is a measurement: its fp32 reference, and its pass (a run
  reads it from its own), are timed apart; the totals are given without and with its reference;
- second: the leaf and base passes' second hops measured where the groups stage projects them: their
  first hop run in full (`aggregate(..., method="ivf")`, groups, --gemm-dtype, cos 0.999), its aggregated second
  value (clip text from clap audio, clap text from clip image) then the queries of the second hop,
  measured as in the groups stage (--hops 2 and/or 3 pick the passes);
- ray: one hop (--hops, default 0) run in full locally and then as Ray tasks on a local instance with
  as many CPUs (`backend="ray"`, groups, --gemm-dtype, cos 0.999): wall times, their ratio, the largest
  difference between the two results, and the seconds only the driver spends (grouping, calibration's
  trials: the bound on a cluster's speed-up);
- train: Ex-MCR training on a 5.41M-tuple pool (memory-mapped float16, gathered per batch; memory
  rows stand in for the aggregated roles) at batch 4096, fp32 and bf16 autocast (--train-precisions), for --train-steps
  steps; FLOPs per step counted by torch's FlopCounterMode, as a ratio to the best GEMM rate of the
  same dtype measured in the same run.

Peak memory: the process's peak anonymous RSS (sampled; file-backed pages of the memory-mapped inputs
are the page cache, not the process's) and VmHWM (all resident pages). Output: one JSON per stage,
summary.json (with `leaf_with_passes_in_full`, one leaf's total, where the groups and second stages both
ran), and markdown tables on stdout.
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

from pairfree.devices import cpu_features, native_bf16

STAGES = ("world", "exact", "aggregation", "bound", "groups", "second", "ray", "train")


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

        info["realism"] = realism(folder, sample=1000)
        write_json(folder / "world.json", info)
    size = sum(f.stat().st_size for f in folder.rglob("*.npy"))
    return {"seconds": round(time.perf_counter() - t0, 1), "build_seconds": info.get("build_seconds"),
            "sizes": info["sizes"], "disk_gib": round(size / 2**30, 2), "realism": info.get("realism")}


#: the distinct aggregation hops at paper scale: (name, query (space, modality), memory, extra value)
HOPS = (
    ("clip text -> clip image", ("clip", "text"), ("clip", "image"), None),
    ("clap text -> clap audio", ("clap", "text"), ("clap", "audio"), None),
    ("clap audio -> clap text (+ clip text)", ("clap", "audio"), ("clap", "text"), ("clip", "text")),
    ("clip image -> clip text (+ clap text)", ("clip", "image"), ("clip", "text"), ("clap", "text")),
)


def hop_arrays(world: dict):
    """(name, queries, keys, values) of each hop, as the world's memory-mapped arrays."""
    sp = world["spaces"]
    for name, (qs, qm), (ms, mm), extra in HOPS:
        keys = sp[ms][mm]
        yield name, sp[qs][qm], keys, [keys] + ([sp[extra[0]][extra[1]]] if extra else [])


#: settings compared per hop
SETTINGS = {"ivf cos>=0.99": {"min_cosine": 0.99}, "ivf cos>=0.999": {"min_cosine": 0.999},
            "ivf bf16 cos>=0.99": {"min_cosine": 0.99, "dtype": "bfloat16"},
            "ivf bf16 cos>=0.999": {"min_cosine": 0.999, "dtype": "bfloat16"},
            "ivf mass<=0.01": {"max_dropped": 0.01}}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stage_aggregation(args) -> dict:
    """Per hop: exact aggregation (the fp32 kernel `auto` picks, the float16 memory converted chunk by chunk
    inside the clock) and the IVF approximation in each of SETTINGS, each timed on a block of queries and
    projected to the hop's full query count (work per query is constant on average)."""
    import numpy as np
    import torch

    from pairfree.ivf import IVFSettings, ProbedMemory, cached_partition, choose_probes, measure, reference
    from pairfree.memory import aggregate
    from pairfree.toy.scale import load

    w = load(args.world)
    dev, tau = torch.device("cpu"), 0.01
    out = {}
    for name, queries, keys, values in hop_arrays(w):
        n, m = queries.shape[0], keys.shape[0]
        block = np.asarray(queries[: args.block], dtype=np.float32)
        hop: dict = {"queries": n, "memory": m, "values": len(values)}
        exact_block = block[: args.exact_block]
        t = _timed(lambda: aggregate(exact_block, keys, values))
        hop["exact"] = {"block": len(exact_block), "s": round(t, 1), "q_per_s": round(len(exact_block) / t, 1),
                        "projected_s": round(n * t / len(exact_block)), "gflops": round(
                            2 * len(exact_block) * m * 512 * (1 + len(values)) / t / 1e9, 1)}
        base = IVFSettings(sample=args.sample, cache_dir=str(Path(args.cache)))
        t0 = time.perf_counter()
        part = cached_partition(keys, base.n_lists(m), base, dev)
        mem = ProbedMemory(keys, values, part, dev)
        hop["lists"], hop["partition_s"] = len(part.offsets) - 1, round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        ref = reference(mem, queries, tau, base)
        hop["reference_s"] = round(time.perf_counter() - t0, 1)
        for label, kw in SETTINGS.items():
            kw = dict(kw)
            run = mem.astype(getattr(torch, kw.pop("dtype", "float32")))
            settings = IVFSettings(**{**base.__dict__, **kw})
            t0 = time.perf_counter()
            probes = choose_probes(ref, run, tau, settings)
            res = measure(ref, run, probes, tau)
            res["calibration_s"] = round(time.perf_counter() - t0, 1)
            res["work_fraction"] = round(res["rows_scanned_per_query"] / m, 4)
            if res["work_fraction"] > base.exact_above:
                res.update({"ran": "exact", "projected_s": hop["exact"]["projected_s"]})
            else:
                qb = torch.from_numpy(block)
                t = _timed(lambda: run.aggregate(qb, probes, tau))
                res.update({"block": len(block), "q_per_s": round(len(block) / t, 1), "projected_s": round(n * t / len(block))})
            hop[label] = res
            print(f"{name} | {label}: probes {probes}/{hop['lists']}, work {res['work_fraction']:.2%}, cos "
                  f"{res['cosine_to_exact']['mean']:.5f} / p1 {res['cosine_to_exact']['p1']:.4f}, "
                  f"projected {res['projected_s']} s", flush=True)
        mem = run = ref = None  # free the IVF copy and the reference before the next hop builds its own
        out[name] = hop
    queries = {h: out[h]["queries"] for h in out}
    totals = {label: _leaf_total({h: out[h][label]["projected_s"] for h in out}, queries)
              for label in ("exact", *SETTINGS)}
    return {"hops": out, "projected": totals}


def stage_exact(args) -> dict:
    """Per hop, exact aggregation in fp32 (the fused SDPA kernel, `aggregate`'s default) and in bf16
    (the shifted chunked kernel `auto` picks for bf16 on a CPU), each timed on --exact-block queries
    with effective GFLOP/s against the GEMM rate of its dtype measured in the same run; bf16's cosine
    to fp32 on that block; the hop and leaf totals projected as in the aggregation stage."""
    import numpy as np
    import torch

    from pairfree.memory import aggregate
    from pairfree.toy.scale import load

    w = load(args.world)
    rates = {"float32": gemm_rate(torch.float32), "bfloat16": gemm_rate(torch.bfloat16)}
    out = {}
    for name, queries, keys, values in hop_arrays(w):
        n, m = queries.shape[0], keys.shape[0]
        block = np.asarray(queries[: args.exact_block], dtype=np.float32)
        hop: dict = {"queries": n, "memory": m, "values": len(values)}
        results = {}
        for dtype in rates:
            # the memory is converted once per run of a whole hop, so it is converted before the clock
            t0 = time.perf_counter()
            k_dt = _as_dtype(keys, dtype)
            v_dt = [k_dt if v is keys else _as_dtype(v, dtype) for v in values]
            convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            results[dtype] = aggregate(block, k_dt, v_dt, dtype=dtype, report=(rep := {}))
            t = time.perf_counter() - t0
            k_dt = v_dt = None
            gf = 2 * len(block) * m * 512 * (1 + len(values)) / t / 1e9
            hop[dtype] = {"kernel": rep["kernel"], "convert_memory_s": round(convert_s, 1), "block": len(block), "s": round(t, 1),
                          "q_per_s": round(len(block) / t, 1), "projected_s": round(n * t / len(block)),
                          "gflops": round(gf, 1), "ratio_to_gemm": round(gf / rates[dtype], 3)}
        cos = [(a * b).sum(1) for a, b in zip(results["bfloat16"], results["float32"])]
        hop["bfloat16"]["cos_to_fp32"] = {"mean": float(min(c.mean() for c in cos)), "min": float(min(c.min() for c in cos))}
        print(f"{name}: fp32 {hop['float32']['gflops']} GFLOP/s ({hop['float32']['kernel']}), bf16 "
              f"{hop['bfloat16']['gflops']} GFLOP/s ({hop['bfloat16']['kernel']}), bf16 cos to fp32 min "
              f"{hop['bfloat16']['cos_to_fp32']['min']:.6f}", flush=True)
        out[name] = hop
    queries = {h: out[h]["queries"] for h in out}
    totals = {dtype: _leaf_total({h: out[h][dtype]["projected_s"] for h in out}, queries) for dtype in rates}
    return {"hops": out, "gemm_gflops": {d: round(r, 1) for d, r in rates.items()}, "projected": totals}


def _leaf_total(per_hop: dict[str, float], queries: dict[str, int]) -> dict[str, float]:
    """C-MCR's and one Ex-MCR leaf's totals from per-hop seconds: the second hops of the leaf and base
    passes query the first two hops' memories with 1.8M and 1.3M aggregated texts, at those hops'
    per-query cost."""
    h1, h2, h3, h4 = (HOPS[i][0] for i in range(4))
    cmcr = per_hop[h1] + per_hop[h2]
    leaf = (cmcr + per_hop[h3] + per_hop[h1] / queries[h1] * queries[h3]
            + per_hop[h4] + per_hop[h2] / queries[h2] * queries[h4])
    return {"cmcr_pseudo_pairs_h": round(cmcr / 3600, 2), "exmcr_leaf_h": round(leaf / 3600, 2),
            "cmcr_pseudo_pairs_min": round(cmcr / 60, 1), "exmcr_leaf_min": round(leaf / 60, 1)}


def leaf_with_passes_in_full(groups: dict, second: dict) -> dict | None:
    """One leaf's pseudo data with the leaf and base passes run in full (stage `second`) and the overlap
    pass's two hops as stage `groups` projects them: the figure the 30-minute target is held to. Without
    and with every check's fp32 reference (a measurement a run can do without)."""
    hops, passes = groups.get("hops", {}), list(second.get("hops", {}).values())
    if not all(h[0] in hops for h in HOPS[:2]) or len(passes) != len(SECOND_HOPS):
        return None
    run = sum(hops[h[0]]["projected_s"] for h in HOPS[:2])
    checks = sum(hops[h[0]]["check_reference_s"] for h in HOPS[:2])
    for p in passes:
        first = p["first_hop_report"]["seconds"]
        run += p["first_hop_run_s"] - first["check_reference"] + p["projected_s"]
        checks += first["check_reference"] + p["check_reference_s"]
    return {"exmcr_leaf_min": round(run / 60, 1), "with_checks_min": round((run + checks) / 60, 1)}


def _as_dtype(a, dtype: str, chunk: int = 1 << 18):
    """A memory-mapped float16 array as one torch tensor of `dtype`, converted in chunks."""
    import torch

    from pairfree.memory import as_tensor

    out = torch.empty(a.shape, dtype=getattr(torch, dtype))
    for s in range(0, a.shape[0], chunk):
        out[s : s + chunk] = as_tensor(a[s : s + chunk])
    return out


def stage_bound(args) -> dict:
    """Per hop, the rows a perfect selector needs (`oracle_rows`) next to the rows IVF scans for the
    same mean cosine (from aggregation.json when that stage ran), and the time all pseudo data would
    take if only those rows were scored, at the fp32 and bf16 GEMM rates of this run."""
    import numpy as np
    import torch

    from pairfree.ivf import oracle_rows
    from pairfree.toy.scale import load

    w = load(args.world)
    agg_path = Path(args.out) / "aggregation.json"
    agg = json.loads(agg_path.read_text())["hops"] if agg_path.exists() else {}
    rates = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    rng = np.random.default_rng(7)
    out, work = {}, {t: {} for t in ("0.99", "0.999")}
    for name, (qs, qm), (ms, mm), extra in HOPS:
        t0 = time.perf_counter()
        qa = w["spaces"][qs][qm]
        keys = _as_dtype(w["spaces"][ms][mm], "float32")
        values = [keys] + ([_as_dtype(w["spaces"][extra[0]][extra[1]], "float32")] if extra else [])
        q = torch.from_numpy(np.asarray(qa[np.sort(rng.choice(qa.shape[0], args.bound_queries, replace=False))],
                                        dtype=np.float32))
        res = oracle_rows(q, keys, values, 0.01, targets=(0.99, 0.999), max_rows=args.bound_max_rows)
        hop = {"queries": qa.shape[0], "memory": keys.shape[0], "values": len(values), "sample": len(q),
               "max_rows": res["max_rows"], "seconds": 0.0}
        flops_per_row = (2 + 2 * len(values)) * keys.shape[1]
        for t in ("0.99", "0.999"):
            r = res[t]
            rows = r["mean_target"]  # None: out of reach within --bound-max-rows
            ivf = agg.get(name, {}).get(f"ivf cos>={t}", {}).get("rows_scanned_per_query")
            hop[t] = {"per_query_mean": round(r["per_query"]["mean"], 1), "per_query_p99": r["per_query"]["p99"],
                      "common": r["common"], "mean_target": rows, "fraction": rows and rows / keys.shape[0],
                      "beyond_max_rows": r["beyond_max_rows"], "ivf_rows": ivf,
                      "ivf_over_oracle": round(ivf / rows, 1) if ivf and rows else None}
            work[t][name] = rows and qa.shape[0] * rows * flops_per_row
        hop["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: rows for cos 0.99 {hop['0.99']['mean_target']}, 0.999 {hop['0.999']['mean_target']} "
              f"of {keys.shape[0]:,} ({hop['seconds']} s)", flush=True)
        out[name] = hop
        del keys, values
    queries = {h: out[h]["queries"] for h in out}
    projected = {t: {p: _leaf_total({h: f / rate / 1e9 for h, f in work[t].items()}, queries)
                     for p, rate in rates.items()} for t in work if all(work[t].values())}
    return {"hops": out, "gemm_gflops": {p: round(r, 1) for p, r in rates.items()}, "projected": projected}


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32"}[dtype]


def _groups_settings(args):
    from pairfree.ivf import IVFSettings

    return IVFSettings(select="groups", min_cosine=0.999, sample=args.sample, cache_dir=str(Path(args.cache)),
                       redo=args.redo, **({"group_size": args.group_size} if args.group_size else {}))


#: the shares of queries `IVFSettings.redo` would redo that the groups stage projects
REDO_SHARES = (0.001, 0.002, 0.005, 0.01)


def _redo_projection(check, exact_s_per_query: float, n: int) -> dict:
    """What `IVFSettings(redo=share)` would give on this hop: the check's cosines with its share of queries of
    largest estimated error taken as exact (the check's own ranking stands in for the run's threshold over all
    queries; on 1000-2000 check queries the smallest shares are a few queries), and the redo's time at the per-query
    cost of calibration's exact reference (the GEMM dtype, as the redo runs), with how well the estimate
    orders and sizes the check's errors."""
    import numpy as np

    cos, order = check.cosines(), np.argsort(-check.errors)
    out = {"estimate_on_the_check": check.estimate_quality()}
    for share in REDO_SHARES:
        c = cos.copy()
        c[order[: round(share * len(c))]] = 1.0
        out[str(share)] = {"mean": float(c.mean()), "p1": float(np.quantile(c, 0.01)), "min": float(c.min()),
                           "seconds": round(share * n * exact_s_per_query, 1)}
    return out


def _groups_hop(name: str, queries, keys, values: list, args) -> dict:
    """One hop as stage `groups` measures it (see there)."""
    import numpy as np
    import torch

    from pairfree.grouped import GroupedMemory, calibrate, query_groups
    from pairfree.ivf import cached_partition

    dev, tau, dt = torch.device("cpu"), 0.01, getattr(torch, args.gemm_dtype)
    n, m = queries.shape[0], keys.shape[0]
    settings = _groups_settings(args)
    part = cached_partition(keys, settings.n_lists(m), settings, dev)
    t0 = time.perf_counter()
    gm = GroupedMemory(keys, values, dev, dt, seed=settings.seed)
    t_memory = time.perf_counter() - t0
    groups = query_groups(queries, torch.from_numpy(part.centroids), settings.group_size, dtype=dt,
                          regroup=settings.regroup)
    t1 = time.perf_counter()
    rep, check = calibrate(gm, queries, keys, values, groups, tau, settings, dev)
    t2 = time.perf_counter()
    # a run reads the check's results from its own pass; here only a share of it runs, so the check
    # gets a pass of its own, timed apart and not projected
    check_s = _timed(lambda: check.run(gm, queries, groups, rep["rows"], tau, settings.tail, estimate=True))
    rep["cosine_to_exact"] = check.summary()
    calibration_queries = max(1, min(1000, rep["sample"] // 2))  # as `grouped.calibrate` splits its sample
    rep["redo_projected"] = _redo_projection(check, rep["seconds"]["calibration_reference"] / calibration_queries, n)
    rng = np.random.default_rng(0)
    timed, held = [], 0
    for i in rng.permutation(len(groups)):
        if held >= args.groups_share * n:
            break
        timed.append(groups[i])
        held += len(groups[i])
    t = _timed(lambda: gm.aggregate(queries, timed, rep["rows"], tau, settings.tail))
    check_ref = rep["seconds"]["check_reference"]
    hop = {"queries": n, "memory": m, "values": len(values), "gemm_dtype": args.gemm_dtype, **rep,
           "grouping_s": round(t1 - t0, 1), "memory_to_gemm_dtype_s": round(t_memory, 1),
           "calibration_s": round(t2 - t1 - check_ref, 1),
           "check_reference_s": round(check_ref, 1), "check_s": round(check_s, 1),
           "timed_queries": held, "q_per_s": round(held / t, 1),
           "projected_s": round(n * t / held + (t2 - t0) - check_ref)}
    print(f"{name} | groups {_short(args.gemm_dtype)} cos>=0.999: rows {rep['rows']}, {rep['groups']} groups, cos "
          f"{rep['cosine_to_exact']['mean']:.5f} / p1 {rep['cosine_to_exact']['p1']:.4f}, "
          f"{hop['q_per_s']} q/s, grouping {hop['grouping_s']} s (memory to {_short(args.gemm_dtype)} {hop['memory_to_gemm_dtype_s']} s), "
          f"calibration {hop['calibration_s']} s "
          f"(check: fp32 reference {hop['check_reference_s']} s, pass {hop['check_s']} s, not projected), "
          f"projected {hop['projected_s']} s", flush=True)
    return hop


def _chosen(args, i: int) -> bool:
    return not args.hops or str(i) in args.hops.split(",")


def stage_groups(args) -> dict:
    """Per hop, `IVFSettings(select="groups")` in --gemm-dtype at mean cosine >= 0.999 (`pairfree.grouped`): all
    queries grouped (timed), `rows` calibrated on 1000 sample queries against exact and measured on the
    rest (their fp32 reference and a pass of their own timed apart: a run reads them from its own pass),
    throughput timed on whole groups (the means' pass included) holding `--groups-share` of the queries,
    projected to the hop's queries plus the grouping and calibration time."""
    from pairfree.toy.scale import load

    w = load(args.world)
    out = {name: _groups_hop(name, queries, keys, values, args)
           for i, (name, queries, keys, values) in enumerate(hop_arrays(w)) if _chosen(args, i)}
    queries = {h: out[h]["queries"] for h in out}
    if len(out) < len(HOPS):
        return {"hops": out}
    return {"hops": out, "projected": {
        f"groups {_short(args.gemm_dtype)} cos>=0.999": _leaf_total({h: out[h]["projected_s"] for h in out}, queries),
        f"the same with its {args.sample - 1000}-query check": _leaf_total(
            {h: out[h]["projected_s"] + out[h]["check_reference_s"] for h in out}, queries)}}


#: the leaf and base passes' second hops: (first hop's index in HOPS, the value whose aggregates become the
#: queries, the memory they query, the hop in HOPS whose per-query cost the leaf total projects for it)
SECOND_HOPS = ((2, 1, ("clip", "image"), 0), (3, 1, ("clap", "audio"), 1))


def stage_second(args) -> dict:
    """The leaf and base passes' second hops measured, where the groups stage projects them: the first hop
    run in full as a run would (`pf.aggregate(..., method="ivf")` with `select="groups"`, --gemm-dtype, cos 0.999,
    --redo; its outputs float16 in RAM), then its aggregated second value (clip text from clap audio, clap text
    from clip image) as the queries of the second hop, measured as in stage `groups`."""
    import numpy as np

    from pairfree.memory import aggregate
    from pairfree.toy.scale import load

    w = load(args.world)
    hops = list(hop_arrays(w))
    out = {}
    for first, vi, (space, modality), like in SECOND_HOPS:
        if not _chosen(args, first):
            continue
        name, queries, keys, values = hops[first]
        outs = [np.empty((queries.shape[0], v.shape[1]), np.float16) for v in values]
        rep: dict = {}
        t0 = time.perf_counter()
        aggregate(queries, keys, values, tau=0.01, method="ivf", dtype=args.gemm_dtype, ivf=_groups_settings(args),
                  out=outs, report=rep, progress=name)
        first_s = time.perf_counter() - t0
        print(f"{name}, run in full: {first_s:.0f} s, rows {rep['rows']}, cos {rep['cosine_to_exact']}", flush=True)
        memory = w["spaces"][space][modality]
        second = f"{HOPS[first][3][0]} {HOPS[first][3][1]} aggregated from {name.split(' ->')[0]} -> {space} {modality}"
        hop = _groups_hop(second, outs[vi], memory, [memory], args)
        out[second] = {**hop, "first_hop": name, "first_hop_run_s": round(first_s, 1),
                       "first_hop_report": {k: rep[k] for k in ("rows", "groups", "cosine_to_exact", "seconds", "redo",
                                                                "cosine_to_exact_before_redo", "error_estimate")
                                            if k in rep},
                       "projected_as": HOPS[like][0]}
        outs = None
    return {"hops": out}


def stage_ray(args) -> dict:
    """One hop (--hops, default 0) run in full twice, as `stage second` runs a first hop: locally on this
    process's threads, then with `backend="ray"` on a local Ray instance with as many CPUs, one thread per
    task (the driver groups and runs calibration's trials; tasks run whole batches of groups and both exact
    references). Wall times, their ratio, how far the two results lie apart, and the seconds only the
    driver spends (the bound on a cluster's speed-up for the hop)."""
    import numpy as np
    import torch

    from pairfree.memory import aggregate
    from pairfree.toy.scale import load

    try:
        import ray
    except ImportError:
        return {"skipped": "Ray is not installed (pip install 'pairfree[ray]')"}
    w = load(args.world)
    out = {}
    cpus = torch.get_num_threads()
    for i, (name, queries, keys, values) in enumerate(hop_arrays(w)):
        if not (_chosen(args, i) if args.hops else i == 0):
            continue
        runs = {}
        for backend in ("local", "ray"):
            if backend == "ray" and not ray.is_initialized():  # not before: its daemons would share the local run's cores
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            outs = [np.empty((queries.shape[0], v.shape[1]), np.float16) for v in values]
            rep: dict = {}
            t0 = time.perf_counter()
            aggregate(queries, keys, values, tau=0.01, method="ivf", dtype=args.gemm_dtype, ivf=_groups_settings(args),
                      out=outs, report=rep, progress=f"{name} ({backend})", backend=backend)
            runs[backend] = (time.perf_counter() - t0, outs, rep)
            print(f"{name}, {backend}: {runs[backend][0]:.0f} s, rows {rep['rows']}, shards {rep.get('shards')}, "
                  f"cos {rep['cosine_to_exact']}", flush=True)
        (t_local, a, rep_local), (t_ray, b, rep_ray) = runs["local"], runs["ray"]
        diff = max(float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max()) for x, y in zip(a, b))
        serial = t_ray - rep_ray["seconds_in_ray_tasks"]  # what runs in tasks spreads over a cluster; the rest does not
        out[name] = {"queries": queries.shape[0], "memory": keys.shape[0], "values": len(values), "gemm_dtype": args.gemm_dtype,
                     "local_s": round(t_local, 1), "ray_s": round(t_ray, 1), "ray_over_local": round(t_ray / t_local, 3),
                     "shards": rep_ray["shards"], "cpus": cpus, "same_rows": rep_ray["rows"] == rep_local["rows"],
                     "driver_serial_s": round(serial, 1), "speedup_bound": round(t_ray / serial, 2),
                     "max_abs_difference_float16": diff,
                     "differing_rows": int(sum((x != y).any(1).sum() for x, y in zip(a, b))),
                     "local": {k: rep_local[k] for k in ("rows", "groups", "cosine_to_exact", "seconds")},
                     "ray": {k: rep_ray[k] for k in ("rows", "groups", "cosine_to_exact", "seconds")}}
        runs = a = b = None
    if ray.is_initialized():
        ray.shutdown()
    return {"hops": out}


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _train_precisions(spec: str) -> list[str]:
    if spec == "auto":
        return ["fp32", "bf16"] if native_bf16() else ["fp32"]
    precisions = spec.split(",")
    if any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"--train-precisions: expected auto or a comma-separated list of fp32, bf16; got {spec!r}")
    return precisions


def stage_train(args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pairfree import train
    from pairfree.extend import ROLES, DecoupledProjector, ExMCRConfig, make_step
    from pairfree.toy.scale import load

    w = load(args.world)
    sp = w["spaces"]
    # the pool of one CLAP leaf: 2.31M (overlap pass) + 1.8M (leaf) + 1.3M (base) tuples; computing the
    # passes at this size takes hours (stage aggregation), and throughput does not depend on the values,
    # so memory rows of the same sizes stand in for the aggregated roles (float16, memory-mapped)
    stand_in = {"overlap": {"c": sp["clap"]["text"], "ol": sp["clap"]["text"], "ob": sp["clip"]["text"],
                            "nb": sp["clip"]["text"]},
                "leaf": {r: sp["clap"]["audio"] for r in ROLES},
                "base": {r: sp["clip"]["image"] for r in ROLES}}
    data = {r: train.ConcatRows([p[r] for p in stand_in.values()]) for r in ROLES}
    rows = len(data["c"])
    result = {"pool_rows": rows, "batch": 4096, "steps_per_epoch": -(-rows // 4096), "precisions": {}}
    for precision in _train_precisions(args.train_precisions):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        cfg = ExMCRConfig(precision=precision, epochs=1)
        head = DecoupledProjector(512, 512)
        step = make_step(head, cfg)
        batch = {r: train.batch_rows(data[r], torch.arange(4096) * (rows // 4096), torch.device("cpu")) for r in ROLES}
        gen = torch.Generator().manual_seed(0)
        # in-place addmm_ (the InfoNCE backward accumulates with it) is not in torch's table
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_flops}) as fc:
            with train.autocast_context(precision, torch.device("cpu")):
                loss, _ = step(batch, gen)
            loss.backward()
        flops = fc.get_total_flops()
        rate = gemm_rate(dtype)
        t0 = time.perf_counter()
        train.run(head, data, step, cfg.loop_settings(), progress=True, max_steps=args.train_steps,
                  desc=f"Ex-MCR train {precision}")
        dt = time.perf_counter() - t0
        s_per_step = dt / args.train_steps
        achieved = flops / s_per_step / 1e9
        result["precisions"][precision] = {
            "steps": args.train_steps, "seconds": round(dt, 1), "s_per_step": round(s_per_step, 3),
            "tuples_per_s": round(4096 / s_per_step), "flops_per_step": flops, "achieved_gflops": round(achieved, 1),
            "gemm_gflops": round(rate, 1), "ratio_to_gemm": round(achieved / rate, 3),
            "epoch_minutes": round(s_per_step * result["steps_per_epoch"] / 60, 1),
            "paper_schedule_hours": round(s_per_step * result["steps_per_epoch"] * 36 / 3600, 1)}
    return result


def run_stage(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    # this machine's speed moves by 10-15 % from run to run: the GEMM rate (of the groups' dtype) at both
    # ends of a stage says how fast it ran, so stages run apart can be compared
    dtype = getattr(torch, args.gemm_dtype)
    rates = [round(gemm_rate(dtype))]
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        result = {"world": stage_world, "exact": stage_exact, "aggregation": stage_aggregation, "bound": stage_bound, "groups": stage_groups,
                  "second": stage_second, "ray": stage_ray, "train": stage_train}[name](args)
        wall = time.perf_counter() - t0
    rates.append(round(gemm_rate(dtype)))
    result.update({"stage": name, "wall_s": round(wall, 1), **mem.summary(), f"gemm_{_short(args.gemm_dtype)}_gflops_start_end": rates,
                   "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "cpu": cpu_features(),
                   "native_bf16": native_bf16()})
    return result


def _totals_table(first: str, projected: dict) -> list[str]:
    return ["", f"| {first} | C-MCR pseudo pairs (h) | Ex-MCR, all pseudo data of one leaf (h) |", "| --- | ---: | ---: |",
            *(f"| {label} | {t['cmcr_pseudo_pairs_h']} | {t['exmcr_leaf_h']} |" for label, t in projected.items()), ""]


def tables(summary: dict) -> str:
    lines = []
    ex = summary.get("exact")
    if ex:
        lines += ["| hop (queries x memory) | dtype (kernel) | GFLOP/s | ratio to GEMM | cos to fp32 min | projected hop h |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for hop, h in ex["hops"].items():
            title = f"{hop} ({h['queries']:,} x {h['memory']:,})"
            for dtype in ("float32", "bfloat16"):
                r = h[dtype]
                cos = f"{r['cos_to_fp32']['min']:.6f}" if "cos_to_fp32" in r else "1"
                lines.append(f"| {title if dtype == 'float32' else ''} | "
                             f"{dtype} ({r['kernel']}) | {r['gflops']} | {r['ratio_to_gemm']} | {cos} | "
                             f"{r['projected_s'] / 3600:.1f} |")
        lines += _totals_table("exact", ex["projected"])
    agg = summary.get("aggregation")
    if agg:
        lines += ["| hop (queries x memory) | setting | probes / lists | work vs exact | cos to exact mean / p1 | "
                  "dropped mass mean | projected hop h |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for hop, h in agg["hops"].items():
            lines.append(f"| {hop} ({h['queries']:,} x {h['memory']:,}) | exact ({h['exact']['gflops']} GFLOP/s) | - | "
                         f"100 % | 1 | 0 | {h['exact']['projected_s'] / 3600:.1f} |")
            for label in SETTINGS:
                r = h[label]
                ran = " (runs exact)" if r.get("ran") == "exact" else ""
                lines.append(f"| | {label}{ran} | {r['probes']} / {h['lists']} | {100 * r['work_fraction']:.1f} % | "
                             f"{r['cosine_to_exact']['mean']:.5f} / {r['cosine_to_exact']['p1']:.4f} | "
                             f"{r['dropped_mass']['mean']:.3f} | {r['projected_s'] / 3600:.1f} |")
        lines += _totals_table("setting", agg["projected"])
    bound = summary.get("bound")
    if bound:
        lines += ["| hop (queries x memory) | target | rows a perfect selector needs: mean-target / per query (p99) "
                  "/ one top-k | share of memory | IVF rows | IVF / perfect |", "| --- | --- | ---: | ---: | ---: | ---: |"]
        for hop, h in bound["hops"].items():
            for t in ("0.99", "0.999"):
                r = h[t]
                first = f"| {hop if t == '0.99' else ''} | cos>={t} | "
                if r["mean_target"] is None:
                    lines.append(first + f"> {h['max_rows']:,} (--bound-max-rows) | | | |")
                    continue
                ivf = f"{r['ivf_rows']:,.0f} | {r['ivf_over_oracle']}x" if r["ivf_over_oracle"] else "- | -"
                lines.append(first + f"{r['mean_target']:,.0f} / {r['per_query_mean']:,.0f} ({r['per_query_p99']:,.0f}) "
                             f"/ {r['common']:,} | {100 * r['fraction']:.2f} % | {ivf} |")
        lines += ["", "| perfect selector, scoring only its rows | C-MCR pseudo pairs (min) | Ex-MCR, one leaf (min) |",
                  "| --- | ---: | ---: |"]
        for t, per in bound["projected"].items():
            for p, v in per.items():
                lines.append(f"| cos>={t} at the {p} GEMM rate ({bound['gemm_gflops'][p]} GFLOP/s) | "
                             f"{v['cmcr_pseudo_pairs_min']} | {v['exmcr_leaf_min']} |")
        lines.append("")
    grp = summary.get("groups")
    if grp:
        lines += ["| hop (queries x memory) | rows / groups | work vs exact | cos to exact mean / p1 / min | "
                  "queries/s | grouping + calibration s (check's reference) | projected hop h |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for hop, h in grp["hops"].items():
            c = h["cosine_to_exact"]
            lines.append(f"| {hop} ({h['queries']:,} x {h['memory']:,}) | {h['rows']:,} / {h['groups']:,} | "
                         f"{100 * h['rows_scanned_per_query'] / h['memory']:.1f} % | {c['mean']:.5f} / {c['p1']:.4f} / "
                         f"{c['min']:.4f} | {h['q_per_s']:,} | {h['grouping_s']} + {h['calibration_s']} "
                         f"({h.get('check_reference_s', '-')}) | "
                         f"{h['projected_s'] / 3600:.2f} |")
        if "projected" in grp:
            lines += _totals_table("setting", grp["projected"])
        lines += ["", "| hop | estimate vs check's error: rank correlation / error ÷ estimate² | "
                  + " | ".join(f"redo {100 * s:g} %: cos mean / p1 / min, + s" for s in REDO_SHARES) + " |",
                  "| --- | ---: |" + " ---: |" * len(REDO_SHARES)]
        for hop, h in grp["hops"].items():
            r = h.get("redo_projected")
            if r:
                q = r["estimate_on_the_check"] or {}
                lines.append(f"| {hop} | {q.get('rank_correlation', float('nan')):.3f} / "
                             f"{q.get('error_over_estimate_squared', float('nan')):.2f} | " + " | ".join(
                                 f"{r[str(s)]['mean']:.5f} / {r[str(s)]['p1']:.4f} / {r[str(s)]['min']:.4f}, "
                                 f"+{r[str(s)]['seconds']:.0f}" for s in REDO_SHARES) + " |")
    sec = summary.get("second")
    if sec:
        lines += ["", "| second hop (queries x memory) | first hop in full | rows / groups | cos to exact mean / p1 / min | "
                  "queries/s | grouping + calibration s | measured | projected from the first hops |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for hop, h in sec["hops"].items():
            c, like = h["cosine_to_exact"], (grp or {}).get("hops", {}).get(h["projected_as"])
            proj = f"{like['projected_s'] / like['queries'] * h['queries'] / 60:.1f} min" if like else "-"
            lines.append(f"| {hop} ({h['queries']:,} x {h['memory']:,}) | {h['first_hop_run_s'] / 60:.1f} min | "
                         f"{h['rows']:,} / {h['groups']:,} | {c['mean']:.5f} / {c['p1']:.4f} / {c['min']:.4f} | "
                         f"{h['q_per_s']:,} | {h['grouping_s']} + {h['calibration_s']} | "
                         f"{h['projected_s'] / 60:.1f} min | {proj} |")
        total = leaf_with_passes_in_full(grp or {}, sec)
        if total:
            lines += ["", f"One Ex-MCR leaf's pseudo data, its leaf and base passes run in full: {total['exmcr_leaf_min']} min "
                      f"({total['with_checks_min']} min with every check's fp32 reference)"]
        lines.append("")
    ray = summary.get("ray")
    if ray and ray.get("hops"):
        lines += [f"| hop in full (queries x memory), groups {_short(next(iter(ray['hops'].values())).get('gemm_dtype', 'bfloat16'))} "
                  "cos>=0.999 | local (its groups' pass) | Ray (shards, "
                  "CPUs) | Ray / local | same rows | rows differing | largest difference (float16 outputs) | on the driver alone "
                  "(bound on a cluster's speed-up) |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
        for hop, h in ray["hops"].items():
            passes = [h[b]["seconds"]["aggregation"] for b in ("local", "ray")]
            lines.append(f"| {hop} ({h['queries']:,} x {h['memory']:,}) | {h['local_s']} s ({passes[0]:.0f}) | "
                         f"{h['ray_s']} s ({passes[1]:.0f}; {h['shards']}, {h['cpus']}) | {h['ray_over_local']} | {h['same_rows']} | "
                         f"{h['differing_rows']:,} | {h['max_abs_difference_float16']:.2g} | "
                         f"{h['driver_serial_s']} s ({h['speedup_bound']}x) |")
        lines.append("")
    stage_rows = []
    for stage in STAGES:
        r = summary.get(stage)
        if r:
            short = next((k for k in ("bf16", "fp32") if f"gemm_{k}_gflops_start_end" in r), "bf16")
            rates = " / ".join(map(str, r.get(f"gemm_{short}_gflops_start_end", ["-"])))
            stage_rows.append(f"| {stage} | {r['wall_s']} | {r['peak_anon_rss_gib']} | {r['vm_hwm_gib']} | {short}: {rates} |")
    if stage_rows:
        lines += ["| stage | wall s | peak anon RSS GiB | VmHWM GiB | GEMM GFLOP/s, start / end |",
                  "| --- | ---: | ---: | ---: | ---: |", *stage_rows, ""]
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
    p.add_argument("--train-precisions", default="auto",
                   help="train stage: fp32, bf16 or fp32,bf16 (auto: fp32, and bf16 where the CPU has it in hardware: "
                        "bf16 in software runs ~7x slower than fp32 and measures the emulation, not the training)")
    p.add_argument("--block", type=int, default=65536, help="queries timed per hop and IVF setting")
    p.add_argument("--exact-block", type=int, default=2048, help="queries timed per hop with the exact kernel")
    p.add_argument("--bound-queries", type=int, default=256, help="queries per hop for the perfect-selector bound")
    p.add_argument("--bound-max-rows", type=int, default=65536, help="largest top-k the bound follows")
    p.add_argument("--groups-share", type=float, default=0.04,
                   help="share of a hop's queries (whole groups) timed by the groups stage")
    p.add_argument("--hops", default=None, help="groups and second stages: only these hops (indices into HOPS, e.g. 0,3; second: 2 and/or 3)")
    p.add_argument("--group-size", type=int, default=None, help="groups stage: IVFSettings.group_size (default its own)")
    p.add_argument("--redo", type=float, default=0.0, help="second and ray stages: IVFSettings.redo, the share of "
                   "queries of largest estimated error redone exactly (the groups stage projects several)")
    p.add_argument("--gemm-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="groups, second and ray stages: the GEMMs' dtype (auto: bf16 where the CPU has it in hardware, "
                        "else fp32; the README's figures are bf16)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache", default=None, help="pseudo-data cache (default: next to the world)")
    p.add_argument("--out", default="runs/bench/paper_scale")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    args = p.parse_args()
    from pairfree.memory import compute_dtype

    args.gemm_dtype = str(compute_dtype(args.gemm_dtype)).removeprefix("torch.")
    _train_precisions(args.train_precisions)  # a bad list fails here, not after the stages before train
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
    if not native_bf16():  # the exact stage's bf16 figures are bf16 GEMMs, and the others' where asked
        print(f"note: this CPU computes bfloat16 in software ({cpu_features()}): the bf16 figures here run several "
              f"times slower than float32's; the groups, second and ray stages run in {args.gemm_dtype}", flush=True)
    summary = {}
    for name in args.stages.split(","):
        cmd = [sys.executable, __file__, "--stage", name] + [a for a in sys.argv[1:]]
        print(f"== {name}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PAIRFREE_PROGRESS": os.environ.get("PAIRFREE_PROGRESS", "")})
        summary[name] = json.loads((out / f"{name}.json").read_text())
    for name in STAGES:
        if name not in summary and (out / f"{name}.json").exists():
            summary[name] = json.loads((out / f"{name}.json").read_text())
    total = leaf_with_passes_in_full(summary.get("groups", {}), summary.get("second", {}))
    if total:
        summary["leaf_with_passes_in_full"] = total
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(tables(summary))


if __name__ == "__main__":
    main()
