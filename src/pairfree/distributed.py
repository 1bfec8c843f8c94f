"""Memory aggregation over a Ray cluster: query shards as tasks, the memory placed once in the object store.

The aggregation is embarrassingly parallel over queries: every task gets a contiguous shard of the
queries and a reference to the memory (keys and values, `ray.put` once; on one node the tasks read
it from shared memory without copies) and runs the same local kernels, so the result equals the
local one up to float rounding (the tests hold it to 1e-6). For method "ivf" the driver builds the
partition and calibrates the probes once on its query sample, and puts the list-sorted memory in the
object store; the tasks only scan lists. The callers (C-MCR pseudo pairs, the Ex-MCR passes) write
the result to the same cache entries as the local path (`aggregation_backend: ray`).

Ray starts a local instance when none is running (`RAY_ADDRESS` connects to a cluster).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("aggregation_backend 'ray' needs Ray: pip install 'pairfree[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    return ray


def _array(x) -> np.ndarray:
    """A numpy array Ray can put (a memory map is read once, here, into the object store)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _exact_shard(queries, keys, values, kwargs):
    """values: "keys" (the keys themselves) or an object ref per value; refs inside a list reach the
    task unresolved, which keeps each value a single shared copy."""
    import ray

    from pairfree.memory import aggregate

    vals = [keys if isinstance(v, str) else ray.get(v) for v in values]
    return aggregate(queries, keys, vals, **kwargs)


def _ivf_shard(queries, keys_sorted, values_sorted, partition, probes, tau, query_block, dtype):
    from pairfree.ivf import ProbedMemory

    mem = ProbedMemory.from_sorted(keys_sorted, values_sorted, partition, torch.device("cpu"), dtype)
    outs = [np.empty((len(queries), mem.width(i)), dtype=np.float32) for i in range(len(values_sorted))]
    for s in range(0, len(queries), query_block):
        q = torch.from_numpy(np.asarray(queries[s : s + query_block], dtype=np.float32))
        res, _ = mem.aggregate(q, probes, tau)
        for out, r in zip(outs, res):
            out[s : s + len(r)] = r.numpy()
    return outs


def shard_bounds(n: int, shards: int) -> np.ndarray:
    """Contiguous query shards, cut at multiples of the exact kernel's query block where n allows, so
    each query is scored in a block of the same shape as on one machine (the same result)."""
    from pairfree.memory import CPU_SCORE_BLOCK

    align = CPU_SCORE_BLOCK[0]
    bounds = np.linspace(0, n, min(shards, n) + 1)
    if n >= align:
        bounds = np.round(bounds / align) * align
        bounds[-1] = n
    return np.unique(bounds.astype(int))


def ray_aggregate(queries, keys, values=None, *, shards: int | None = None, method: str = "exact",
                  normalize: bool = True, progress: bool | str = False, ivf: Any = None,
                  report: dict | None = None, out=None, **kwargs) -> np.ndarray | list[np.ndarray]:
    """`memory.aggregate` with query shards as Ray tasks (one per CPU of the cluster by default)."""
    from pairfree.memory import as_tensor, choose_method, output_arrays, store_rows
    from pairfree.progress import progress as progress_bar

    ray = _ray()
    as_list = isinstance(values, (list, tuple))
    vals = list(values) if as_list else [keys if values is None else values]
    n, m = queries.shape[0], keys.shape[0]
    if method == "auto":
        method = choose_method(n, m)
    shards = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
    bounds = shard_bounds(n, shards)
    q = _array(queries)
    info: dict[str, Any] = {"method": method, "queries": n, "memory": m, "backend": "ray", "shards": len(bounds) - 1}
    if method == "ivf":
        from pairfree.ivf import IVFSettings, ProbedMemory, calibrate, cached_partition
        from pairfree.memory import compute_dtype

        settings = ivf or IVFSettings()
        if settings.select != "lists":
            raise ValueError(f"aggregate(backend='ray'): IVFSettings(select={settings.select!r}) runs locally only; "
                             "use select='lists' on Ray")
        dev = torch.device("cpu")
        dt = compute_dtype(kwargs.get("dtype", torch.float32))
        part = cached_partition(keys, settings.n_lists(m), settings, dev)
        mem = ProbedMemory(keys, vals, part, dev, dt)
        cal = calibrate(mem, queries, kwargs.get("tau", 0.01), settings)
        info.update({"lists": len(part.offsets) - 1, **cal})
        if cal["rows_scanned_per_query"] > settings.exact_above * m:  # as the local path: exact is faster
            method = "exact"
            info.update({"ran": "exact", "work_fraction": 1.0})
        else:
            keys_ref = ray.put(mem.keys.numpy())
            vals_ref = ray.put([None if v is None else v.numpy() for v in mem.values])
            task = ray.remote(_ivf_shard)
            futures = [task.remote(q[a:b], keys_ref, vals_ref, part, cal["probes"], kwargs.get("tau", 0.01),
                                   settings.query_block, dt) for a, b in zip(bounds[:-1], bounds[1:])]
        del mem
    if method != "ivf":
        keys_np = _array(keys)
        keys_ref = ray.put(keys_np)
        val_refs = ["keys" if v is keys else ray.put(_array(v)) for v in vals]
        task = ray.remote(_exact_shard)
        local = {**kwargs, "method": method, "normalize": False, "progress": False, "backend": "local"}
        futures = [task.remote(q[a:b], keys_ref, val_refs, local) for a, b in zip(bounds[:-1], bounds[1:])]
    outs = output_arrays(out, n, [v.shape[1] for v in vals])
    bar = progress_bar(n, progress if isinstance(progress, str) else "aggregate (ray)", bool(progress), unit="q")
    pending = dict(zip(futures, zip(bounds[:-1], bounds[1:])))
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        a, b = pending.pop(done[0])
        store_rows(outs, a, [as_tensor(r) for r in ray.get(done[0])], normalize)
        bar.update(b - a)
    bar.close()
    if report is not None:
        report.update(info)
    return outs if as_list else outs[0]
