"""Memory aggregation: agg(q, M) = normalize(softmax(q·Mᵀ/τ) · M), in bounded memory.

At paper scale (2.3M queries against 1-2M memory rows) the N x M score matrix never fits, so the
softmax is computed online over memory chunks (running max + rescaled sums, as in flash attention):
peak memory is one (query_chunk x memory_chunk) score block plus the (query_chunk x d) accumulators,
independent of N and M. The work is two GEMMs per block, so it runs close to the matmul rate.

`keys` decide the weights, `values` are what gets averaged; they default to the same memory. Ex-MCR
carries weights computed on one space's texts over to the aligned texts of another space, which is
`aggregate(q, keys=T_a, values=[T_a, T_b])`.

`method="topk"` keeps only the k largest scores per query (exact top-k, chunked); with τ = 0.01 the
discarded softmax mass is tiny. It is an approximation: measure it against "exact" (see
benchmarks/aggregate.py) before relying on it.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Sequence

import numpy as np
import torch

from pairfree.progress import progress as progress_bar

Array = "np.ndarray | torch.Tensor"


def as_tensor(a) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, memory-mapped) array; pairfree never writes to it."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read
        return torch.from_numpy(np.ascontiguousarray(a))


def _rows(x, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return as_tensor(x[start:stop]).to(device=device, dtype=dtype, non_blocking=True)


def _resident(x, device: torch.device, dtype: torch.dtype, max_bytes: int):
    """Move a memory to the compute device once when it fits the budget; else stream it chunk-wise."""
    n, d = x.shape
    if n * d * torch.finfo(dtype).bits // 8 <= max_bytes:
        return _rows(x, 0, n, device, dtype)
    return x


def aggregate(
    queries,
    keys,
    values=None,
    *,
    tau: float = 0.01,
    method: str = "exact",
    k: int = 256,
    query_chunk: int = 4096,
    memory_chunk: int = 32768,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    resident_bytes: int = 2 << 30,
    normalize: bool = True,
    progress: bool | str = False,
) -> np.ndarray | list[np.ndarray]:
    """Softmax-weighted average of memory rows for each query.

    queries (N, d) and keys (M, d): unit rows (numpy, memory-mapped numpy or torch). values: None
    (use keys), one (M, dv) array or a list of them, rows aligned with keys. Returns float32 numpy
    (N, dv), re-normalised unless normalize=False; a list when values is a list.
    """
    if method not in ("exact", "topk"):
        raise ValueError(f"aggregate: method must be 'exact' or 'topk', got {method!r}")
    if tau <= 0:
        raise ValueError(f"aggregate: tau must be > 0, got {tau}")
    as_list = isinstance(values, (list, tuple))
    vals: Sequence = list(values) if as_list else [keys if values is None else values]
    n, d = queries.shape
    m = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"aggregate: queries have dim {d} but keys have dim {keys.shape[1]}")
    for i, v in enumerate(vals):
        if v.shape[0] != m:
            raise ValueError(f"aggregate: values[{i}] has {v.shape[0]} rows, keys have {m}; rows must align")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    keys_r = _resident(keys, dev, dtype, resident_bytes)
    vals_r = [keys_r if v is keys else _resident(v, dev, dtype, resident_bytes) for v in vals]
    outs = [np.empty((n, v.shape[1]), dtype=np.float32) for v in vals]
    desc = progress if isinstance(progress, str) else "aggregate"
    bar = progress_bar(n, desc, bool(progress), unit="q")
    for qs in range(0, n, query_chunk):
        q = _rows(queries, qs, min(qs + query_chunk, n), dev, dtype) / tau
        if method == "exact":
            res = _exact_block(q, keys_r, vals_r, m, memory_chunk, dev, dtype)
        else:
            res = _topk_block(q, keys_r, vals_r, m, min(k, m), memory_chunk, dev, dtype)
        for out, r in zip(outs, res):
            if normalize:
                r = torch.nn.functional.normalize(r, dim=-1)
            out[qs : qs + len(r)] = r.float().cpu().numpy()
        bar.update(len(q))
    bar.close()
    return outs if as_list else outs[0]


def _exact_block(q, keys, vals, m, chunk, dev, dtype):
    """Online softmax over memory chunks: acc = Σ exp(s - run_max) v, rescaled when the max grows."""
    nq = q.shape[0]
    run_max = torch.full((nq, 1), -math.inf, device=dev, dtype=torch.float32)
    run_sum = torch.zeros((nq, 1), device=dev, dtype=torch.float32)
    accs = [torch.zeros((nq, v.shape[1]), device=dev, dtype=torch.float32) for v in vals]
    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        kb = _rows(keys, ms, me, dev, dtype)
        s = (q @ kb.T).float()
        new_max = torch.maximum(run_max, s.amax(dim=1, keepdim=True))
        scale = torch.exp(run_max - new_max)
        p = torch.exp(s - new_max)
        run_sum = run_sum * scale + p.sum(dim=1, keepdim=True)
        pb = p.to(dtype)
        for i, v in enumerate(vals):
            vb = kb if v is keys else _rows(v, ms, me, dev, dtype)
            accs[i] = accs[i] * scale + (pb @ vb).float()
        run_max = new_max
    return [a / run_sum for a in accs]


def _topk_block(q, keys, vals, m, k, chunk, dev, dtype):
    """Exact top-k scores by chunked merge, then softmax over those k and gather their values."""
    nq = q.shape[0]
    best_s = torch.full((nq, 0), -math.inf, device=dev)
    best_i = torch.zeros((nq, 0), device=dev, dtype=torch.long)
    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        s = (q @ _rows(keys, ms, me, dev, dtype).T).float()
        cs, ci = s.topk(min(k, me - ms), dim=1)
        best_s, pos = torch.cat([best_s, cs], 1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
        best_i = torch.cat([best_i, ci + ms], 1).gather(1, pos)
    w = torch.softmax(best_s, dim=1)
    out = []
    for v in vals:
        idx = best_i.reshape(-1).cpu()
        rows = v[idx.numpy()] if isinstance(v, np.ndarray) else v[idx.to(v.device)]
        rows = torch.as_tensor(np.asarray(rows)) if isinstance(rows, np.ndarray) else rows
        rows = rows.to(dev, torch.float32).reshape(nq, k, -1)
        out.append(torch.einsum("nk,nkd->nd", w, rows))
    return out


def aggregate_dense(queries, keys, values=None, tau: float = 0.01) -> np.ndarray:
    """Direct O(N·M)-memory reference implementation, for tests and small inputs only."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
    kk = torch.as_tensor(np.asarray(keys), dtype=torch.float64)
    v = kk if values is None else torch.as_tensor(np.asarray(values), dtype=torch.float64)
    w = torch.softmax(q @ kk.T / tau, dim=1)
    return torch.nn.functional.normalize(w @ v, dim=-1).float().numpy()


def cached_aggregate(cache_dir, queries, keys, values=None, **kwargs):
    """`aggregate`, memoised on disk by the content of its inputs and its settings.

    The aggregation dominates the cost at scale (hours at paper size) and is identical across
    training runs that only change the projector or the losses, so it is worth keeping.
    """
    if cache_dir is None:
        return aggregate(queries, keys, values, **kwargs)
    from pathlib import Path

    from pairfree.fileio import save_npy
    from pairfree.space import fingerprint

    as_list = isinstance(values, (list, tuple))
    vals = list(values) if as_list else [keys if values is None else values]
    settings = {k: kwargs.get(k) for k in ("tau", "method", "k", "normalize")}
    if settings["method"] != "topk":
        settings.pop("k")
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for a in (queries, keys, *vals):
        h.update(fingerprint(np.asarray(a) if not isinstance(a, np.ndarray) else a).encode())
    paths = [Path(cache_dir) / f"agg-{h.hexdigest()[:24]}-{i}.npy" for i in range(len(vals))]
    outs = [load_cached(p, (queries.shape[0], v.shape[1])) for p, v in zip(paths, vals)]
    if any(o is None for o in outs):
        outs = aggregate(queries, keys, vals, **kwargs)
        for p, o in zip(paths, outs):
            save_npy(p, o)
    return outs if as_list else outs[0]


def load_cached(path, shape: tuple[int, int]) -> np.ndarray | None:
    """A cached float32 array of exactly `shape` with finite values, or None (missing, truncated,
    another shape or dtype, NaN): the caller then recomputes it and overwrites the entry."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if a.shape != tuple(shape) or a.dtype != np.float32:
        return None
    for start in range(0, a.shape[0], 65536):
        if not np.isfinite(a[start : start + 65536]).all():
            return None
    return a
