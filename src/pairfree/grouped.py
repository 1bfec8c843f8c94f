"""Approximate aggregation with one row selection shared by each group of nearby queries.

IVF scans whole lists, and at τ = 0.01 the rows that carry a query's softmax weight are spread over
hundreds of them: for cosine 0.999 to exact it scans 15-26x the rows a perfect selector would
(docs/paper_scale.md). Scoring each query's own best rows is no cure either: rows that differ from
query to query cannot share a GEMM, and gathering them runs at memory speed. Here nearby queries
share one selection, as in clustered attention (Vyas et al., 2020):

1. Queries are grouped by their nearest IVF centroid (the memory's k-means partition), groups
   larger than `group_size` are split by spherical k-means, and the 30 % of queries farthest from
   their group's mean move to the nearest mean of all groups (`regroup`).
2. Each group's unit mean direction is scored against the whole memory once (1/group size of
   exact's work), and `rows` rows are selected from its softmax.
3. Every query of the group is scored exactly against the selected rows in one dense GEMM and
   softmax-averaged over them, with the rest of the memory (the tail) estimated in one of three ways:

   - "sampled" (default): the selection is a priority sample of the mean's softmax at the group's
     temperature (τ / r, r the members' mean cosine to the mean: `GroupedMemory.passes`; Duffield, Lund
     & Thorup, 2007): the rows of largest score + Exp(1) noise. The rows the mean weighs most are
     kept for sure, the others with probability proportional to their weight, and each stands for
     max(1, z / w) rows of its weight (z the first key left out), so every query's weighted sums
     and mass over the selection are unbiased estimates of its own over the whole memory. At τ = 0.01
     a fifth of a paper-scale mean's softmax mass lies beyond its 16k best rows, spread over millions;
     sampled, it takes 1.4-2.6x fewer rows than the mean's tail for cosine 0.999, at a wider spread
     over queries (docs/paper_scale.md).
   - "mean": the best rows, and the mean's own softmax outside them, as a weighted sum and a mass
     relative to the selection's ("improved clustered attention"): out = (softmax average over the
     selection + tail_vector) / (1 + tail_mass). A group of one query is then exact for any `rows`.
   - "none": the best rows only.

`rows` >= the memory is exact for any group and tail. `rows` is calibrated on sample queries against
exact in the GEMM dtype (mean cosine, less two standard errors, at least `min_cosine`), like IVF's
probes, the sample stratified by the queries' cosine to their group's mean (`Strata`); its trials read
one kept pass (`KeptSelections`), and a uniform sample checks the run against fp32 exact. A query far
from its group's mean is served worse than the mean query: the report's 1st percentile and minimum say
how much. Each query's error can be estimated from its own weights over the sample, without an exact
reference (`GroupedMemory._relative_error`), and `IVFSettings.redo` recomputes the share of queries with
the largest estimates exactly after the pass. Groups are formed over all the queries of
a call (denser queries, tighter groups); on Ray (`distributed.RayGroups`) the driver keeps the sums
that need every query and the reading of calibration's trials, and tasks do the rest.
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import numpy as np
import torch

from pairfree.memory import as_tensor, host_rows

#: each query's scores are shifted by its best over this many of its group's best rows
SHIFT_ROWS = 16


def query_groups(queries, centroids: torch.Tensor, size: int, *, block: int = 65536, iters: int = 4,
                 dtype: torch.dtype = torch.float32, regroup: float = 0.3, runner=None) -> QueryGroups:
    """Row indices of `queries` grouped by nearest centroid, groups larger than `size` split by a few
    rounds of spherical k-means (seeded with evenly spaced members, so the grouping is deterministic).

    `regroup`: then the share of queries farthest from their group's unit mean (lowest cosine to it)
    moves to the nearest unit mean of all groups, one spherical k-means step for them (one GEMM per
    block against every mean). The memory's cells group queries of another modality loosely (a text's
    nearest image centroid), and a query's error grows steeply with its distance to its group's mean:
    on the paper-scale world the tenth of queries farthest from it carried half to three quarters of
    the error. Moving the farthest 30 % lifts their cosine to the mean from 0.75 to 0.82 at the 10th
    percentile (groups of 512; moving all of them: the same, at twice the time).

    `runner` (`distributed.RayGroups`): the nearest centroids, the cells' splits and the moves run there,
    on the same blocks and cells (the same result); the sums they need stay here."""
    n = queries.shape[0]
    dev = centroids.device
    cd = centroids.to(dtype)
    if runner is None:
        near = np.empty(n, dtype=np.int64)
        cell_sums = torch.zeros(centroids.shape[0], centroids.shape[1], device=dev)
        for s, q in _blocks(queries, block, dev):
            a = _nearest(q, cd)
            near[s : s + len(q)] = a.cpu().numpy()
            cell_sums.index_add_(0, a, q)
    else:
        near = runner.per_block(queries, block, _nearest, (cd,))
        cell_sums = _sums(queries, near, centroids.shape[0], block, dev)
    order = np.argsort(near, kind="stable")
    cells = np.split(order, np.cumsum(np.bincount(near, minlength=centroids.shape[0]))[:-1])
    big = [idx for idx in cells if len(idx) > size]
    if runner is None:
        splits = (_split(torch.from_numpy(host_rows(queries, idx)).to(dev), idx, size, iters) for idx in big)
    else:
        splits = iter(runner.splits(queries, big, size, iters))
    groups: list[np.ndarray] = []
    means: list[torch.Tensor] = []
    for cell, idx in enumerate(cells):
        if len(idx) <= size:
            if len(idx):
                groups.append(idx)
                means.append(cell_sums[cell])
            continue
        for part, total in next(splits):
            groups.append(part)
            means.append(total.to(dev))
    unit_means = torch.nn.functional.normalize(torch.stack(means), dim=1) if means else torch.zeros(0, queries.shape[1])
    if regroup <= 0 or len(groups) < 2:
        return QueryGroups(groups, unit_means)
    return _regroup(queries, groups, unit_means, regroup, block, dtype, runner)


def _nearest(q: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each fp32 row's nearest of the unit `centroids` (in their dtype; max: 2.3x faster than argmax in bf16)."""
    return (q.to(centroids.dtype) @ centroids.T).max(1).indices


def _moved(q: torch.Tensor, at: torch.Tensor, means: torch.Tensor, md: torch.Tensor, threshold: float
           ) -> torch.Tensor:
    """Group assignments `at` of fp32 rows `q`, those of cosine <= `threshold` to their group's unit mean
    (`means`) moved to the nearest of them (`md`: the means in the GEMM dtype)."""
    far = torch.nonzero((q * means[at]).sum(1) <= threshold).squeeze(1)
    if len(far):
        at = at.clone()
        at[far] = _nearest(q[far], md)
    return at


def _sums(queries, labels: np.ndarray, k: int, block: int, dev: torch.device) -> torch.Tensor:
    """Per label, the sum of its fp32 rows (k, d), added block by block as the local loops add them."""
    sums = torch.zeros(k, queries.shape[1], device=dev)
    for s, q in _blocks(queries, block, dev):
        sums.index_add_(0, torch.from_numpy(labels[s : s + len(q)]).to(dev), q)
    return sums


class QueryGroups(list):
    """The groups (arrays of query indices), with `means`: their unit mean directions (G, d), fp32, which
    calibration's strata read (each query's cosine to its group's mean) without another pass over the
    queries."""

    def __init__(self, groups: list[np.ndarray], means: torch.Tensor):
        super().__init__(groups)
        self.means = means

    def cosines_to_means(self, queries, ids: np.ndarray) -> np.ndarray:
        """Each query of `ids`' cosine to its group's unit mean."""
        at = np.empty(queries.shape[0], dtype=np.int64)
        for j, g in enumerate(self):
            at[g] = j
        q = torch.nn.functional.normalize(torch.from_numpy(host_rows(queries, ids)).float(), dim=1)
        return (q * self.means[torch.from_numpy(at[ids])].to(q.device)).sum(1).cpu().numpy()


def _split(x: torch.Tensor, idx: np.ndarray, size: int, iters: int, fanout: int = 64
           ) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(indices, sum of rows) of the parts of a cell (rows `x`, indices `idx`) split to about `size` by
    spherical k-means with k = ceil(n / size), or, where k would exceed `fanout`, into `fanout` parts
    first, each split again. A round costs n·k: aggregated queries are smooth and crowd into few cells
    (on the paper-scale world one cell held 1.14M of 1.8M aggregated texts), and splitting it at once,
    k = 1117, took 95 s."""
    k = math.ceil(len(idx) / size)
    c = x[torch.linspace(0, len(idx) - 1, min(k, fanout), device=x.device).long()]
    for _ in range(iters):
        a = (x @ c.T).argmax(1)
        c = torch.nn.functional.normalize(torch.zeros_like(c).index_add_(0, a, x), dim=1)
    a = (x @ c.T).argmax(1)
    sums = torch.zeros_like(c).index_add_(0, a, x)
    a = a.cpu().numpy()
    parts = []
    for j in np.unique(a):
        inside = a == j
        if k <= fanout or inside.sum() <= size:
            parts.append((idx[inside], sums[j]))
        elif inside.all():  # the round found no split: split at once
            parts += _split(x, idx, size, iters, fanout=k)
        else:
            parts += _split(x[torch.from_numpy(inside).to(x.device)], idx[inside], size, iters, fanout)
    return parts


def _blocks(queries, block: int, dev: torch.device):
    """(start, fp32 rows) of `queries` in blocks of `block` rows."""
    for s in range(0, queries.shape[0], block):
        yield s, torch.from_numpy(host_rows(queries, slice(s, s + block))).to(dev).float()


def _regroup(queries, groups: list[np.ndarray], means: torch.Tensor, share: float, block: int,
             dtype: torch.dtype, runner=None) -> QueryGroups:
    """`groups` with the `share` of queries of lowest cosine to their group's unit mean moved to the group
    of nearest mean (the threshold a quantile of a strided sample of ~20k queries), with their new means;
    empty groups dropped."""
    n = queries.shape[0]
    assign = np.empty(n, dtype=np.int64)
    for j, g in enumerate(groups):
        assign[g] = j
    at = torch.from_numpy(assign).to(means.device)
    probe = np.arange(0, n, max(1, n // 20000))
    q = torch.from_numpy(host_rows(queries, probe)).to(means.device).float()
    threshold = float(torch.quantile((q * means[at[probe]]).sum(1), share)) if share < 1 else math.inf
    md = means.to(dtype)
    if runner is None:
        sums = torch.zeros_like(means)
        for s, q in _blocks(queries, block, means.device):
            at[s : s + len(q)] = _moved(q, at[s : s + len(q)], means, md, threshold)
            sums.index_add_(0, at[s : s + len(q)], q)
        assign = at.cpu().numpy()
    else:
        assign = runner.per_block(queries, block, _moved, (means, md, threshold), per_row=assign)
        sums = _sums(queries, assign, len(means), block, means.device)
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=len(groups))
    kept = torch.from_numpy(np.flatnonzero(counts)).to(means.device)
    return QueryGroups([g for g in np.split(order, np.cumsum(counts)[:-1]) if len(g)],
                       torch.nn.functional.normalize(sums[kept], dim=1))


class GroupedMemory:
    """Keys and values held in the GEMM dtype (float32, or bfloat16 with float32 softmax and sums)."""

    def __init__(self, keys, values: Sequence, device: torch.device, dtype: torch.dtype = torch.float32,
                 seed: int = 0):
        self.device, self.dtype, self.seed = device, dtype, seed
        self._draw: torch.Tensor | None = None
        self.keys = as_tensor(keys).to(device=device, dtype=dtype)
        self.values = [None if v is keys else as_tensor(v).to(device=device, dtype=dtype) for v in values]
        self._work: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A reused (shape) block, in the GEMM dtype unless given. Each group gathers and scores blocks
        of 50-150 MB, and each batch of means scores 0.3-0.6 GB; allocated afresh, the OS zero-fills
        every page on first touch (a third of a group's time, half of a means' batch, on the
        paper-scale world). Grown, never shrunk, for the life of this memory."""
        size = math.prod(shape)
        buf = self._work.get(name)
        if buf is None or buf.numel() < size:
            buf = self._work[name] = torch.empty(size, dtype=dtype or self.dtype, device=self.device)
        return buf[:size].view(shape)

    def _rows(self, x: torch.Tensor, top: torch.Tensor, name: str) -> torch.Tensor:
        """x[top] gathered into the reused block `name`."""
        return torch.index_select(x, 0, top, out=self._buffer(name, len(top), x.shape[1]))

    def value(self, i: int) -> torch.Tensor:
        v = self.values[i]
        return self.keys if v is None else v

    def selections(self, means: torch.Tensor, rows: int, tau: float, tail: str, ordered: bool = False,
                   offsets: torch.Tensor | None = None, temper: torch.Tensor | None = None):
        """For unit group means (B, d): each mean's selection of `rows` rows (B, R; the `SHIFT_ROWS` best
        by score first) and what `group` needs for its tail:

        - "sampled": the rows of largest priority key (score + the group's Exp(1) noise, `_sampled`),
          and per row the log of its Horvitz-Thompson factor max(1, z / w) (B, R), z the next key;
        - "mean": the best rows, their softmax weights (B, R), the weighted sums over the whole memory per
          value (B, dv) and the whole mass (B,), shifted by each mean's best score;
        - "none": the best rows only.

        `ordered`: rows in descending key (or score) order, so a selection of fewer rows is a prefix
        (with "sampled", the keys (B, R + 1: the last is the first key left out) instead of factors).
        `temper` (B,), sampled: each mean's scores times it, so its sample follows its softmax at
        temperature τ / temper (`passes` gives each group's mean cosine to its mean). Scores and weights
        are written into buffers kept across batches."""
        dt, b, m = self.dtype, len(means), self.keys.shape[0]
        raw = torch.mm(means.to(dt), self.keys.T, out=self._buffer("mean_scores", b, m))
        s = raw if dt == torch.float32 else self._buffer("mean_scores_fp32", b, m, dtype=torch.float32).copy_(raw)
        s.div_(tau)
        s -= s.amax(1, keepdim=True)
        if tail == "sampled":
            if temper is not None:
                s.mul_(temper.to(s.device)[:, None])
            return self._sampled(s, rows, ordered, torch.zeros(b, dtype=torch.int64) if offsets is None else offsets)
        top = top_rows(s, min(rows, m), ordered)
        if tail == "none":
            return top, None
        w = s.exp_()
        # in the GEMM dtype: the selection's share is subtracted with the same rounding in `group`
        wd = w if dt == torch.float32 else raw.copy_(w)
        return top, (torch.gather(w, 1, top), [(wd @ self.value(i)).float() for i in range(len(self.values))],
                     w.sum(1))

    def _noise(self) -> torch.Tensor:
        """Exp(1) noise over the memory rows (-log u, u uniform): one fixed draw per memory (seeded)."""
        if self._draw is None:
            gen = torch.Generator().manual_seed(self.seed)
            self._draw = torch.empty(self.keys.shape[0]).exponential_(generator=gen).to(self.device)
        return self._draw

    def _sampled(self, s: torch.Tensor, rows: int, ordered: bool, offsets: torch.Tensor):
        """Priority sampling (Duffield, Lund & Thorup, 2007) of each mean's softmax: with w = exp(score)
        and u uniform per row, the `rows` largest keys w / u (here score - log u) are kept, z is the next
        key, and a kept row stands for max(1, z / w) rows of its weight: an unbiased estimate of any
        sum over the memory weighted by w. Rows with w >= z are kept for sure (the best ones), the
        others with probability w / z (the tail, by importance). Each group's noise is the memory's
        one draw rotated by the group's offset (two in-place adds, no draw per group): rows are lucky
        independently from group to group, and a group draws the same in calibration and in the run."""
        m = s.shape[1]
        e = self._noise()
        for row, o in zip(s, offsets.tolist()):
            row[: m - o] += e[o:]
            row[m - o :] += e[:o]
        top = top_rows(s, min(rows + 1, m), ordered)
        keys = s.gather(1, top)
        if rows >= m:  # every row kept: z = -inf, each row stands for itself
            keys = torch.cat([keys, torch.full((len(s), 1), -math.inf, device=s.device)], dim=1)
        if ordered:
            return top[:, : keys.shape[1] - 1], keys
        if rows < m:
            last = keys.argmin(1, keepdim=True)
            keep = torch.ones_like(top, dtype=torch.bool).scatter_(1, last, False)
            top, keys = top[keep].view(len(s), rows), torch.cat([keys[keep].view(len(s), rows), keys.gather(1, last)], 1)
        score = keys[:, :-1] - e[(top + offsets[:, None].to(top.device)) % m]
        return _best_first(score, top, (keys[:, -1:] - score).clamp_min(0))

    def group(self, q: torch.Tensor, top: torch.Tensor, tail, tau: float, estimate: bool = False
              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One group's queries (fp32) softmax-averaged over its selected rows `top` (one tensor per value),
        and, sampled with `estimate`, each query's estimated error (`_relative_error`; else None). The tail:

        - sampled (`tail` the rows' log factors): each row's weight times its factor, so the sums
          over the selection estimate the query's own sums over the whole memory (unbiased, each; their
          ratio is the estimate);
        - the mean's (`tail` a tuple): (softmax average over the selection + tail sum / selection mass)
          / (1 + tail mass / selection mass), all from the mean's weights, so a group of one query is
          exact;
        - none (`tail` None): the selection's softmax average.

        Each query's scores are shifted by its best score over the group's `SHIFT_ROWS` best rows inside
        the score GEMM, so a bfloat16 score is rounded near 0, where the rows that carry weight sit (one
        row's score was the shift before, and which of two tied best rows came first moved a toy
        query's cosine from 0.995 to 0.990), and the weights are
        one in-place `exp` and a sum (no max pass and no normalising pass over the weights), as in
        `ivf.ProbedMemory.aggregate`. A query whose shifted weights overflow or vanish (a row far
        above the group's best, or all far below, which takes a small τ) is redone with a max."""
        dt = self.dtype
        kr = self._rows(self.keys, top, "keys")
        w = self.weights(q, kr, tau, out=self._buffer("weights", len(q), len(top)))
        sampled = isinstance(tail, torch.Tensor)
        if sampled:
            w.mul_(tail.exp().to(dt))
        # summed in fp32, rounded to the GEMM dtype (up to 0.4 % in bf16; 8x faster than an fp32 result): a
        # factor common to a query's outputs, each already rounded so by the value GEMM, so sampled and
        # untailed directions do not change (with the mean's tail, the selection's share against it does)
        mass = w.sum(1).float()
        bad = ~_usable(mass)
        if bad.any():
            w[bad], mass[bad] = self._softmax(q[bad], kr, tau, tail if sampled else None), 1.0
        mean_tail = tail is not None and not sampled
        if mean_tail:
            w_top, totals, total_mass = tail
            top_mass = w_top.sum()
            rho = (total_mass - top_mass).clamp_min(0) / top_mass
            w_top = w_top.to(dt)
        outs = []
        for i in range(len(self.values)):
            vr = kr if self.values[i] is None else self._rows(self.values[i], top, "values")
            h = (w @ vr).float() / mass[:, None]
            if mean_tail:
                h = (h + (totals[i] - (w_top @ vr).float()) / top_mass) / (1 + rho)
            outs.append(h)
        return outs, self._relative_error(w, mass, tail) if sampled and estimate else None

    def _relative_error(self, w: torch.Tensor, mass: torch.Tensor, log_factors: torch.Tensor) -> torch.Tensor:
        """Per query, the estimated relative standard error of its sampled softmax mass: a row kept with
        probability 1/f stands for f rows, and the Horvitz-Thompson variance of a sum of weights w (its
        factor included) is estimated by Σ w² (1 - 1/f) over the kept rows (rows kept for sure, f = 1, add
        none). One more pass over the weights (a square and a matrix-vector product: 4 % of a group's time in
        fp32, so only computed when asked for).
        On the paper-scale world its rank correlation with a query's error (1 - cosine to exact) is
        0.97-0.99, and that error is ~0.4x its square (docs/paper_scale.md): it finds the far queries a
        group's shared sample serves badly without an exact reference, so `IVFSettings.redo` can redo them."""
        keep = (-log_factors).expm1_().neg_().to(w.dtype)  # 1 - 1/f
        sq = torch.mul(w, w, out=self._buffer("squares", *w.shape))
        return (sq @ keep).float().clamp_min_(0).sqrt_() / mass

    def weights(self, q: torch.Tensor, kr: torch.Tensor, tau: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """exp((q·k - max(q·kr[:SHIFT_ROWS])) / τ) for fp32 queries over rows `kr`, in the GEMM dtype,
        unnormalised."""
        return self.shifted_scores(q, kr[:SHIFT_ROWS], kr, tau, out).exp_()

    def shifted_scores(self, q: torch.Tensor, best: torch.Tensor, kr: torch.Tensor, tau: float,
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """(q·k - max(q·best)) / τ over rows `kr`, the shift inside the GEMM (in the GEMM dtype)."""
        shift = (q @ best.float().T).amax(1, keepdim=True) / tau
        return torch.addmm(shift.to(self.dtype), (q / tau).to(self.dtype), kr.T, beta=-1, out=out)

    def _softmax(self, q: torch.Tensor, kr: torch.Tensor, tau: float, log_factors: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Softmax weights of queries over rows `kr` (each row's weight times its factor), in float32 with
        a max, as the GEMM dtype."""
        s = (q @ kr.float().T) / tau
        return torch.softmax(s if log_factors is None else s + log_factors, dim=1).to(self.dtype)

    def passes(self, queries, groups: Sequence[np.ndarray], rows: int, tau: float, tail: str, batch: int = 64,
               ordered: bool = False, ids: np.ndarray | None = None):
        """Per batch of groups: (first group's position, the groups' queries (fp32), `selections` of their
        unit means). 64 groups per batch: the means' score GEMM with fewer rows is bound by reading the
        memory, not by the GEMM rate. A group's noise offset comes from its first query's index (the
        same group, the same draw); `ids`: each row of `queries`' index among all queries, where they
        are a shard of them (a Ray task's).

        Sampled, each group's sample is drawn from its mean's softmax at temperature τ / r, r the
        members' mean cosine to the mean: a member at cosine c to it weighs a row by about
        exp(c·mean·row / τ) (times a factor of its part orthogonal to the mean, which varies little from
        row to row), so the group's average softmax, the proposal that serves all of its members, is
        the mean's at τ / r. Drawn at τ, the sample is sharper than that and under-draws the rows its
        far members weigh (at paper scale r is ~0.8, and drawn at τ / r a selection reaches the same
        mean cosine with ~20 % fewer rows, docs/paper_scale.md)."""
        for s in range(0, len(groups), batch):
            batch_groups = groups[s : s + batch]
            qs = [torch.from_numpy(host_rows(queries, g)).to(self.device) for g in batch_groups]
            resultants = torch.stack([torch.nn.functional.normalize(q, dim=1).mean(0) for q in qs])
            means = torch.nn.functional.normalize(resultants, dim=1)
            offsets = torch.tensor([self.offset(g if ids is None else ids[g]) for g in batch_groups])
            temper = resultants.norm(dim=1) if tail == "sampled" else None
            yield s, qs, self.selections(means, rows, tau, tail, ordered, offsets, temper)

    def offset(self, group: np.ndarray) -> int:
        """The rotation of the noise for a group (multiplicative hashing of its first query's index)."""
        return (int(group[0]) * 2654435761 + self.seed) % self.keys.shape[0]

    def aggregate(self, queries, groups: Sequence[np.ndarray], rows: int, tau: float, tail: str = "sampled",
                  batch: int = 64, sink=None, score: Sequence[np.ndarray] | None = None,
                  ids: np.ndarray | None = None, estimate: bool = False) -> int:
        """Every group through `selections` and `group`; `sink(indices, results, errors)` receives each
        group's results (fp32 tensors, one per value) and, with `estimate`, their estimated errors (`group`;
        else None). `score`: per group, the members to score (calibration scores its sample only; the means
        still come from whole groups). `ids`: see `passes`. Returns
        the (query, row) scores computed."""
        scored = 0
        for s, qs, (top, tails) in self.passes(queries, groups, rows, tau, tail, batch, ids=ids):
            for j, (g, q) in enumerate(zip(groups[s : s + batch], qs)):
                if score is not None:
                    keep = np.isin(g, score[s + j])
                    g, q = g[keep], q[torch.from_numpy(keep).to(q.device)]
                res, err = self.group(q, top[j], _tail_of(tails, j), tau, estimate)
                scored += len(g) * top.shape[1]
                if sink is not None:
                    sink(g, res, err)
        return scored


def _usable(mass: torch.Tensor) -> torch.Tensor:
    """Per query, whether its shifted weights can be used as they are: their sum neither overflows nor
    vanishes, and stays low enough (<= 1e30) that the weighted sums of values below ~1e8 cannot overflow
    float32 either (unnormalised inputs at a small τ reach such weights; an overflowing sum had written
    NaN into the outputs). The others are redone with a max."""
    return torch.isfinite(mass) & (mass >= 1e-30) & (mass <= 1e30)


def _tail_of(tails, j: int):
    """Group j's part of a batch's tails (see `GroupedMemory.selections`)."""
    if tails is None or isinstance(tails, torch.Tensor):
        return None if tails is None else tails[j]
    return tails[0][j], [v[j] for v in tails[1]], tails[2][j]


def top_rows(s: torch.Tensor, k: int, ordered: bool = False, stride: int = 16) -> torch.Tensor:
    """Indices of each row's k largest entries (B, k), the largest first, all in descending order if
    `ordered`. `topk` over a 2.31M-wide row costs ~14 ms (0.9 s per batch of 64 means, a fifth of the
    means' pass); here a threshold read from every `stride`-th entry, set below the k-th largest by a
    margin, keeps 1.05-1.1 k candidates per row, and `topk` runs over those. A row whose threshold keeps
    fewer than k (a sample that misleads) is selected over the whole row. Ties at the k-th value
    may be broken differently from `topk`'s."""
    n = s.shape[1]
    if 8 * k > n or n < 65536:
        top = s.topk(k, dim=1, sorted=ordered).indices
    else:
        ks = min(n // stride, math.ceil(k / stride * 1.03 + 4 * math.sqrt(k / stride)))
        thresholds = s[:, ::stride].topk(ks, dim=1).values[:, -1]
        top = torch.empty(len(s), k, dtype=torch.int64, device=s.device)
        for i, row in enumerate(s):
            cand = (row >= thresholds[i]).nonzero().squeeze(1)
            top[i] = (row.topk(k, sorted=ordered).indices if len(cand) < k
                      else cand[row[cand].topk(k, sorted=ordered).indices])
    return top if ordered else _best_first(s.gather(1, top), top)[0]


def _best_first(score: torch.Tensor, top: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`top` (and each of `extra`, aligned with it) with each row's `SHIFT_ROWS` best entries by `score`
    (the scores at `top`) moved to the front, in descending order (`GroupedMemory.weights` shifts each
    query's scores by its best over them)."""
    few = min(SHIFT_ROWS, top.shape[1])
    j = score.topk(few, dim=1).indices
    rest = torch.ones_like(top, dtype=torch.bool).scatter_(1, j, False)
    return tuple(torch.cat([x.gather(1, j), x[rest].view(len(x), -1)], dim=1) for x in (top, *extra))


def _prefix(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along dim 0 with a leading zero: entry k sums the first k blocks."""
    return torch.cat([torch.zeros_like(x[:1]), x.cumsum(0)])


class KeptSelections:
    """Calibration's trials read from one pass over its sample's groups.

    Each group's selection is kept at `rows` rows in descending score (or, sampled, key) order, so
    every smaller selection is a prefix of it (a mean's best r rows are the first r of its best R).
    Over those rows, in `blocks` blocks, the sample queries' weights and weighted sums, and the mean's
    (for the tail), are summed and accumulated; sampled, each row's factor changes with the key left
    out, so the sums are taken per trial instead (`_sampled_sums`). A trial at a multiple of the block
    size reads its results from these sums instead of scoring its rows again (a dozen trials cost one
    pass). Other row counts, and queries whose weights overflow, are computed directly, as
    `GroupedMemory.group`."""

    def __init__(self, gm: GroupedMemory, queries, groups: Sequence[np.ndarray], members: Sequence[np.ndarray],
                 rows: int, tau: float, tail: str, blocks: int | None = None, batch: int = 64,
                 ids: np.ndarray | None = None):
        """`ids`: as in `GroupedMemory.passes` (a Ray task's shard of the groups' queries); `members` and
        the kept `self.ids` are then indices among all queries."""
        self.gm, self.tau, self.tail = gm, tau, tail
        self.rows = min(rows, gm.keys.shape[0])
        # sampled block sums cost a GEMM per block (64: ~70 s for 1000 sample queries over 65,536 rows of
        # a two-value paper-scale hop); prefix sums cost the same for any number of blocks
        self.block = max(1, self.rows // (blocks or (64 if tail == "sampled" else 128)))
        index_dtype = torch.int32 if gm.keys.shape[0] < 2**31 else torch.int64  # half the memory kept
        self.ids: list[np.ndarray] = []
        self.q: list[torch.Tensor] = []
        self.top: list[torch.Tensor] = []
        self.tails: list = []
        self.sums: list = []
        for s, qs, (top, tails) in gm.passes(queries, groups, self.rows, tau, tail, batch, ordered=True, ids=ids):
            for j, (g, q) in enumerate(zip(groups[s : s + batch], qs)):
                g = g if ids is None else ids[g]
                keep = np.isin(g, members[s + j])
                q = q[torch.from_numpy(keep).to(q.device)]
                self.ids.append(g[keep])
                self.q.append(q)
                self.top.append(top[j].to(index_dtype))
                if tail == "sampled":  # the keys, and the scores (keys less the group's noise)
                    score = tails[j][:-1] - gm._noise()[(top[j] + gm.offset(g)) % gm.keys.shape[0]]
                    self.tails.append((tails[j], score))
                    self.sums.append(self._sampled_sums(q, top[j], tails[j], score))
                else:
                    t = _tail_of(tails, j)
                    self.tails.append(t)
                    self.sums.append(self._prefix_sums(q, top[j], t))

    STATE = ("ids", "q", "top", "tails", "sums")

    def state(self) -> dict[str, list]:
        """What a trial reads, per group (a Ray task returns it; `joined` puts shards back together). Each
        tensor copied out of its batch's (a view pickles its whole storage: 64 groups' rows per group)."""
        def compact(x):
            if isinstance(x, torch.Tensor):
                return x.clone()
            return type(x)(compact(y) for y in x) if isinstance(x, (list, tuple)) else x

        return {name: compact(getattr(self, name)) for name in self.STATE}

    @classmethod
    def joined(cls, gm: GroupedMemory, states: Sequence[dict[str, list]], rows: int, tau: float, tail: str,
               blocks: int | None = None) -> "KeptSelections":
        """The selections of consecutive shards of the groups, each kept by `KeptSelections(...).state()`
        with the same `rows`, `tail` and `blocks`, as one."""
        kept = cls(gm, None, [], [], rows, tau, tail, blocks)
        for name in cls.STATE:
            setattr(kept, name, [x for state in states for x in state[name]])
        return kept

    def _prefix_sums(self, q: torch.Tensor, top: torch.Tensor, tail):
        """Per block of rows, accumulated: the queries' masses (blocks + 1, n) and weighted sums per
        value (blocks + 1, n, dv); the mean's selection mass (blocks + 1,) and weighted sums per value
        (blocks + 1, dv), with the roundings of `GroupedMemory.group` (bf16 weights, fp32 sums)."""
        gm, b = self.gm, self.block
        nb = self.rows // b
        sel = top[: nb * b]
        kr = gm._rows(gm.keys, sel, "keys")
        w = gm.weights(q, kr, self.tau, out=gm._buffer("weights", len(q), nb * b)).view(len(q), nb, b)
        q_mass = _prefix(w.sum(2, dtype=torch.float32).T)
        wt = None if tail is None else tail[0][: nb * b]
        t_mass = None if wt is None else _prefix(wt.view(nb, b).sum(1))
        q_sums, t_sums = [], []
        for i in range(len(gm.values)):
            vb = (kr if gm.values[i] is None else gm._rows(gm.values[i], sel, "values")).view(nb, b, -1)
            q_sums.append(_prefix(torch.bmm(w.transpose(0, 1), vb).float()))
            if wt is not None:
                t_sums.append(_prefix(torch.bmm(wt.to(gm.dtype).view(nb, 1, b), vb)[:, 0].float()))
        return q_mass, q_sums, t_mass, t_sums

    def _sampled_sums(self, q: torch.Tensor, top: torch.Tensor, keys: torch.Tensor, score: torch.Tensor):
        """Sampled: per trial on the block grid (the first k blocks of rows), the queries' masses
        (blocks + 1, n) and weighted sums per value (blocks + 1, n, dv), each row weighted by its factor
        at that trial (they change with the key left out, so these are not prefix sums: one GEMM of
        blocks x n weight rows against the kept rows, bf16 weights and fp32 sums as `group`)."""
        gm, b = self.gm, self.block
        nb = self.rows // b
        sel = top[: nb * b]
        kr = gm._rows(gm.keys, sel, "keys")
        # shifted as `GroupedMemory.group` shifts (by the best over the mean's 16 best rows, inside the GEMM)
        best = kr[score[: nb * b].topk(min(SHIFT_ROWS, nb * b)).indices]
        s = gm.shifted_scores(q, best, kr, self.tau).float()
        ends = b * torch.arange(1, nb + 1, device=s.device)
        log_f = (keys[ends][:, None] - score[None, : nb * b]).clamp_min_(0)
        log_f.masked_fill_(torch.arange(nb * b, device=s.device)[None] >= ends[:, None], -math.inf)
        w = (s[:, None] + log_f[None]).exp_()  # (n, blocks, rows)
        zero = torch.zeros(1, len(q), device=s.device)
        q_mass = torch.cat([zero, w.sum(2).T])
        wd = w.view(-1, nb * b).to(gm.dtype)
        q_sums = []
        for i in range(len(gm.values)):
            vr = kr if gm.values[i] is None else gm._rows(gm.values[i], sel, "values")
            h = (wd @ vr).float().view(len(q), nb, -1).transpose(0, 1)
            q_sums.append(torch.cat([torch.zeros_like(h[:1]), h]))
        return q_mass, q_sums, None, None

    def results(self, j: int, rows: int) -> list[torch.Tensor] | None:
        """Group j's sample queries' results at `rows` from the block sums; None where they cannot
        give them (off the block grid, or weights that overflow or vanish)."""
        q_mass, q_sums, t_mass, t_sums = self.sums[j]
        k, off = divmod(rows, self.block)
        if off or not 0 < k < len(q_mass):
            return None
        mass = q_mass[k]
        if not _usable(mass).all():
            return None
        outs = []
        for i, qs in enumerate(q_sums):
            h = qs[k] / mass[:, None]
            if self.tail == "mean":
                _, totals, total_mass = self.tails[j]
                top_mass = t_mass[k]
                rho = (total_mass - top_mass).clamp_min(0) / top_mass
                h = (h + (totals[i] - t_sums[i][k]) / top_mass) / (1 + rho)
            outs.append(h)
        return outs

    def aggregate(self, rows: int, sink) -> None:
        """Every kept group's sample queries at `rows` (<= the rows kept) into `sink(indices, results)`."""
        if rows > self.rows:
            raise ValueError(f"kept {self.rows} rows per group, asked for {rows}")
        for j, ids in enumerate(self.ids):
            res = self.results(j, rows)
            if res is None:
                top, t = self.top[j][:rows].long(), self.tails[j]
                if self.tail == "sampled":
                    keys, score = t
                    top, t = (x[0] for x in _best_first(score[None, :rows], top[None],
                                                        (keys[rows] - score[None, :rows]).clamp_min(0)))
                elif t is not None:
                    t = (t[0][:rows], t[1], t[2])
                res, _ = self.gm.group(self.q[j], top, t, self.tau)
            sink(ids, res)


def _members(groups: Sequence[np.ndarray], wanted: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The groups holding any of the (sorted) query indices `wanted`, and those queries within each."""
    subset, inside = [], []
    for g in groups:
        hit = g[np.isin(g, wanted, assume_unique=True)]
        if len(hit):
            subset.append(g)
            inside.append(hit)
    return subset, inside


def _sample_cosines(gm: GroupedMemory, queries, groups, sample: np.ndarray, exact: list[torch.Tensor],
                    rows: int, tau: float, tail: str, kept: KeptSelections | None = None) -> np.ndarray:
    """Per sample query (sorted indices), the lowest cosine over the values to its exact aggregate.
    `kept`: the selections of `_members(groups, sample)`, kept at `rows` or more."""
    check = Check(sample, exact)
    if kept is not None:
        kept.aggregate(rows, check.sink)
    else:
        check.run(gm, queries, groups, rows, tau, tail)
    return check.cosines()


def choose_rows(gm: GroupedMemory, queries, groups, sample: np.ndarray, exact: list[torch.Tensor], tau: float,
                min_cosine: float, tail: str, keep: int = 16384, strata: "Strata | None" = None,
                trials: list[dict[str, float]] | None = None, runner=None) -> int:
    """The fewest shared rows whose mean cosine to exact on the calibration queries, less two standard
    errors, reaches `min_cosine` (`strata`: the sample is stratified, mean and error weighted by them):
    doubling from 2048, then bisection to 1/32 of the answer (its steps stay on the kept blocks' grid).
    The trials read `KeptSelections` of the sample's groups at `keep` rows (built again at the doubling's
    step that outgrows them; the bisection stays below it) instead of each repeating the means' pass and
    the scoring. `trials`, where given, receives each trial's rows, mean cosine and lower bound (the
    report's `calibration_trials`: how far from the target each step landed). `runner`
    (`distributed.RayGroups`): the kept selections are built as tasks of whole batches of groups, so
    only the trials' reading of them stays here."""
    from pairfree.ivf import _lower_bound

    m = gm.keys.shape[0]
    subset, inside = _members(groups, sample)
    kept: KeptSelections | None = None

    def good(r: int) -> bool:
        nonlocal kept
        if r >= m:
            return True
        if kept is None or r > kept.rows:
            kept = None  # freed before the next is built
            if runner is not None:
                kept = runner.kept(gm, queries, subset, inside, max(r, keep), tau, tail)
            else:
                kept = KeptSelections(gm, queries, subset, inside, max(r, keep), tau, tail)
        cos = _sample_cosines(gm, queries, groups, sample, exact, r, tau, tail, kept)
        mean = float(cos.mean()) if strata is None else strata.mean(cos)
        bound = _lower_bound(cos) if strata is None else strata.lower_bound(cos)
        if trials is not None:
            trials.append({"rows": r, "mean": round(mean, 6), "lower_bound": round(bound, 6)})
        return bound >= min_cosine

    lo, hi = 0, min(2048, m)
    while not good(hi):
        lo, hi = hi, min(2 * hi, m)
    while hi - lo > max(256, hi // 32):
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if good(mid) else (mid, hi)
    return hi


#: calibration's strata: these quantiles of the queries' cosine to their group's mean (the farthest first)
#: the check's fp32 reference keeps at most this much of the memory converted at once (see `calibrate`)
CHECK_RESIDENT_BYTES = 256 << 20
STRATA = (0.05, 0.1, 0.2, 0.4)


class Strata:
    """A stratified calibration sample: each query's stratum (`labels`, aligned with the sorted sample) and
    each stratum's share of all queries (`weights`).

    A query's error grows steeply with its distance to its group's mean (at paper scale the tenth of
    queries farthest from it carry about half of it), so a uniform sample's mean cosine is dominated in
    variance by the few far queries it happens to hold: its two standard errors cost a quarter of the
    rows at cosine 0.999. Drawn in equal numbers from strata of that cosine (the farthest 5 %, 5-10 %,
    10-20 %, 20-40 %, the rest) and weighted by their shares, the estimate of the mean is unbiased and
    its standard error smaller (0.6x on a test world; docs/paper_scale.md)."""

    def __init__(self, labels: np.ndarray, weights: np.ndarray):
        self.labels, self.weights = labels, weights

    @classmethod
    def draw(cls, queries, groups: "QueryGroups", exclude: np.ndarray, size: int, rng: np.random.Generator,
             pool: int = 20) -> tuple[np.ndarray, "Strata"] | None:
        """`size` queries not in `exclude`, drawn in equal numbers from the strata of a uniform pool of
        `pool` x `size` of them (sorted), and their strata; None where a stratum would hold fewer than two
        (then the caller draws uniformly)."""
        free = np.setdiff1d(np.arange(queries.shape[0]), exclude, assume_unique=True)
        cand = np.sort(rng.choice(free, min(len(free), pool * size), replace=False))
        cos = groups.cosines_to_means(queries, cand)
        labels = np.searchsorted(np.quantile(cos, STRATA), cos)
        per = size // (len(STRATA) + 1)
        members = [np.flatnonzero(labels == h) for h in range(len(STRATA) + 1)]
        if min(len(m) for m in members) < 2 or per < 2:
            return None
        picked = np.sort(np.concatenate([rng.choice(m, min(per, len(m)), replace=False) for m in members]))
        weights = np.array([len(m) for m in members]) / len(cand)
        return cand[picked], cls(labels[picked], weights)

    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.weights)).tolist()

    def mean(self, cos: np.ndarray) -> float:
        """The weighted mean of the strata's mean cosines (an unbiased estimate of all queries' mean)."""
        return float(self.weights @ np.array([cos[self.labels == h].mean() for h in range(len(self.weights))]))

    def lower_bound(self, cos: np.ndarray, z: float = 2.0) -> float:
        """`mean` less `z` standard errors."""
        var = np.array([cos[self.labels == h].var(ddof=1) / (self.labels == h).sum() for h in range(len(self.weights))])
        return self.mean(cos) - z * math.sqrt(self.weights**2 @ var)


def grouped_aggregate(queries, keys, values: Sequence, *, tau: float, outs: list[np.ndarray], settings,
                      centroids: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32,
                      normalize: bool = True, progress: bool | str = False, runner=None) -> dict[str, Any]:
    """`aggregate(..., method="ivf")` with `IVFSettings(select="groups")`: queries grouped around the
    memory partition's `centroids`, `rows` calibrated (unless set) on a sample against exact, every group
    written into `outs`, and the rest of the sample's cosines to exact read from that pass. Returns the
    report. `runner` runs grouping's per-query and per-cell work, calibration's exact references and kept
    selections, the groups and the exact fallback elsewhere (`distributed.RayGroups`; calibration's trials
    read every kept selection and stay here)."""
    from pairfree.memory import aggregate, put_rows
    from pairfree.progress import progress as progress_bar

    n, m = queries.shape[0], keys.shape[0]
    t0 = time.perf_counter()
    gm = GroupedMemory(keys, values, device, dtype, seed=settings.seed)
    groups = query_groups(queries, torch.from_numpy(centroids).to(device), settings.group_size, dtype=dtype,
                          regroup=settings.regroup, runner=runner)
    t1 = time.perf_counter()
    report, check = calibrate(gm, queries, keys, values, groups, tau, settings, device, runner)
    t2 = time.perf_counter()
    rows, tail = report["rows"], settings.tail
    if report["rows_scanned_per_query"] > settings.exact_above * m:  # as IVF: then exact is faster
        from pairfree.ivf import exact_fallback

        why = exact_fallback(n, m, report["rows_scanned_per_query"], settings, "the calibrated selection scores")
        if runner is not None:
            runner.exact(queries, keys, list(values), tau=tau, outs=outs, normalize=normalize, progress=progress,
                         dtype=dtype)
        else:
            aggregate(queries, keys, list(values), tau=tau, device=device, out=outs, normalize=normalize,
                      progress=progress, dtype=dtype)
        check.sink(check.ids, [torch.from_numpy(np.asarray(o[check.ids])) for o in outs])
        report.update({"ran": "exact", "work_fraction": 1.0, "cosine_to_exact": check.summary(),
                       "why": why,
                       "seconds": {**report["seconds"], "grouping": round(t1 - t0, 3),
                                   "calibration": round(t2 - t1, 3), "aggregation": round(time.perf_counter() - t2, 3)}})
        return report
    bar = progress_bar(n, progress if isinstance(progress, str) else "aggregate", bool(progress), unit="q")
    errors = np.full(n, math.nan, dtype=np.float32) if settings.redo else None  # redo needs tail="sampled"

    def write(g: np.ndarray, res: list[torch.Tensor]) -> None:
        for o, r in zip(outs, res):
            put_rows(o, g, torch.nn.functional.normalize(r, dim=-1) if normalize else r)

    def sink(g: np.ndarray, res: list[torch.Tensor], err: torch.Tensor | None) -> None:
        check.sink(g, res, err)
        write(g, res)
        if errors is not None:
            errors[g] = err.cpu().numpy()
        bar.update(len(g))

    if runner is not None:
        scored = runner.groups(gm, queries, groups, rows, tau, tail, sink, estimate=errors is not None)
    else:
        scored = gm.aggregate(queries, groups, rows, tau, tail, sink=sink, estimate=errors is not None)
    bar.close()
    t3 = time.perf_counter()
    if errors is not None:
        report["error_estimate"] = {"p50": float(np.quantile(errors, 0.5)), "p99": float(np.quantile(errors, 0.99)),
                                    "max": float(errors.max()), "on_the_check": check.estimate_quality()}
    redone = math.ceil(settings.redo * n) if errors is not None else 0
    if redone:  # the queries of largest estimated error, exact in the GEMM dtype (its copy already here)
        report["cosine_to_exact_before_redo"] = check.summary()
        ids = np.sort(np.argpartition(errors, n - redone)[n - redone :])
        res = exact_rows(queries, ids, gm.keys, [gm.value(i) for i in range(len(gm.values))], tau=tau, dtype=dtype,
                         device=device, runner=runner)
        write(ids, res)
        check.sink(ids, res)
        report["redo"] = {"queries": redone, "share": settings.redo, "estimate_above": float(errors[ids].min()),
                          "seconds": round(time.perf_counter() - t3, 3)}
    report.update({"cosine_to_exact": check.summary(),
                   "work_fraction": (scored + len(groups) * m + redone * m) / max(1, n * m),
                   "seconds": {**report["seconds"], "grouping": round(t1 - t0, 3),
                               "calibration": round(t2 - t1, 3), "aggregation": round(t3 - t2, 3),
                               "redo": round(time.perf_counter() - t3, 3)}})
    return report


def exact_rows(queries, ids: np.ndarray, keys, values: list, *, tau: float, dtype: torch.dtype, device: torch.device,
               runner=None, keep: bool = True, resident_bytes: int = 4 << 30) -> list[torch.Tensor]:
    """Exact aggregates (unnormalised, fp32, one per value) of the queries `ids`: calibration's and the
    check's references, and the queries `IVFSettings.redo` redoes. `runner`: as query shards there (`keep`:
    the memories stay put for later tasks, as the GEMM dtype's copy the groups read)."""
    from pairfree.memory import aggregate

    q = host_rows(queries, ids)
    if runner is not None:
        return runner.reference(q, keys, values, tau=tau, dtype=dtype, keep=keep, resident_bytes=resident_bytes)
    return [torch.from_numpy(e) for e in aggregate(q, keys, values, tau=tau, device=device, normalize=False,
                                                   dtype=dtype, resident_bytes=resident_bytes)]


class Check:
    """The sample queries that did not calibrate, with their exact aggregates: their results are read from
    whichever pass computes them (the run's own, so the check costs no pass of its own), and `summary`
    gives the cosines to exact the report states."""

    def __init__(self, ids: np.ndarray, exact: list[torch.Tensor]):
        self.ids, self.exact = ids, exact
        self.got = [torch.full_like(e, math.nan) for e in exact]
        self.errors = np.full(len(ids), math.nan, dtype=np.float32)

    def sink(self, g: np.ndarray, res: list[torch.Tensor], errors: torch.Tensor | None = None) -> None:
        """Take the results of queries `g` (rows of `res`), and their estimated errors, that are in the check."""
        hit = np.isin(g, self.ids)
        if hit.any():
            at = torch.from_numpy(np.searchsorted(self.ids, g[hit]))
            sel = torch.from_numpy(np.flatnonzero(hit))
            for o, r in zip(self.got, res):
                o[at] = r[sel.to(r.device)].float().cpu()
            if errors is not None:
                self.errors[at.numpy()] = errors[sel.to(errors.device)].cpu().numpy()

    def run(self, gm: GroupedMemory, queries, groups, rows: int, tau: float, tail: str, estimate: bool = False
            ) -> None:
        """Compute the check's queries in a pass of their own (their groups' selections, only them scored;
        `estimate`: with their estimated errors)."""
        subset, inside = _members(groups, self.ids)
        gm.aggregate(queries, subset, rows, tau, tail, sink=self.sink, score=inside, estimate=estimate)

    def cosines(self) -> np.ndarray:
        """Per check query, the lowest cosine over the values to its exact aggregate."""
        from pairfree.ivf import _cosines

        missing = int(torch.isnan(self.got[0][:, 0]).sum())
        if missing:
            raise RuntimeError(f"{missing} of the {len(self.ids)} check queries were not computed")
        return _cosines(self.got, self.exact)

    def summary(self) -> dict[str, float]:
        cos = self.cosines()
        return {"mean": float(cos.mean()), "p1": float(np.quantile(cos, 0.01)), "min": float(cos.min())}

    def estimate_quality(self) -> dict[str, float] | None:
        """How well the estimated errors (`GroupedMemory._relative_error`) order and size the check's errors
        (1 - cosine to exact): their Spearman rank correlation, and the median of error / estimate²
        (an estimate e means a cosine of about 1 - that x e²). None without estimates."""
        err = 1 - self.cosines().astype(np.float64)
        est = self.errors.astype(np.float64)
        if not np.isfinite(est).all() or len(est) < 3:
            return None
        rank = [np.argsort(np.argsort(x, kind="stable"), kind="stable") for x in (est, err)]
        rho = float(np.corrcoef(*rank)[0, 1]) if rank[0].std() and rank[1].std() else math.nan
        pos = est > 0
        scale = float(np.median(err[pos] / est[pos] ** 2)) if pos.any() else math.nan
        return {"rank_correlation": rho, "error_over_estimate_squared": scale}


def calibrate(gm: GroupedMemory, queries, keys, values: Sequence, groups: Sequence[np.ndarray], tau: float,
              settings, device: torch.device, runner=None) -> tuple[dict[str, Any], Check]:
    """`rows` chosen on part of a query sample (exact reference; unless settings.rows is set): the report of
    `grouped_aggregate` before it runs, and the `Check` of the rest of the sample that its pass fills.

    The calibration queries' exact reference is computed in the GEMM dtype (in bf16 its cosine to fp32 is
    >= 0.99999 at paper scale, docs/paper_scale.md), the check's in float32: the cosines reported are to fp32 exact.
    `report["seconds"]` times the choice (its reference included, and apart) and the check's reference
    apart (the check is a measurement: a run without one would choose the same rows). `runner`
    (`distributed.RayGroups`): both references run there as query shards.

    The check's fp32 reference streams the memory (`CHECK_RESIDENT_BYTES`): for a sample of ~2000
    queries, a resident fp32 copy of a float16 paper-scale memory (2.7 GB for 1.3M x 512) costs as much
    as it saves, and on Ray every reference task held one, which on a 23 GB machine evicted the
    queries' page cache from under the groups' pass. Streamed, the result is the same bit for bit."""
    n, m = queries.shape[0], keys.shape[0]
    rng = np.random.default_rng(settings.seed + 1)
    sample = np.sort(rng.choice(n, min(settings.sample, n), replace=False))
    perm = rng.permutation(len(sample))
    n_cal = max(1, min(1000, len(sample) // 2))
    cal = sample[np.sort(perm[:n_cal])]
    chk = sample[np.sort(perm[n_cal:])] if len(sample) > 1 else cal
    strata = None

    def reference(ids: np.ndarray, k, vs: list, dtype: torch.dtype, **kw) -> list[torch.Tensor]:
        return exact_rows(queries, ids, k, vs, tau=tau, dtype=dtype, device=device, runner=runner, **kw)

    t0 = time.perf_counter()
    rows, trials, cal_reference_s = settings.rows, [], 0.0
    if not rows:  # the memory's own copy in the GEMM dtype: no second one converted
        drawn = Strata.draw(queries, groups, chk, n_cal, rng) if isinstance(groups, QueryGroups) else None
        if drawn is not None:  # the check stays a uniform sample: the cosines reported are its plain mean
            cal, strata = drawn
        ta = time.perf_counter()
        exact = reference(cal, gm.keys, [gm.value(i) for i in range(len(gm.values))], gm.dtype)
        cal_reference_s = time.perf_counter() - ta
        rows = choose_rows(gm, queries, groups, cal, exact, tau, settings.min_cosine, settings.tail, strata=strata,
                           trials=trials, runner=runner)
    t1 = time.perf_counter()
    check = Check(chk, reference(chk, keys, list(values), torch.float32, keep=False, resident_bytes=CHECK_RESIDENT_BYTES))
    t2 = time.perf_counter()
    rows = min(m, rows)
    sizes = np.array([len(g) for g in groups])
    report = {"select": "groups", "rows": rows, "groups": len(groups), "tail": settings.tail,
              "regroup": settings.regroup, "sample": len(sample),
              "calibration_strata": None if strata is None else {"quantiles": list(STRATA), "queries": strata.counts(),
                                                                 "weights": strata.weights.round(4).tolist()},
              "calibration_trials": trials,
              "group_size": {"mean": float(sizes.mean()), "p10": float(np.quantile(sizes, 0.1)),
                             "p90": float(np.quantile(sizes, 0.9))},
              "rows_scanned_per_query": rows + len(groups) * m / n,
              "seconds": {"choose_rows": round(t1 - t0, 3), "calibration_reference": round(cal_reference_s, 3),
                          "check_reference": round(t2 - t1, 3)}}
    return report, check
