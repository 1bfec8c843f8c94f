"""Approximate memory aggregation for large memories: an IVF partition, exact softmax over probed lists.

The memory is split into lists by spherical k-means (faiss); each query scans the `probes` lists whose
centroids are closest, and every row of those lists is scored exactly (fp32, or bf16 GEMMs with fp32
sums, `dtype=`) and softmax-averaged, so the error is the softmax mass of the rows it never scanned
(and bf16's rounding, which the calibration sees).

How many probes: calibrated per call on a sample of the queries with an exact reference. For each
sample query the exact softmax mass of every list is measured; the smallest `probes` whose
`quantile` (default 99th percentile) of dropped mass is at most `max_dropped` on the calibration
part of the sample is chosen (or, with `min_cosine`, the fewest whose mean cosine to exact, less
two standard errors, reaches it), and the rest of the sample reports what was achieved: dropped
mass (mean, p99, max) and the cosine of the aggregated vectors to exact (mean, 1st percentile, min).

When it pays: when a query's softmax mass sits on few lists. At τ1 = 0.01 against a million-row
memory with CLIP-like cross-modal score statistics (mean 0.17, standard deviation 0.033) it does
not: the 0.07 % best rows carry half the mass, 90 % needs 2.6 % of the rows and 99 % needs 18 %
(the paper-scale world, docs/paper_scale.md). Then the calibration asks for most lists, and when the probes
would scan more than `exact_above` of the memory the exact fused kernel runs instead (it is
faster than scanning lists; the report then states exact's accuracy and keeps the probes' apart, and
above `memory.AUTO_EXACT_PAIRS` a warning says so). Use `min_cosine` to trade accuracy for time explicitly.

How far from the best: `oracle_rows` measures the rows a perfect selector would score (the largest
softmax weights, found for free). The aggregate's direction rests on few rows (0.01-0.02 % of the
paper-scale memories for cosine 0.99, 0.4-0.6 % for 0.999), but they are spread over many lists:
lists scan 15-26x those rows for 0.999, and finer lists do not close the gap (docs/paper_scale.md).
`select="groups"` (`pairfree.grouped`) shares one row-level selection per group of nearby queries
instead, which scans several times fewer rows for the same cosine.

Why not a per-query faiss search followed by a gather: faiss scans an IVF list query by query
(about 3 GFLOP/s on 2 cores here), while the same work done list by list, one GEMM per list against
all queries of a block that probe it, runs near the matrix-multiply rate. Each query's scores are
shifted by its nearest centroid's score inside the score GEMM, so sums and weighted sums accumulate
across lists with no running max (queries whose shifted weights overflow are redone with one).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pairfree.memory import host_rows


SELECTS = ("lists", "groups")
TAILS = ("sampled", "mean", "none")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class IVFSettings:
    """How `method="ivf"` partitions and probes; the defaults aim at mean cosine >= 0.9999 to exact."""

    lists: int | None = None  # k-means lists; default round(2·sqrt(M)), between 1 and M // 16
    probes: int | None = None  # lists scanned per query; None = calibrated on the sample
    max_dropped: float = 0.01  # calibration target for the dropped softmax mass at `quantile`
    quantile: float = 0.99
    min_cosine: float | None = None  # instead: the mean cosine to exact the probes must reach (with a margin)
    exact_above: float = 0.35  # when the calibrated probes scan more of the memory than this, run exact
    sample: int = 2000  # queries with an exact reference: min(1000, half) calibrate, the rest check
    train_per_list: int = 64  # k-means training rows per list
    iters: int = 10
    seed: int = 0
    query_block: int = 65536  # queries per pass over the lists (memory: block x value width floats; larger
    # blocks give each list more queries per GEMM)
    cache_dir: str | None = None  # where partitions are kept (not part of the result's key)
    # select="groups": instead of scanning lists per query, each group of nearby queries (about
    # `group_size`) shares one selection of `rows` rows from its mean's softmax (`pairfree.grouped`);
    # `rows` is calibrated to `min_cosine` unless set (its queries stratified by their cosine to their group's
    # mean; the check stays uniform). tail: "sampled" (the selection a priority
    # sample: its best rows for sure, the rest by importance, each row weighted to stand for those
    # not drawn), "mean" (the best rows, the rest as the mean's softmax tail) or "none". regroup: the
    # share of queries farthest from their group's mean moved to the nearest mean of all groups. redo
    # (sampled): the share of queries of largest estimated error (`GroupedMemory._relative_error`) redone
    # exactly after the pass, in the GEMM dtype; each costs what a query of exact costs
    select: str = "lists"
    group_size: int = 1024
    regroup: float = 0.3
    rows: int | None = None
    tail: str = "sampled"
    redo: float = 0.0

    def __post_init__(self) -> None:
        checks = {"lists": self.lists is None or self.lists >= 1, "probes": self.probes is None or self.probes >= 1,
                  "max_dropped": 0 < self.max_dropped < 1, "quantile": 0 < self.quantile <= 1,
                  "min_cosine": self.min_cosine is None or -1 < self.min_cosine < 1,
                  "exact_above": 0 < self.exact_above <= 1,
                  "sample": self.sample >= 2, "train_per_list": self.train_per_list >= 1, "iters": self.iters >= 1,
                  "query_block": self.query_block >= 1, "select": self.select in SELECTS,
                  "group_size": self.group_size >= 1, "regroup": 0 <= self.regroup <= 1,
                  "rows": self.rows is None or self.rows >= 1, "tail": self.tail in TAILS,
                  "redo": 0 <= self.redo <= 1 and (self.redo == 0 or (self.select, self.tail) == ("groups", "sampled"))}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"IVFSettings: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)} "
                             f"(select is one of {list(SELECTS)}, tail one of {list(TAILS)}; redo is a share "
                             f"in [0, 1] and needs select='groups' with tail='sampled', whose queries have an "
                             f"error estimate)")
        if self.select == "groups" and self.min_cosine is None and self.rows is None:
            raise ValueError("IVFSettings(select='groups') needs min_cosine (the calibration target, e.g. 0.999) "
                             "or rows: its error is not a dropped mass that max_dropped could bound")

    def key(self) -> str:
        """The settings that change the result, as a stable string (for cache keys)."""
        groups_only = {"select", "group_size", "regroup", "rows", "tail", "redo"}
        skip = {"query_block", "cache_dir"} | (groups_only if self.select == "lists" else set())
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        return json.dumps(fields, sort_keys=True)

    def n_lists(self, m: int) -> int:
        n = self.lists if self.lists is not None else round(2 * math.sqrt(m))
        return int(max(1, min(n, m // 16 if m >= 16 else 1)))


@dataclass
class Partition:
    """Memory rows grouped by k-means list: rows order[offsets[j]:offsets[j+1]] form list j."""

    centroids: np.ndarray  # (L, d) float32, unit rows
    order: np.ndarray  # (M,) int64
    offsets: np.ndarray  # (L + 1,) int64

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def build_partition(keys, n_lists: int, settings: IVFSettings, device: torch.device) -> Partition:
    """Spherical k-means (faiss) on a seeded sample of the keys, then every row to its nearest centroid."""
    try:
        import faiss
    except ImportError:
        raise ImportError("aggregation method 'ivf' needs faiss: pip install 'pairfree[faiss]' "
                          "(or faiss-gpu from conda)") from None
    m, d = keys.shape
    rng = np.random.default_rng(settings.seed)
    n_train = min(m, n_lists * settings.train_per_list)
    idx = np.sort(rng.choice(m, n_train, replace=False))
    x = np.ascontiguousarray(host_rows(keys, idx))
    gpu = device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, n_lists, niter=settings.iters, spherical=True, seed=settings.seed, verbose=False, gpu=gpu,
                      min_points_per_centroid=1,
                      max_points_per_centroid=max(settings.train_per_list, 1) * 4)
    km.train(x)
    cent = torch.from_numpy(np.ascontiguousarray(km.centroids, dtype=np.float32)).to(device)
    assign = np.empty(m, dtype=np.int64)
    for s in range(0, m, 65536):
        block = torch.from_numpy(host_rows(keys, slice(s, s + 65536))).to(device)
        assign[s : s + len(block)] = (block @ cent.T).argmax(1).cpu().numpy()
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=n_lists)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Partition(cent.cpu().numpy(), order.astype(np.int64), offsets)


def cached_partition(keys, n_lists: int, settings: IVFSettings, device: torch.device) -> Partition:
    """`build_partition`, kept under settings.cache_dir keyed by the keys' content: the Ex-MCR passes
    query the same four memories several times."""
    if settings.cache_dir is None:
        return build_partition(keys, n_lists, settings, device)
    from pairfree.fileio import atomic_path
    from pairfree.memory import host_array
    from pairfree.space import fingerprint

    blob = json.dumps({"v": 1, "lists": n_lists, "seed": settings.seed, "train": settings.train_per_list,
                       "iters": settings.iters, "keys": fingerprint(host_array(keys))})
    path = Path(settings.cache_dir) / f"ivf-partition-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            part = Partition(z["centroids"], z["order"], z["offsets"])
        if part.order.shape == (keys.shape[0],) and part.offsets[-1] == keys.shape[0]:
            return part
    except (OSError, ValueError, KeyError, EOFError):
        pass
    part = build_partition(keys, n_lists, settings, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, centroids=part.centroids, order=part.order, offsets=part.offsets)
    return part


def _sorted_rows(x, order: np.ndarray, device: torch.device) -> torch.Tensor:
    """x[order] as a tensor in x's storage dtype (float16 stays float16), read in sorted blocks so a
    memory-mapped file is scanned forward, not at random."""
    if isinstance(x, torch.Tensor):
        return x.detach()[torch.from_numpy(order).to(x.device)].to(device)
    out = np.empty((len(order), x.shape[1]), dtype=np.float16 if x.dtype == np.float16 else np.float32)
    for s in range(0, len(order), 1 << 20):
        rows = order[s : s + (1 << 20)]
        perm = np.argsort(rows)
        out[s + perm] = x[rows[perm]]
    return torch.from_numpy(out).to(device)


IVF_DTYPES = (torch.float32, torch.bfloat16)
#: queries scored against one list per GEMM: large enough for the bf16 rate, small enough that the
#: score block stays in cache
LIST_GROUP = 2048


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in IVF_DTYPES:
        raise ValueError(f"aggregate(method='ivf'): dtype must be float32 or bfloat16, got {dtype}; "
                         "float16's range (max 65504) cannot hold unnormalised softmax weights")


class ProbedMemory:
    """A memory (keys and aligned values) reordered by list, ready for `aggregate`.

    `dtype`: what the per-list GEMMs run in (float32, or bfloat16 with float32 sums; float16 cannot
    hold unnormalised softmax weights). Rows stay in their storage dtype and are converted per list."""

    def __init__(self, keys, values: Sequence, part: Partition, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self._setup(_sorted_rows(keys, part.order, device),
                    [None if v is keys else _sorted_rows(v, part.order, device) for v in values], part, device, dtype)

    @classmethod
    def from_sorted(cls, keys_sorted: np.ndarray, values_sorted: Sequence, part: Partition,
                    device: torch.device, dtype: torch.dtype = torch.float32) -> "ProbedMemory":
        """From arrays already in list order (a Ray task gets them from the object store, read-only)."""
        from pairfree.memory import as_tensor

        mem = cls.__new__(cls)
        mem._setup(as_tensor(keys_sorted).to(device), [None if v is None else as_tensor(v).to(device)
                                                       for v in values_sorted], part, device, dtype)
        return mem

    def _setup(self, keys: torch.Tensor, values: list, part: Partition, device: torch.device,
               dtype: torch.dtype) -> None:
        _check_dtype(dtype)
        self.part, self.device, self.keys, self.values, self.dtype = part, device, keys, values, dtype
        self.centroids = torch.from_numpy(part.centroids).to(device)
        self.empty = torch.from_numpy(part.sizes == 0).to(device)
        self.offsets = part.offsets.tolist()

    def astype(self, dtype: torch.dtype) -> "ProbedMemory":
        """The same rows (shared, not copied) with the GEMMs in another dtype."""
        mem = copy.copy(self)
        mem._setup(self.keys, self.values, self.part, self.device, dtype)
        return mem

    def width(self, i: int) -> int:
        v = self.values[i]
        return self.keys.shape[1] if v is None else v.shape[1]

    def value(self, i: int, a: int, b: int, kj: torch.Tensor) -> torch.Tensor:
        v = self.values[i]
        return kj if v is None else v[a:b].to(kj.dtype)

    def probes_of(self, q: torch.Tensor, probes: int):
        """The `probes` nearest non-empty lists of each query, nearest first (topk: values, indices)."""
        s = q @ self.centroids.T
        s.masked_fill_(self.empty, -math.inf)
        return s.topk(min(probes, int((~self.empty).sum())), dim=1)

    def _by_list(self, lists: torch.Tensor):
        """(list, queries probing it) for every probed list, queries grouped so each list is read once."""
        nb, p = lists.shape
        flat = lists.reshape(-1)
        q_of = torch.arange(nb, device=lists.device).repeat_interleave(p)[torch.argsort(flat, stable=True)]
        start = 0
        for j, c in enumerate(torch.bincount(flat, minlength=len(self.offsets) - 1).tolist()):
            for g in range(start, start + c, LIST_GROUP):
                yield j, q_of[g : min(g + LIST_GROUP, start + c)]
            start += c

    def aggregate(self, q: torch.Tensor, probes: int, tau: float) -> tuple[list[torch.Tensor], int]:
        """Softmax averages of the probed rows for fp32 queries `q`; also the number of (query, row)
        scores computed.

        Each query's scores are shifted by one constant known before any row is scored: its nearest
        centroid's score. The shift then rides in the score GEMM (`addmm`, so a bfloat16 result is
        rounded after the shift, where the rows that carry weight sit near 0), and weights and
        sums accumulate with `index_add_`: no running max, no rescaling pass (at paper scale 1.3-1.8x
        the online version in fp32, and bf16 gains another 1.6-1.9x). A query whose shifted weights overflow or vanish (a row
        far above its nearest centroid's score or all rows far below it, which takes a small τ) is
        redone with a running max."""
        top = self.probes_of(q, probes)
        dt = self.dtype
        qs = (q / tau).to(dt)
        shift = (top.values[:, :1] / tau).to(dt)
        run_sum = torch.zeros(q.shape[0], device=q.device)
        accs = [torch.zeros((q.shape[0], self.width(i)), device=q.device) for i in range(len(self.values))]
        scored = 0
        for j, qi in self._by_list(top.indices):
            a, b = self.offsets[j], self.offsets[j + 1]
            kj = self.keys[a:b].to(dt)
            w = torch.addmm(shift[qi], qs[qi], kj.T, beta=-1).exp_()
            scored += w.numel()
            run_sum.index_add_(0, qi, w.sum(1, dtype=torch.float32))
            for i, acc in enumerate(accs):
                acc.index_add_(0, qi, (w @ self.value(i, a, b, kj)).float())
        bad = ~torch.isfinite(run_sum) | (run_sum < 1e-30)
        for acc in accs:
            bad |= ~torch.isfinite(acc).all(1)
        if bad.any():
            idx = bad.nonzero()[:, 0]
            redo = self._aggregate_online(q[idx], top.indices[idx], tau)
            for acc, r in zip(accs, redo):
                acc[idx] = r
            run_sum[idx] = 1.0
        return [acc / run_sum[:, None] for acc in accs], scored

    def _aggregate_online(self, q: torch.Tensor, lists: torch.Tensor, tau: float) -> list[torch.Tensor]:
        """Normalised softmax averages over `lists` in float32 with a running max (flash attention's
        rescaling), for queries the shifted pass cannot hold."""
        nb = q.shape[0]
        run_max = torch.full((nb,), -math.inf, device=q.device)
        run_sum = torch.zeros(nb, device=q.device)
        accs = [torch.zeros((nb, self.width(i)), device=q.device) for i in range(len(self.values))]
        for j, qi in self._by_list(lists):
            a, b = self.offsets[j], self.offsets[j + 1]
            kj = self.keys[a:b].float()
            s = (q[qi] @ kj.T) / tau
            new = torch.maximum(run_max[qi], s.amax(1))
            keep = torch.exp(run_max[qi] - new)
            w = torch.exp(s - new[:, None])
            run_sum[qi] = run_sum[qi] * keep + w.sum(1)
            for i, acc in enumerate(accs):
                acc[qi] = acc[qi] * keep[:, None] + w @ self.value(i, a, b, kj)
            run_max[qi] = new
        return [acc / run_sum[:, None] for acc in accs]


def _exact_reference(mem: ProbedMemory, q: torch.Tensor, tau: float, chunk: int = 65536):
    """For sample queries: exact softmax averages (unnormalised) and the exact softmax mass of every list."""
    n = q.shape[0]
    m = mem.keys.shape[0]
    row_max = torch.full((n,), -math.inf, device=q.device)
    qb = q.to(torch.bfloat16)
    for s in range(0, m, chunk):  # a rough max (bf16 scores) is enough to keep exp() in range
        row_max = torch.maximum(row_max, (qb @ mem.keys[s : s + chunk].to(torch.bfloat16).T).float().amax(1) / tau)
    offsets = np.asarray(mem.offsets)
    n_lists = len(offsets) - 1
    mass = np.zeros((n, n_lists), dtype=np.float64)
    total = torch.zeros(n, dtype=torch.float64, device=q.device)
    accs = [torch.zeros((n, mem.keys.shape[1] if v is None else v.shape[1]), device=q.device) for v in mem.values]
    # walk whole lists so each chunk's per-list sums are complete (np.add.reduceat over list starts)
    starts = offsets[:-1]
    j = 0
    while j < n_lists:
        a = int(offsets[j])
        k = int(np.searchsorted(offsets, a + chunk, side="right")) - 1
        k = max(k, j + 1)
        b = int(offsets[k])
        if b > a:
            kj = mem.keys[a:b].float()
            w = torch.exp((q @ kj.T) / tau - row_max[:, None])
            total += w.sum(1, dtype=torch.float64)
            for i, acc in enumerate(accs):
                acc += w @ mem.value(i, a, b, kj)
            local = starts[j:k] - a
            nonempty = np.diff(offsets[j : k + 1]) > 0
            sums = np.add.reduceat(w.cpu().double().numpy(), local[nonempty], axis=1)
            mass[:, np.arange(j, k)[nonempty]] = sums
        j = k
    mass /= total.cpu().numpy()[:, None]
    return [acc / total.float()[:, None] for acc in accs], mass


def _cosines(a: list[torch.Tensor], b: list[torch.Tensor]) -> np.ndarray:
    """Per query, the lowest cosine over the values."""
    cos = [torch.nn.functional.cosine_similarity(x, y, dim=1) for x, y in zip(a, b)]
    return torch.stack(cos).amin(0).cpu().numpy()


@dataclass
class Reference:
    """Sample queries with their exact aggregation and, per query, the softmax mass outside its p
    nearest lists for every p; split into queries that calibrate and queries that check."""

    q: torch.Tensor
    exact: list[torch.Tensor]
    dropped: np.ndarray  # (n, lists): dropped[i, p - 1]
    order: np.ndarray  # (n, lists): lists by centroid score, nearest first
    cal: np.ndarray
    chk: np.ndarray


def reference(mem: ProbedMemory, queries, tau: float, settings: IVFSettings) -> Reference:
    n = queries.shape[0]
    rng = np.random.default_rng(settings.seed + 1)
    idx = np.sort(rng.choice(n, min(settings.sample, n), replace=False))
    q = torch.from_numpy(host_rows(queries, idx)).to(mem.device)
    exact, mass = _exact_reference(mem, q, tau)
    if len(idx) > 1:
        perm = rng.permutation(len(idx))
        n_cal = min(1000, len(idx) // 2)
        cal, chk = np.sort(perm[:n_cal]), np.sort(perm[n_cal:])
    else:
        cal = chk = np.arange(1)
    order = mem.probes_of(q, len(mem.offsets) - 1).indices.cpu().numpy()  # every non-empty list, nearest first
    captured = np.cumsum(np.take_along_axis(mass, order, axis=1), axis=1)
    return Reference(q, exact, np.clip(1.0 - captured, 0.0, 1.0), order, cal, chk)


def _lower_bound(cos: np.ndarray, z: float = 2.0) -> float:
    """The calibration queries' mean cosine less two standard errors: probes chosen on the bare mean
    landed a hair under the target on fresh queries (0.99897 for 0.999 at paper scale); with the
    margin the target holds for the mean of new queries with ~97.5 % confidence."""
    if len(cos) < 2:
        return float(cos.mean())
    return float(cos.mean() - z * cos.std(ddof=1) / math.sqrt(len(cos)))


def choose_probes(ref: Reference, mem: ProbedMemory, tau: float, settings: IVFSettings) -> int:
    """The fewest probes meeting the target on the calibration queries: mean cosine to exact >=
    `min_cosine` when set (less two standard errors: `_lower_bound`; searched by doubling, then
    bisection), else the `quantile` of the dropped
    mass <= `max_dropped`."""
    n_lists = ref.order.shape[1]
    if settings.probes is not None:
        return min(settings.probes, n_lists)
    if settings.min_cosine is None:
        at_q = np.quantile(ref.dropped[ref.cal], settings.quantile, axis=0)
        ok = np.nonzero(at_q <= settings.max_dropped)[0]
        return int(ok[0]) + 1 if len(ok) else n_lists
    q, exact = ref.q[ref.cal], [e[ref.cal] for e in ref.exact]

    def good(p: int) -> bool:
        cos = _cosines(mem.aggregate(q, p, tau)[0], exact)
        return _lower_bound(cos) >= settings.min_cosine

    lo, hi = 0, 1
    while hi < n_lists and not good(hi):
        lo, hi = hi, min(2 * hi, n_lists)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if good(mid) else (mid, hi)
    return hi


def measure(ref: Reference, mem: ProbedMemory, probes: int, tau: float) -> dict[str, Any]:
    """What `probes` achieves on the check queries: dropped mass, cosine to exact, rows scanned."""
    approx, _ = mem.aggregate(ref.q[ref.chk], probes, tau)
    cos = _cosines(approx, [e[ref.chk] for e in ref.exact])
    d = ref.dropped[ref.chk, probes - 1]
    scanned = np.take(mem.part.sizes, ref.order[ref.chk, :probes]).sum(1)
    return {
        "probes": probes,
        "sample": len(ref.q),
        "dropped_mass": {"mean": float(d.mean()), "p99": float(np.quantile(d, 0.99)), "max": float(d.max())},
        "cosine_to_exact": {"mean": float(cos.mean()), "p1": float(np.quantile(cos, 0.01)), "min": float(cos.min())},
        "rows_scanned_per_query": float(scanned.mean()),
    }


def oracle_rows(queries, keys, values: Sequence, tau: float, targets: Sequence[float] = (0.99, 0.999),
                max_rows: int = 65536, block: int = 16) -> dict[str, Any]:
    """What a perfect selector would need: per query, the fewest rows of largest softmax weight (found
    for free) whose softmax average reaches each target cosine to exact, the lowest over the values.
    It measures how far a selection method (IVF lists, a graph index) is from the rows that matter,
    and bounds the exact work of any method that picks rows by weight.

    `queries`, `keys`, `values`: float32 tensors (values[i] aligned with keys; pass keys itself to
    aggregate the keys). Per target: `per_query` (each query stops at its own target: rows, mean,
    p99), `common` (one top-k for all queries: the least k whose mean cosine reaches it),
    `mean_target` (the least mean rows for which the *mean* cosine reaches it, rows allotted across
    queries by a Lagrangian on a geometric grid of k). A query needing more than `max_rows` counts as
    `max_rows + 1` and is counted in `beyond_max_rows`."""
    n, m = queries.shape[0], keys.shape[0]
    kk = min(max_rows, m)
    grid = np.unique(np.round(np.geomspace(1, kk, 256)).astype(np.int64))
    first = {t: np.empty(n, dtype=np.int64) for t in targets}
    curves = np.empty((n, len(grid)))
    mean_curve = torch.zeros(kk, dtype=torch.float64)
    for s in range(0, n, block):
        qb = queries[s : s + block]
        w = torch.softmax((qb @ keys.T) / tau, dim=1)
        exact = [w @ v for v in values]
        top_w, top_i = w.topk(kk, dim=1)
        del w
        for r in range(len(qb)):
            cos = None
            for v, e in zip(values, exact):
                cum = torch.cumsum(top_w[r, :, None] * v[top_i[r]], dim=0)
                c = (cum @ e[r]) / (cum.norm(dim=1) * e[r].norm()).clamp_min(1e-30)
                cos = c if cos is None else torch.minimum(cos, c)
            mean_curve += cos.double()
            curves[s + r] = cos[grid - 1].numpy()
            for t in targets:
                hit = torch.nonzero(cos >= t)
                first[t][s + r] = int(hit[0]) + 1 if len(hit) else kk + 1
    mean_curve = (mean_curve / n).numpy()
    out: dict[str, Any] = {"queries": n, "memory": m, "max_rows": kk}
    for t in targets:
        k = first[t]
        hit = np.nonzero(mean_curve >= t)[0]
        out[str(t)] = {"per_query": {"mean": float(k.mean()), "p99": float(np.quantile(k, 0.99)), "rows": k.tolist()},
                       "beyond_max_rows": int((k > kk).sum()),
                       "common": int(hit[0]) + 1 if len(hit) else None,
                       "mean_target": _lagrangian_rows(curves, grid, t)}
    return out


def _lagrangian_rows(curves: np.ndarray, grid: np.ndarray, target: float) -> float | None:
    """Least mean rows over per-query choices of k on `grid` with mean cosine >= target: each query
    takes the k maximising cos - lam * k; the largest lam that still reaches the target is optimal
    for the mean cosine it reaches (a Lagrangian allocation)."""
    def pick(lam: float) -> tuple[float, float]:
        j = np.argmax(curves - lam * grid[None, :], axis=1)
        return float(curves[np.arange(len(j)), j].mean()), float(grid[j].mean())

    if pick(0.0)[0] < target:
        return None
    lo, hi = 0.0, 1.0
    while pick(hi)[0] >= target:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pick(mid)[0] >= target else (lo, mid)
    return pick(lo)[1]


def calibrate(mem: ProbedMemory, queries, tau: float, settings: IVFSettings) -> dict[str, Any]:
    """Choose `probes` on part of a query sample (exact reference) and measure it on the rest."""
    ref = reference(mem, queries, tau, settings)
    return measure(ref, mem, choose_probes(ref, mem, tau, settings), tau)


def exact_fallback(n: int, m: int, scanned: float, settings: IVFSettings, what: str = "the calibrated probes scan"
                   ) -> str:
    """Why an approximation runs exact instead (its calibrated work per query, `scanned` rows, is above
    `exact_above`), for the report; and where exact takes hours (above `memory.AUTO_EXACT_PAIRS`), a
    warning on the terminal that says what would make it approximate: at paper scale the default target
    (dropped mass <= 1 %) needs ~75 % of the memory per query (docs/paper_scale.md), and a default run
    would otherwise spend hours without a word."""
    from pairfree.memory import AUTO_EXACT_PAIRS

    why = f"{what} {scanned / m:.0%} of the memory per query (> exact_above = {settings.exact_above:.0%})"
    if n * m > AUTO_EXACT_PAIRS:
        if settings.min_cosine is None:
            hint = ("to trade a measured cosine to exact for time instead, set min_cosine=0.999 with "
                    "select='groups' (--aggregation-min-cosine 0.999 --aggregation-select groups)")
        else:
            hint = f"a lower min_cosine than {settings.min_cosine} scans less"
        warnings.warn(f"aggregate(method='ivf'): {why}, so all {n:,} x {m:,} query x memory pairs run exact; {hint}",
                      RuntimeWarning, stacklevel=3)
    return why


def ran_exact(cal: dict[str, Any]) -> dict[str, Any]:
    """The report of a run that calibrated probes and then ran exact: what the probes measured is kept
    apart (it is why exact ran), and the accuracy stated is the run's own (exact in the GEMM dtype)."""
    measured = {k: cal[k] for k in ("cosine_to_exact", "dropped_mass")}
    return {**{k: v for k, v in cal.items() if k not in measured}, "ran": "exact", "work_fraction": 1.0,
            "probes_measured": measured, "cosine_to_exact": {"mean": 1.0, "p1": 1.0, "min": 1.0},
            "dropped_mass": {"mean": 0.0, "p99": 0.0, "max": 0.0}}


def ivf_aggregate(queries, keys, values: Sequence, *, tau: float, outs: list[np.ndarray],
                  settings: IVFSettings | None = None, device: torch.device | None = None,
                  report: dict | None = None, normalize: bool = True, progress: bool | str = False,
                  dtype: torch.dtype = torch.float32, runner=None) -> None:
    """`aggregate(..., method="ivf")` into `outs` (one per value); `report` gets the partition, the
    calibrated probes and the measured accuracy. `dtype` is the GEMMs' (`ProbedMemory`): the probes
    are calibrated with it, so the accuracy reported includes its rounding. `runner`: select="groups"
    only, see `grouped.grouped_aggregate`."""
    from pairfree.memory import store_rows
    from pairfree.progress import progress as progress_bar

    _check_dtype(dtype)  # before the partition is built
    settings = settings or IVFSettings()
    dev = device or torch.device("cpu")
    n, m = queries.shape[0], keys.shape[0]
    t0 = time.perf_counter()
    part = cached_partition(keys, settings.n_lists(m), settings, dev)
    t_part = time.perf_counter() - t0
    if settings.select == "groups":
        from pairfree.grouped import grouped_aggregate

        rep = grouped_aggregate(queries, keys, values, tau=tau, outs=outs, settings=settings, centroids=part.centroids,
                                device=dev, dtype=dtype, normalize=normalize, progress=progress, runner=runner)
        rep["seconds"]["partition"] = round(t_part, 3)
        if report is not None:
            report.update({"lists": len(part.offsets) - 1, **rep})
        return
    mem = ProbedMemory(keys, values, part, dev, dtype)
    t1 = time.perf_counter()
    cal = calibrate(mem, queries, tau, settings)
    t2 = time.perf_counter()
    if cal["rows_scanned_per_query"] > settings.exact_above * m:
        # the softmax mass is spread too widely for lists to save work: the fused exact kernel is faster
        from pairfree.memory import aggregate

        del mem
        why = exact_fallback(n, m, cal["rows_scanned_per_query"], settings)
        aggregate(queries, keys, list(values), tau=tau, device=dev, out=outs, normalize=normalize, progress=progress,
                  dtype=dtype)
        if report is not None:
            report.update({"lists": len(part.offsets) - 1, **ran_exact(cal), "why": why,
                           "seconds": {"partition": round(t1 - t0, 3), "calibration": round(t2 - t1, 3),
                                       "aggregation": round(time.perf_counter() - t2, 3)}})
        return
    bar = progress_bar(n, progress if isinstance(progress, str) else "aggregate", bool(progress), unit="q")
    scored = 0
    for s in range(0, n, settings.query_block):
        q = torch.from_numpy(host_rows(queries, slice(s, s + settings.query_block))).to(dev)
        res, c = mem.aggregate(q, cal["probes"], tau)
        scored += c
        store_rows(outs, s, res, normalize)
        bar.update(len(q))
    bar.close()
    t3 = time.perf_counter()
    if report is not None:
        report.update({"lists": len(part.offsets) - 1, **cal, "work_fraction": scored / max(1, n * m),
                       "seconds": {"partition": round(t1 - t0, 3), "calibration": round(t2 - t1, 3),
                                   "aggregation": round(t3 - t2, 3)}})
