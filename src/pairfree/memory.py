"""Memory aggregation: agg(q, M) = normalize(softmax(q·Mᵀ/τ) · M), in bounded memory.

At paper scale (2.3M queries against 1-2M memory rows) the N x M score matrix never fits. Methods:

- "exact": the full softmax. Kernels: "sdpa" is torch's fused attention (`scaled_dot_product_attention`
  with scale 1/τ computes exactly softmax(q·Mᵀ/τ)·M without materialising the scores; on CPU the
  flash kernel also returns the log-sum-exp, so memories larger than `resident_bytes` stream through
  it in chunks that are merged exactly); "chunked" is our own online softmax over memory chunks
  (running max + rescaled sums, as in flash attention), the fallback wherever no fused kernel takes
  the shapes (e.g. CUDA flash attention stops at head dim 256). bf16 / fp16 compute keeps fp32
  accumulation; the chunked kernel also shifts each score by the running maximum *inside* the GEMM
  (one extra column), so the scores that carry the weight are not rounded to 8 bits.
- "ivf": approximate, for large memories (`pairfree.ivf`): the memory is partitioned by k-means
  (faiss), each query scores exactly, in fp32, every row of the lists it probes, and the number of
  probes is calibrated on a query sample so that the dropped softmax mass stays under a bound;
  the achieved accuracy is measured against exact and reported. With `IVFSettings(select="groups")`
  each group of nearby queries shares one row selection instead (`pairfree.grouped`).
- "topk": exact top-k scores per query (chunked), re-scored in fp32, softmax over those k.
- "auto": "exact" up to `AUTO_EXACT_PAIRS` query x memory pairs, "ivf" above.

`keys` decide the weights, `values` are what gets averaged; they default to the same memory. Ex-MCR
carries weights computed on one space's texts over to the aligned texts of another space, which is
`aggregate(q, keys=T_a, values=[T_a, T_b])`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from pairfree.progress import progress as progress_bar

METHODS = ("auto", "exact", "topk", "ivf")
KERNELS = ("auto", "sdpa", "chunked")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")
#: above this many query x memory pairs (e.g. 200k x 250k), method="auto" approximates with "ivf"
AUTO_EXACT_PAIRS = 5e10


def as_tensor(a) -> torch.Tensor:
    """Zero-copy tensor view of a (possibly read-only, memory-mapped) array; pairfree never writes to it."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read
        return torch.from_numpy(np.ascontiguousarray(a))


def host_rows(x, rows) -> np.ndarray:
    """Rows of a numpy / memory-mapped array or a torch tensor (any device, any float dtype) as float32 numpy.
    Numpy rows of another dtype are gathered as they are and converted by torch: numpy converts float16
    one value at a time (1.2-1.8 s per 262,144 rows of d = 512 against torch's 0.15-0.2, the same values),
    and the groups path reads every query of a hop three times."""
    if isinstance(x, torch.Tensor):
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(rows).to(x.device)
        return x[rows].detach().to("cpu", torch.float32).numpy()
    a = np.asarray(x[rows])
    if a.dtype == np.float32:
        return a
    if a.dtype in (np.float16, np.float64):
        return as_tensor(a).float().numpy()
    return a.astype(np.float32)


def host_array(a) -> np.ndarray:
    """A numpy array of `a` for fingerprinting: tensors come to the host (bfloat16 as float32)."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy()
    return np.asarray(a)


def _rows(x, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return as_tensor(x[start:stop]).to(device=device, dtype=dtype, non_blocking=True)


def _resident(x, device: torch.device, dtype: torch.dtype, max_bytes: int):
    """Move a memory to the compute device once when it fits the budget; else stream it chunk-wise."""
    n, d = x.shape
    if n * d * torch.finfo(dtype).bits // 8 <= max_bytes:
        return _rows(x, 0, n, device, dtype)
    return x


def compute_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The GEMM dtype asked for; "auto": bfloat16 where `device` (default CPU) computes it in hardware,
    else float32 (`devices.native_bf16`: in software bf16 is several times slower than float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"aggregate: dtype must be one of {list(COMPUTE_DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        from pairfree.devices import native_bf16

        return torch.bfloat16 if native_bf16(device if device is not None else "cpu") else torch.float32
    return getattr(torch, dtype)


def choose_method(n: int, m: int) -> str:
    """What method="auto" runs for n queries against m memory rows."""
    if n * m <= AUTO_EXACT_PAIRS:
        return "exact"
    from pairfree.ivf import faiss_available

    if not faiss_available():
        warnings.warn(f"aggregate: {n} x {m} pairs would use method='ivf', which needs faiss "
                      "(pip install 'pairfree[faiss]'); running the exact aggregation instead", stacklevel=3)
        return "exact"
    return "ivf"


def aggregate(
    queries,
    keys,
    values=None,
    *,
    tau: float = 0.01,
    method: str = "exact",
    k: int = 256,
    query_chunk: int = 4096,
    memory_chunk: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    kernel: str = "auto",
    resident_bytes: int = 4 << 30,
    normalize: bool = True,
    progress: bool | str = False,
    ivf: Any = None,
    report: dict | None = None,
    backend: str = "local",
    out=None,
) -> np.ndarray | list[np.ndarray]:
    """Softmax-weighted average of memory rows for each query.

    queries (N, d) and keys (M, d): unit rows (numpy, memory-mapped numpy or torch; float32, float16
    or bfloat16). values: None (use keys), one (M, dv) array or a list of them, rows aligned with keys.
    Returns float32 numpy (N, dv), re-normalised unless normalize=False; a list when values is a list.
    `ivf`: `pairfree.ivf.IVFSettings` for method "ivf"/"auto". `report`: a dict that receives what was
    run (method, kernel) and, for "ivf", the measured dropped mass and cosine to exact.
    `backend="ray"` runs query shards as Ray tasks (`pairfree.distributed`), with the same result.
    `out`: preallocated (N, dv) arrays (float32 or float16, e.g. memory-mapped files), one per value,
    that receive the result block by block, so a paper-scale result never has to fit in RAM.
    """
    if backend == "ray":
        from pairfree.distributed import ray_aggregate

        return ray_aggregate(queries, keys, values, tau=tau, method=method, k=k, query_chunk=query_chunk,
                             memory_chunk=memory_chunk, device=device, dtype=dtype, kernel=kernel,
                             resident_bytes=resident_bytes, normalize=normalize, progress=progress, ivf=ivf,
                             report=report, out=out)
    if backend != "local":
        raise ValueError(f"aggregate: backend must be 'local' or 'ray', got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"aggregate: method must be one of {list(METHODS)}, got {method!r}")
    if kernel not in KERNELS:
        raise ValueError(f"aggregate: kernel must be one of {list(KERNELS)}, got {kernel!r}")
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"aggregate: tau must be a finite number > 0, got {tau}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    dt = compute_dtype(dtype, dev)
    if dtype != "auto":
        from pairfree.devices import warn_if_slow_bf16

        warn_if_slow_bf16(dt, dev, "aggregate")
    as_list = isinstance(values, (list, tuple))
    vals: Sequence = list(values) if as_list else [keys if values is None else values]
    n, d = queries.shape
    m = keys.shape[0]
    if keys.shape[1] != d:
        raise ValueError(f"aggregate: queries have dim {d} but keys have dim {keys.shape[1]}")
    for i, v in enumerate(vals):
        if v.shape[0] != m:
            raise ValueError(f"aggregate: values[{i}] has {v.shape[0]} rows, keys have {m}; rows must align")
    if method == "auto":
        method = choose_method(n, m)
    outs = output_arrays(out, n, [v.shape[1] for v in vals])
    info: dict[str, Any] = {"method": method, "queries": n, "memory": m, "dtype": str(dt).replace("torch.", "")}
    desc = progress if isinstance(progress, str) else "aggregate"
    if method == "ivf":
        from pairfree.ivf import ivf_aggregate

        ivf_aggregate(queries, keys, vals, tau=tau, settings=ivf, device=dev, report=info, outs=outs,
                      normalize=normalize, progress=desc if progress else False, dtype=dt)
    elif method == "topk":
        _run_blocks(queries, keys, vals, tau, query_chunk, dev, dt, resident_bytes, desc, progress, outs, normalize,
                    lambda q, kr, vr, qf: _topk_block(q, qf, kr, vr, m, min(k, m), tau, memory_chunk or 32768, dev, dt))
        info["k"] = min(k, m)
    else:
        use = _pick_kernel(kernel, dev, keys, vals, dt, resident_bytes, memory_chunk)
        info["kernel"] = use
        chunk = memory_chunk or (m if use == "sdpa" else 32768)
        block = _sdpa_block if use == "sdpa" else _exact_block
        _run_blocks(queries, keys, vals, tau, query_chunk, dev, dt, resident_bytes, desc, progress, outs, normalize,
                    lambda q, kr, vr, qf: block(q, kr, vr, m, chunk, dev, dt))
    if report is not None:
        report.update(info)
    return outs if as_list else outs[0]


def output_arrays(out, n: int, widths: list[int]) -> list[np.ndarray]:
    """The arrays a result is written to: `out` (checked) or new float32 arrays."""
    if out is None:
        return [np.empty((n, w), dtype=np.float32) for w in widths]
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    if len(outs) != len(widths) or any(o.shape != (n, w) for o, w in zip(outs, widths)):
        raise ValueError(f"aggregate: out must be {len(widths)} array(s) of shapes {[(n, w) for w in widths]}, "
                         f"got {[tuple(o.shape) for o in outs]}")
    return outs


_TORCH_WRITABLE = tuple(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def put_rows(out, rows, results: torch.Tensor) -> None:
    """out[rows] = results (a slice or an index array of rows), converted to out's dtype by torch where out
    is a writable numpy array (memory maps included) of a float dtype: numpy converts float32 to float16
    one value at a time (0.8-1.0 s per 400,000 rows of d = 512 against torch's 0.02-0.16 s, the same
    values), and pools of float16 memories are float16. Other array types are assigned as they are."""
    if isinstance(out, np.ndarray) and out.flags.writeable and out.dtype in _TORCH_WRITABLE:
        t = torch.from_numpy(out)
        src = results.detach().to("cpu", t.dtype)
        if isinstance(rows, slice):
            t[rows] = src
        else:
            t.index_copy_(0, torch.from_numpy(np.asarray(rows, dtype=np.int64)), src)
        return
    out[rows] = results.detach().cpu().numpy()


def store_rows(outs: list[np.ndarray], start: int, results: list[torch.Tensor], normalize: bool) -> None:
    """Write one block of results (fp32 tensors), L2-normalised in fp32 first when asked."""
    for o, r in zip(outs, results):
        r = r.float()
        if normalize:
            r = torch.nn.functional.normalize(r, dim=-1)
        put_rows(o, slice(start, start + len(r)), r)


def _run_blocks(queries, keys, vals, tau, query_chunk, dev, dt, resident_bytes, desc, progress, outs, normalize, fn):
    """Query chunks through `fn(q / tau, keys, values, q_fp32)`; keys and values resident when they fit."""
    n = queries.shape[0]
    keys_r = _resident(keys, dev, dt, resident_bytes)
    vals_r = [keys_r if v is keys else _resident(v, dev, dt, resident_bytes) for v in vals]
    bar = progress_bar(n, desc, bool(progress), unit="q")
    for qs in range(0, n, query_chunk):
        qf = _rows(queries, qs, min(qs + query_chunk, n), dev, torch.float32)
        store_rows(outs, qs, fn((qf / tau).to(dt), keys_r, vals_r, qf), normalize)
        bar.update(len(qf))
    bar.close()


def _flash_cpu():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _pick_kernel(kernel: str, dev: torch.device, keys, vals, dt, resident_bytes: int, memory_chunk) -> str:
    """"sdpa" where a fused kernel can take the whole job, else "chunked"."""
    if kernel != "auto":
        return kernel
    if dev.type == "cpu":
        # torch's CPU flash kernel beats a GEMM in fp32 with the keys as values, but reaches half the
        # bf16 GEMM rate, and scores the keys again for every other value (1.3x slower than chunked);
        # in float16 the chunked kernel reaches 2.8 GFLOP/s on a CPU (slow fp16 GEMMs and exp), the flash one ~100
        one_pass = all(v is keys for v in vals)
        fused = dt == torch.float16 or (dt == torch.float32 and one_pass)
        return "sdpa" if _flash_cpu() is not None and fused else "chunked"
    m, d = keys.shape
    fits = (m * (d + sum(v.shape[1] for v in vals)) * torch.finfo(dt).bits // 8) <= resident_bytes
    return "sdpa" if fits and memory_chunk is None and fused_supported(str(dev), d, str(dt)) else "chunked"


def _fused_backends() -> list:
    from torch.nn.attention import SDPBackend

    names = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    return [getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)]


@functools.lru_cache(maxsize=None)
def fused_supported(device: str, d: int, dtype: str) -> bool:
    """Does a fused (non-materialising) SDPA backend take head size `d` in `dtype` on `device`?

    Checked by running one on a tiny input with the math backend excluded: CUDA flash attention
    stops at d = 256, memory-efficient attention and cuDNN have their own limits per GPU and version."""
    from torch.nn.attention import sdpa_kernel

    dt = getattr(torch, dtype.replace("torch.", ""))
    x = torch.zeros((1, 1, 8, d), device=device, dtype=dt)
    try:
        with sdpa_kernel(_fused_backends()):
            torch.nn.functional.scaled_dot_product_attention(x, x, x)
        return True
    except RuntimeError:
        return False


def _sdpa_block(q, keys, vals, m, chunk, dev, dt):
    """Fused attention over memory chunks; chunk results merged exactly through their log-sum-exp.

    q arrives pre-divided by τ, so the kernel runs with scale 1. The fused kernels need values as wide
    as the keys: values other than the keys are concatenated, zero-padded and cut into key-wide blocks
    (one kernel call each; the weights are recomputed per block, which is cheaper than leaving the
    fused kernel)."""
    nq, d = q.shape
    flash = _flash_cpu() if dev.type == "cpu" else None
    others = [i for i, v in enumerate(vals) if v is not keys]
    widths = [vals[i].shape[1] for i in others]
    lse = None
    accs = [torch.zeros((nq, v.shape[1]), device=dev, dtype=torch.float32) for v in vals]
    q4 = q[None, None]

    def attend(kb, vb):
        if flash is not None:
            o, l = flash(q4, kb[None, None], vb[None, None], scale=1.0)
            return o[0, 0].float(), l[0, 0].float()[:, None]
        # one chunk covers the whole memory here (see _pick_kernel): no log-sum-exp needed
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(_fused_backends()):
            o = torch.nn.functional.scaled_dot_product_attention(q4, kb[None, None], vb[None, None], scale=1.0)
        return o[0, 0].float(), torch.zeros((nq, 1), device=dev)

    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        kb = _rows(keys, ms, me, dev, dt)
        results = {}
        if len(others) < len(vals):
            results["keys"], lse_c = attend(kb, kb)
        if others:
            x = torch.cat([_rows(vals[i], ms, me, dev, dt) for i in others], 1)
            x = torch.nn.functional.pad(x, (0, -x.shape[1] % d))
            parts = [attend(kb, x[:, c : c + d]) for c in range(0, x.shape[1], d)]
            lse_c = parts[0][1]
            results["others"] = torch.cat([o for o, _ in parts], 1).split(widths + [x.shape[1] - sum(widths)], 1)
        new_lse = lse_c if lse is None else torch.logaddexp(lse, lse_c)
        for i, acc in enumerate(accs):
            o = results["others"][others.index(i)] if i in others else results["keys"]
            if lse is None:
                acc.copy_(o)
            else:
                acc.mul_(torch.exp(lse - new_lse)).add_(o * torch.exp(lse_c - new_lse))
        lse = new_lse
    return accs


#: (queries, memory rows) per score block of the chunked kernel on a CPU: the block stays in cache
#: (1024 x 2048 measured best among 1k-4k x 1k-8k); other devices score a whole chunk at once
CPU_SCORE_BLOCK = (1024, 2048)
#: a query is rescaled once its weights in a block sum past e^LAZY_RESCALE (no row then sits more
#: than that above its shift, where a bfloat16 score still resolves 1/32)
LAZY_RESCALE = 6.0


def _exact_block(q, keys, vals, m, chunk, dev, dtype):
    """Softmax averages with one shift per query, folded into the score GEMM and rarely updated.

    Each query's scores are shifted by a constant (first: its best score in the first block), inside
    the GEMM (`addmm`): the weights are one in-place `exp`, the sums plain adds, with no running max,
    no rescaling pass, and in bf16 the rounding happens after the shift, near 0, where the weight is.
    A query whose weights in a block sum past e^LAZY_RESCALE has found rows well above its shift
    (this also catches overflow): its shift is raised to its best score there and its sums and
    weights rescaled (rare after the first blocks: ~0.4 per query over a 131k-row memory). On this
    CPU that runs at 0.78-1.12 of the bf16 GEMM rate, where the online-softmax version reached
    0.33-0.45 (README, Performance)."""
    nq = q.shape[0]
    q_step, k_step = CPU_SCORE_BLOCK if dev.type == "cpu" else (nq, chunk)
    tot = torch.zeros(nq, device=dev)
    accs = [torch.zeros((nq, v.shape[1]), device=dev) for v in vals]
    shift = None
    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        kb = _rows(keys, ms, me, dev, dtype)
        vbs = [kb if v is keys else _rows(v, ms, me, dev, dtype) for v in vals]
        if shift is None:
            shift = (q.float() @ kb[:k_step].float().T).amax(1, keepdim=True).to(dtype)
        for qs in range(0, nq, q_step):
            rows = slice(qs, min(qs + q_step, nq))
            for ks in range(0, me - ms, k_step):
                cols = slice(ks, min(ks + k_step, me - ms))
                _shifted_block(q[rows], kb[cols], [vb[cols] for vb in vbs], shift[rows], tot[rows],
                               [acc[rows] for acc in accs])
    return [acc / tot[:, None] for acc in accs]


def _shifted_block(q, k, vs, shift, tot, accs) -> None:
    """One score block into the running sums (all views, updated in place)."""
    w = torch.addmm(shift, q, k.T, beta=-1).exp_()
    s = w.sum(1, dtype=torch.float32)
    up = (s > math.exp(LAZY_RESCALE)).nonzero()[:, 0]
    if len(up):
        # fp32 weights that did not overflow are rescaled where they are (elementwise: the result does
        # not depend on how many queries a block holds, which a GEMM of a few rows would); bf16 ones
        # were rounded far from 0, and overflowed ones are lost: those rows are scored again
        again = w.dtype != torch.float32 or not bool(torch.isfinite(s[up]).all())
        if again:
            new = shift[up] + torch.addmm(shift[up], q[up], k.T, beta=-1).amax(1, keepdim=True)
        else:
            new = shift[up] + torch.log(w[up].amax(1, keepdim=True))
        scale = torch.exp((shift[up] - new).float())
        tot[up] *= scale[:, 0]
        for acc in accs:
            acc[up] *= scale
        shift[up] = new
        w[up] = wu = torch.addmm(new, q[up], k.T, beta=-1).exp_() if again else w[up] * scale
        s[up] = wu.sum(1, dtype=torch.float32)
    tot += s
    for acc, v in zip(accs, vs):
        acc += (w @ v).float()


def _topk_block(q, qf, keys, vals, m, k, tau, chunk, dev, dtype):
    """Exact top-k by chunked merge, re-scored in fp32, then softmax over those k and gather their values."""
    nq = q.shape[0]
    best_s = torch.full((nq, 0), -math.inf, device=dev)
    best_i = torch.zeros((nq, 0), device=dev, dtype=torch.long)
    for ms in range(0, m, chunk):
        me = min(ms + chunk, m)
        s = (q @ _rows(keys, ms, me, dev, dtype).T).float()
        cs, ci = s.topk(min(k, me - ms), dim=1)
        best_s, pos = torch.cat([best_s, cs], 1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
        best_i = torch.cat([best_i, ci + ms], 1).gather(1, pos)
    idx = best_i.reshape(-1).cpu()
    krows = _gather(keys, idx, dev).reshape(nq, k, -1)
    w = torch.softmax(torch.einsum("nd,nkd->nk", qf, krows) / tau, dim=1)
    out = []
    for v in vals:
        rows = krows if v is keys else _gather(v, idx, dev).reshape(nq, k, -1)
        out.append(torch.einsum("nk,nkd->nd", w, rows))
    return out


def _gather(x, idx: torch.Tensor, dev) -> torch.Tensor:
    """Rows `idx` of a numpy / memory-mapped / torch memory as fp32 on `dev`."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)].to(dev, torch.float32)
    return torch.from_numpy(host_rows(x, idx.numpy())).to(dev)


def aggregate_dense(queries, keys, values=None, tau: float = 0.01) -> np.ndarray:
    """Direct O(N·M)-memory reference implementation, for tests and small inputs only."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float64))
    kk = torch.as_tensor(np.asarray(keys, dtype=np.float64))
    v = kk if values is None else torch.as_tensor(np.asarray(values, dtype=np.float64))
    w = torch.softmax(q @ kk.T / tau, dim=1)
    return torch.nn.functional.normalize(w @ v, dim=-1).float().numpy()


#: aggregate() arguments that change its result (and therefore key its cache)
RESULT_SETTINGS = ("tau", "method", "k", "normalize", "dtype", "ivf")


def cache_settings(kwargs: dict[str, Any], n: int, m: int) -> dict[str, Any]:
    """The result-relevant settings of an aggregate call, with "auto" resolved and defaults filled in."""
    s = {"tau": kwargs.get("tau", 0.01), "method": kwargs.get("method", "exact"), "k": kwargs.get("k", 256),
         "normalize": kwargs.get("normalize", True), "dtype": str(compute_dtype(kwargs.get("dtype", torch.float32), kwargs.get("device")))}
    if s["method"] == "auto":
        s["method"] = choose_method(n, m)
    if s["method"] != "topk":
        s.pop("k")
    if s["method"] == "ivf":
        from pairfree.ivf import IVFSettings

        s["ivf"] = (kwargs.get("ivf") or IVFSettings()).key()
    if s["dtype"] == "torch.float32":
        s.pop("dtype")  # keys of caches written before the option existed stay valid
    return s


def storage_dtype(*arrays) -> np.dtype:
    """float16 when every input is float16 (a result is stored like the memories it came from), else float32."""
    return np.dtype(np.float16) if all(getattr(a, "dtype", None) in (np.float16, torch.float16) for a in arrays) \
        else np.dtype(np.float32)


def new_outputs(stack, paths, n: int, widths: list[int], dtype) -> list[np.ndarray]:
    """Memory-mapped result files under temporary names (renamed into place when `stack` closes
    without error), so a crash never leaves a half-written cache entry."""
    from pairfree.fileio import atomic_path

    return [np.lib.format.open_memmap(stack.enter_context(atomic_path(p)), mode="w+", dtype=dtype, shape=(n, w))
            for p, w in zip(paths, widths)]


def cached_aggregate(cache_dir, queries, keys, values=None, **kwargs):
    """`aggregate`, memoised on disk by the content of its inputs and its settings.

    The aggregation dominates the cost at scale (hours at paper size) and is identical across
    training runs that only change the projector or the losses, so it is worth keeping. Results are
    written block by block into memory-mapped files (float16 when the memories are float16) and come
    back memory-mapped. The report of the run that computed an entry (method, measured accuracy of
    "ivf") is kept next to it and returned in `kwargs["report"]` on a cache hit too.
    """
    if cache_dir is None:
        return aggregate(queries, keys, values, **kwargs)
    import contextlib
    from pathlib import Path

    from pairfree.fileio import write_json
    from pairfree.space import fingerprint

    as_list = isinstance(values, (list, tuple))
    vals = list(values) if as_list else [keys if values is None else values]
    settings = cache_settings(kwargs, queries.shape[0], keys.shape[0])
    dtype = storage_dtype(keys, *vals)
    h = hashlib.sha256(repr(sorted(settings.items())).encode())
    for a in (queries, keys, *vals):
        h.update(fingerprint(host_array(a)).encode())
    stem = f"agg-{h.hexdigest()[:24]}"
    paths = [Path(cache_dir) / f"{stem}-{i}.npy" for i in range(len(vals))]
    n, widths = queries.shape[0], [v.shape[1] for v in vals]
    outs = [load_cached(p, (n, w), dtype) for p, w in zip(paths, widths)]
    report = kwargs.get("report")
    if any(o is None for o in outs):
        info: dict = {}
        with contextlib.ExitStack() as stack:
            arrays = new_outputs(stack, paths, n, widths, dtype)
            aggregate(queries, keys, vals, **{**kwargs, "report": info, "out": arrays})
            for a in arrays:
                a.flush()
        write_json(Path(cache_dir) / f"{stem}.json", info)
        outs = [load_cached(p, (n, w), dtype) for p, w in zip(paths, widths)]
    else:
        try:
            info = json.loads((Path(cache_dir) / f"{stem}.json").read_text())
        except (OSError, ValueError):
            info = {}
        info = {**info, "cached": True}
    if report is not None:
        report.update(info)
    return outs if as_list else outs[0]


def load_cached(path, shape: tuple[int, int], dtype=np.float32) -> np.ndarray | None:
    """A cached array of exactly `shape` and `dtype` with finite values, or None (missing, truncated,
    another shape or dtype, NaN): the caller then recomputes it and overwrites the entry."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if a.shape != tuple(shape) or a.dtype != dtype:
        return None
    for start in range(0, a.shape[0], 65536):
        if not np.isfinite(a[start : start + 65536]).all():
            return None
    return a
