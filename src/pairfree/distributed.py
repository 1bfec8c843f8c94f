"""Memory aggregation over a Ray cluster: query shards as tasks, the memory placed once in the object store.

The aggregation is embarrassingly parallel over queries: every task gets a contiguous shard of the
queries and a reference to the memory (keys and values, `ray.put` once; on one node the tasks read
it from shared memory without copies) and runs the same local kernels, so the result equals the
local one up to float rounding (the tests hold it to 1e-6). For method "ivf" the driver builds the
partition and calibrates the probes once on its query sample, and puts the list-sorted memory in the
object store; the tasks only scan lists. With `IVFSettings(select="groups")` (`RayGroups`) grouping's
per-query work (nearest centroids, the moves of the farthest queries) runs as tasks of whole query
blocks and the cells' k-means splits as tasks of whole cells, calibration's and the check's exact
references as query shards, and the run as tasks of whole batches of groups against the memory in
its GEMM dtype, and calibration's kept selections as tasks of whole batches of its sample's groups;
the driver keeps what needs every query (the cells' and groups' sums, the order of the groups, the
trials' reading of the kept selections). Each block, cell and group is computed as one machine
computes it, so the result is the local one. The callers (C-MCR pseudo pairs, the Ex-MCR passes)
write the result to the same cache entries as the local path (`aggregation_backend: ray`).

Ray starts a local instance when none is running (`RAY_ADDRESS` connects to a cluster).
"""

from __future__ import annotations

import os
import time
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
    """values: "keys" (the keys themselves) or an object ref per value (see `_values`)."""
    from pairfree.memory import aggregate

    return aggregate(queries, keys, _values(keys, values), **kwargs)


def _ivf_shard(queries, keys_sorted, values_sorted, partition, probes, tau, query_block, dtype):
    from pairfree.ivf import ProbedMemory
    from pairfree.memory import host_rows

    mem = ProbedMemory.from_sorted(keys_sorted, values_sorted, partition, torch.device("cpu"), dtype)
    outs = [np.empty((len(queries), mem.width(i)), dtype=np.float32) for i in range(len(values_sorted))]
    for s in range(0, len(queries), query_block):
        q = torch.from_numpy(host_rows(queries, slice(s, s + query_block)))
        res, _ = mem.aggregate(q, probes, tau)
        for out, r in zip(outs, res):
            out[s : s + len(r)] = r.numpy()
    return outs


def _shareable(x) -> np.ndarray:
    """A memory as a numpy array for the object store, without a copy where it is one already (a CPU tensor;
    bfloat16 as its int16 bits, which `_unshared` views back; a memory map is read once, into the store)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def _unshared(a: np.ndarray) -> torch.Tensor:
    """`_shareable`'s inverse (int16 holds bfloat16's bits: no memory is int16)."""
    from pairfree.memory import as_tensor

    t = as_tensor(a)
    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t


def _values(keys: torch.Tensor, values: list) -> list[torch.Tensor]:
    """A task's values: None or "keys" for the keys themselves, else an object ref (refs inside a list
    reach the task unresolved, which keeps each memory a single shared copy)."""
    import ray

    return [keys if v is None or isinstance(v, str) else _unshared(ray.get(v)) for v in values]


def _reference_shard(q: np.ndarray, keys: np.ndarray, values: list, tau: float, dtype: torch.dtype,
                     resident_bytes: int) -> list:
    """Exact aggregates (unnormalised) of a shard of calibration's or the check's sample queries."""
    from pairfree.memory import aggregate

    k = _unshared(keys)
    return aggregate(q, k, _values(k, values), tau=tau, normalize=False, dtype=dtype, backend="local",
                     resident_bytes=resident_bytes)


def _groups_shard(q: np.ndarray, ids: np.ndarray, lengths: np.ndarray, keys: np.ndarray, values: list,
                  dtype: torch.dtype, seed: int, rows: int, tau: float, tail: str, batch: int, estimate: bool):
    """One shard of groups: `q` their queries in group order, `ids` those queries' indices among all, each
    group `lengths` long. Returns the results (one float32 array per value, rows aligned with `ids`) and
    the scores computed, and with `estimate` each query's estimated error (else None)."""
    from pairfree.grouped import GroupedMemory
    from pairfree.memory import put_rows

    k = _unshared(keys)
    gm = GroupedMemory(k, _values(k, values), torch.device("cpu"), dtype, seed)
    groups = np.split(np.arange(len(q)), np.cumsum(lengths)[:-1])
    outs = [np.empty((len(q), gm.value(i).shape[1]), dtype=np.float32) for i in range(len(values))]
    errors = np.empty(len(q), dtype=np.float32) if estimate else None

    def sink(g: np.ndarray, res: list[torch.Tensor], err: torch.Tensor | None) -> None:
        for o, r in zip(outs, res):
            put_rows(o, g, r)
        if errors is not None:
            errors[g] = err.numpy()

    scored = gm.aggregate(q, groups, rows, tau, tail, batch=batch, sink=sink, ids=ids, estimate=estimate)
    return outs, scored, errors


def _kept_shard(q: np.ndarray, ids: np.ndarray, lengths: np.ndarray, members: list, keys: np.ndarray, values: list,
                dtype: torch.dtype, seed: int, rows: int, tau: float, tail: str) -> dict:
    """Calibration's `KeptSelections` of one shard of the sample's groups (as `_groups_shard` takes them;
    `members`: each group's sample queries, indices among all): its state, for the driver's trials."""
    from pairfree.grouped import GroupedMemory, KeptSelections

    k = _unshared(keys)
    gm = GroupedMemory(k, _values(k, values), torch.device("cpu"), dtype, seed)
    groups = np.split(np.arange(len(q)), np.cumsum(lengths)[:-1])
    return KeptSelections(gm, q, groups, members, rows, tau, tail, ids=ids).state()


def _blocks_shard(q: np.ndarray, per_row: np.ndarray | None, fn, block: int, args: tuple) -> np.ndarray:
    """`fn(rows, per_row's rows or None, *args)` over a shard of queries (as stored) in blocks of `block`."""
    from pairfree.memory import host_rows

    out = []
    for s in range(0, len(q), block):
        x = torch.from_numpy(host_rows(q, slice(s, s + block)))
        out.append(fn(x, *(() if per_row is None else (torch.from_numpy(per_row[s : s + block]),)), *args))
    return torch.cat(out).numpy()


def _splits_shard(cells: list[np.ndarray], indices: list[np.ndarray], size: int, iters: int) -> list:
    """`grouped._split` of each cell (its queries as stored, their indices): per cell, its parts'
    (indices, sums)."""
    from pairfree.grouped import _split
    from pairfree.memory import host_rows

    return [[(part, total.numpy()) for part, total in _split(torch.from_numpy(host_rows(x, slice(None))), idx, size,
                                                             iters)]
            for x, idx in zip(cells, indices)]


def _stored(queries, rows) -> np.ndarray:
    """Queries' rows to send to a task: numpy rows in their own dtype (float16 stores: half the bytes; the
    task converts them), tensors as float32."""
    from pairfree.memory import host_rows

    return host_rows(queries, rows) if isinstance(queries, torch.Tensor) else np.asarray(queries[rows])


def group_shards(sizes: np.ndarray, shards: int, batch: int) -> list[tuple[int, int]]:
    """(first, end) group of each shard: whole batches of `batch` groups (a task scores the same batches of
    means as one machine would), about equal in queries."""
    if not len(sizes):
        return []
    load = np.cumsum(np.add.reduceat(sizes, np.arange(0, len(sizes), batch)))  # queries up to each batch's end
    cuts = np.searchsorted(load, load[-1] * np.arange(1, shards) / shards, side="right") * batch
    bounds = np.unique(np.concatenate([[0], np.minimum(cuts, len(sizes)), [len(sizes)]]))
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


class RayGroups:
    """Runs `grouped_aggregate`'s grouping, calibration's exact references and groups as Ray tasks
    (`runner=`): each memory put once (the GEMM dtype's copy for the groups and calibration, the given one
    for the check's fp32 reference), each groups task a run of whole batches of groups with their queries;
    at most two tasks per CPU in flight, so the queries gathered for them stay bounded."""

    def __init__(self, shards: int | None = None, max_queries: int = 262144):
        self.ray = _ray()
        self.cpus = max(1, int(self.ray.cluster_resources().get("CPU", 1)))
        self.requested, self.max_queries = shards, max_queries
        self.shards = 0
        self.in_tasks = 0.0  # wall seconds spent in task sections (what a larger cluster shortens)
        self._refs: dict[int, tuple[Any, Any]] = {}

    def _put(self, x):
        """The object ref of memory `x`, put once (held with `x`, so its id is not reused)."""
        hit = self._refs.get(id(x))
        if hit is None or hit[0] is not x:
            hit = self._refs[id(x)] = (x, self.ray.put(_shareable(x)))
        return hit[1]

    def _value_refs(self, keys, values: list) -> list:
        return [None if v is None or v is keys else self._put(v) for v in values]

    def reference(self, q: np.ndarray, keys, values: list, *, tau: float, dtype: torch.dtype,
                  keep: bool = True, resident_bytes: int = 4 << 30) -> list[torch.Tensor]:
        """Exact aggregates (unnormalised, fp32) of sample queries `q` against `keys`/`values`, as query shards:
        calibration's reference and the check's (a quarter of a hop's time on the driver at paper scale
        before they ran here). `keep`: leave the memories put for later tasks (the GEMM dtype's copy, which
        the groups read); the check's float16 or float32 memory is released after it (at paper scale ~5 GB
        of the object store on a two-value hop)."""
        task = self.ray.remote(_reference_shard)
        fresh = [x for x in (keys, *values) if x is not None and id(x) not in self._refs]
        keys_ref, vals = self._put(keys), self._value_refs(keys, values)
        bounds = np.unique(np.linspace(0, len(q), min(self.requested or self.cpus, len(q)) + 1).astype(int))
        done = dict(self._each(list(zip(bounds[:-1], bounds[1:])),
                               lambda job: task.remote(q[job[0] : job[1]], keys_ref, vals, tau, dtype, resident_bytes)))
        parts = [done[job] for job in zip(bounds[:-1], bounds[1:])]
        if not keep:
            for x in fresh:
                self._refs.pop(id(x), None)
        return [torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in range(len(values))]

    def _each(self, jobs: list, submit):
        """(job, result) of `submit(job)` (an object ref) for every job, in the order they finish, at most two
        per CPU in flight (what a job gathers to send stays bounded)."""
        todo, pending = list(jobs), {}
        t0 = time.perf_counter()
        while todo or pending:
            while todo and len(pending) < 2 * self.cpus:
                job = todo.pop(0)
                pending[submit(job)] = job
            done, _ = self.ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), self.ray.get(done[0])
        self.in_tasks += time.perf_counter() - t0

    def per_block(self, queries, block: int, fn, args: tuple, per_row: np.ndarray | None = None) -> np.ndarray:
        """`fn(rows (fp32), per_row's rows, *args)` over the queries in blocks of `block` rows, concatenated:
        grouping's nearest centroids and moves. Tasks take whole blocks, so each block is the one a local
        run computes (the same result)."""
        step = block * max(1, self.max_queries // block)
        task = self.ray.remote(_blocks_shard)

        def submit(a: int):
            return task.remote(_stored(queries, slice(a, a + step)), None if per_row is None else per_row[a : a + step],
                               fn, block, args)

        starts = list(range(0, queries.shape[0], step))
        done = dict(self._each(starts, submit))
        return np.concatenate([done[a] for a in starts]) if starts else np.empty(0, dtype=np.int64)

    def splits(self, queries, cells: list[np.ndarray], size: int, iters: int) -> list:
        """`grouped._split` of each cell (indices into the queries), as tasks of whole cells, about
        `max_queries` queries each: per cell, its parts' (indices, sums)."""
        task = self.ray.remote(_splits_shard)
        jobs, first, held = [], 0, 0
        for j, cell in enumerate(cells):
            held += len(cell)
            if held >= self.max_queries or j == len(cells) - 1:
                jobs.append((first, j + 1))
                first, held = j + 1, 0

        def submit(job: tuple[int, int]):
            return task.remote([_stored(queries, c) for c in cells[job[0] : job[1]]], cells[job[0] : job[1]], size, iters)

        done = dict(self._each(jobs, submit))
        return [[(part, torch.from_numpy(total)) for part, total in cell] for job in jobs for cell in done[job]]

    def groups(self, gm, queries, groups, rows: int, tau: float, tail: str, sink, batch: int = 64,
               estimate: bool = False) -> int:
        from pairfree.memory import as_tensor

        sizes = np.array([len(g) for g in groups])
        n = int(sizes.sum())
        want = self.requested or max(self.cpus, -(-n // self.max_queries))
        cuts = group_shards(sizes, want, batch)
        self.shards = len(cuts)
        keys_ref, vals = self._put(gm.keys), self._value_refs(gm.keys, gm.values)
        task = self.ray.remote(_groups_shard)

        def submit(job: tuple[int, int]):
            a, b = job
            ids = np.concatenate(groups[a:b])
            return task.remote(_stored(queries, ids), ids, sizes[a:b], keys_ref, vals, gm.dtype, gm.seed, rows, tau,
                               tail, batch, estimate)

        scored = 0
        for (a, b), (outs, count, errors) in self._each(cuts, submit):
            sink(np.concatenate(groups[a:b]), [as_tensor(o) for o in outs], None if errors is None else as_tensor(errors))
            scored += count
        return scored

    def kept(self, gm, queries, groups: list[np.ndarray], members: list[np.ndarray], rows: int, tau: float,
             tail: str, batch: int = 64):
        """Calibration's `KeptSelections` of the sample's `groups` (their sample queries `members`), built as
        tasks of whole batches of groups, as `groups` runs them (each group's selection and sums are the
        ones one machine computes), and joined here, where the trials read them. Sampled, what comes back
        is ~65 fp32 rows per sample query and value (~270 MB for 1000 queries of a two-value hop)."""
        from pairfree.grouped import KeptSelections

        sizes = np.array([len(g) for g in groups])
        cuts = group_shards(sizes, self.requested or self.cpus, batch)
        keys_ref, vals = self._put(gm.keys), self._value_refs(gm.keys, gm.values)
        task = self.ray.remote(_kept_shard)

        def submit(job: tuple[int, int]):
            a, b = job
            ids = np.concatenate(groups[a:b])
            return task.remote(_stored(queries, ids), ids, sizes[a:b], members[a:b], keys_ref, vals, gm.dtype,
                               gm.seed, rows, tau, tail)

        done = dict(self._each(cuts, submit))
        return KeptSelections.joined(gm, [done[job] for job in cuts], rows, tau, tail)

    def exact(self, queries, keys, values: list, *, tau: float, outs: list[np.ndarray], normalize: bool,
              progress: bool | str, dtype: torch.dtype) -> None:
        """The exact fallback, as query shards."""
        rep: dict = {}
        ray_aggregate(queries, keys, values, shards=self.requested, tau=tau, normalize=normalize,
                      progress=progress, out=outs, dtype=dtype, report=rep)
        self.shards = rep["shards"]


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
    """`memory.aggregate` with query shards as Ray tasks (one per CPU of the cluster by default). dtype
    "auto" is resolved here, by the driver's CPU, so that every task computes in the same dtype."""
    from pairfree.memory import as_tensor, choose_method, compute_dtype, output_arrays, store_rows
    from pairfree.progress import progress as progress_bar

    kwargs["dtype"] = compute_dtype(kwargs.get("dtype", torch.float32), "cpu")
    ray = _ray()
    as_list = isinstance(values, (list, tuple))
    vals = list(values) if as_list else [keys if values is None else values]
    n, m = queries.shape[0], keys.shape[0]
    if method == "auto":
        method = choose_method(n, m)
    info: dict[str, Any] = {"method": method, "queries": n, "memory": m, "backend": "ray"}
    if method == "ivf" and ivf is not None and ivf.select == "groups":
        from pairfree.ivf import ivf_aggregate

        outs = output_arrays(out, n, [v.shape[1] for v in vals])
        runner = RayGroups(shards)
        ivf_aggregate(queries, keys, vals, tau=kwargs.get("tau", 0.01), settings=ivf, device=torch.device("cpu"),
                      report=info, outs=outs, normalize=normalize, progress=progress,
                      dtype=kwargs["dtype"], runner=runner)
        info.update(shards=runner.shards, seconds_in_ray_tasks=round(runner.in_tasks, 3))
        if report is not None:
            report.update(info)
        return outs if as_list else outs[0]
    shards = shards or max(1, int(ray.cluster_resources().get("CPU", 1)))
    bounds = shard_bounds(n, shards)
    info["shards"] = len(bounds) - 1
    q = _array(queries)
    if method == "ivf":
        from pairfree.ivf import IVFSettings, ProbedMemory, calibrate, cached_partition, exact_fallback, ran_exact

        settings = ivf or IVFSettings()
        dev = torch.device("cpu")
        dt = kwargs["dtype"]
        part = cached_partition(keys, settings.n_lists(m), settings, dev)
        mem = ProbedMemory(keys, vals, part, dev, dt)
        cal = calibrate(mem, queries, kwargs.get("tau", 0.01), settings)
        info["lists"] = len(part.offsets) - 1
        if cal["rows_scanned_per_query"] > settings.exact_above * m:  # as the local path: exact is faster
            method = "exact"
            info.update({**ran_exact(cal), "why": exact_fallback(n, m, cal["rows_scanned_per_query"], settings)})
        else:
            info.update(cal)
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
