"""Evaluation metrics: cross-modal retrieval (R@k, mAP, median rank) and zero-shot classification.

Similarity is cosine: every input is validated and its rows are L2-normalised (`space.normalized`),
then scores are dot products computed in float64, one chunk of queries at a time, so memory stays
at about `chunk_size x n_gallery` scores (25k queries x 5k gallery never materialises at once);
the gallery itself is held once in float64 (46k x 512 = 190 MB for the largest paper benchmark).

Ties (pessimistic): a positive that ties with negatives is ranked after them, bitwise-equal
float64 scores being a tie. The rank of the first positive (R@k, MedR) is 1 + the number of
negatives scoring >= the best positive, so ties among positives cost nothing and a degenerate
model (all scores equal) lands at the bottom, never the top. Average precision is exactly
`sklearn.metrics.average_precision_score` on the query's scores: the mean over positives p of
(positives scoring >= p) / (items scoring >= p), i.e. precision at each distinct score threshold
with every tied item counted; with one positive it is 1 / its rank. Zero-shot Acc@k ranks the true
class after every class that ties with it.

Results are fractions in [0, 1] (R@k, mAP, Acc@k) and a 1-based rank (MedR).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pairfree.space import normalized

_SCORE_BUDGET = 1 << 22  # float64 scores per chunk (32 MiB) when chunk_size is not given
_SORT_ABOVE = 32  # queries with more positives than this use a per-row sort instead of counting


def _unit64(x, where: str) -> np.ndarray:
    return np.asarray(normalized(x, where), dtype=np.float64)


def _check_ks(ks: Sequence[int], where: str) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"{where}: expected a non-empty sequence of positive integers, got {ks!r}")
    return tuple(int(k) for k in ks)


def _as_int_array(a, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size == 0:
        a = a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{where}: expected integer gallery indices, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def positive_sets(positives, n_queries: int, n_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalise `positives` to CSR form (indptr (n_q+1,), indices), sorted and de-duplicated per query.

    Accepted forms: an int array (n_q,) (one positive per query); an int array (n_q, P) (P positives
    per query); a list/tuple of n_q int arrays or lists (any number per query); a boolean matrix
    (n_q, n_g). Every query needs at least one positive; indices must lie in [0, n_gallery).
    """
    if isinstance(positives, (list, tuple)):
        if len(positives) != n_queries:
            raise ValueError(f"positives: got {len(positives)} entries for {n_queries} queries")
        if all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in positives):
            rows = np.arange(n_queries, dtype=np.int64)
            idx = _as_int_array(positives, "positives")
        else:
            parts = []
            for i, p in enumerate(positives):
                p = _as_int_array(p, f"positives[{i}]")
                if p.ndim > 1:
                    raise ValueError(f"positives[{i}]: expected a 1-D list of gallery indices, got shape {p.shape}")
                parts.append(p.reshape(-1))
            lengths = np.array([len(p) for p in parts], dtype=np.int64)
            rows = np.repeat(np.arange(n_queries, dtype=np.int64), lengths)
            idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    else:
        p = np.asarray(positives)
        if p.dtype == bool:
            if p.shape != (n_queries, n_gallery):
                raise ValueError(
                    f"positives: a boolean matrix must have shape (n_queries, n_gallery) = "
                    f"({n_queries}, {n_gallery}), got {p.shape}"
                )
            rows, idx = np.nonzero(p)
            rows, idx = rows.astype(np.int64), idx.astype(np.int64)
        else:
            p = _as_int_array(p, "positives")
            if p.ndim not in (1, 2) or p.shape[0] != n_queries:
                raise ValueError(
                    f"positives: expected shape ({n_queries},) or ({n_queries}, P) of gallery indices "
                    f"(or a boolean ({n_queries}, {n_gallery}) matrix), got {p.shape}"
                )
            p = p.reshape(n_queries, -1)
            rows = np.repeat(np.arange(n_queries, dtype=np.int64), p.shape[1])
            idx = p.reshape(-1)
    bad = (idx < 0) | (idx >= n_gallery)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(
            f"positives: query {int(rows[j])} has gallery index {int(idx[j])}, "
            f"out of range for a gallery of {n_gallery} items"
        )
    key = np.sort(rows * n_gallery + idx)  # by (query, index); then drop duplicates
    key = key[np.concatenate([key[:1] == key[:1], key[1:] != key[:-1]])]
    rows, idx = key // n_gallery, key % n_gallery
    counts = np.bincount(rows, minlength=n_queries)
    if (counts == 0).any():
        raise ValueError(f"positives: query {int(np.argmax(counts == 0))} has no positive gallery item")
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return indptr, idx


def _stats_count(S: np.ndarray, indptr: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first positive rank, average precision) per row by counting; cost ~ P x n_gallery per row.

    For each positive p: rank = items scoring >= p, above = positives scoring >= p (true positives at
    p's threshold), so rank - above = negatives scoring >= p.
    """
    c = S.shape[0]
    counts = np.diff(indptr)
    pmax = int(counts.max())
    rows = np.repeat(np.arange(c), counts)
    slot = np.arange(len(idx)) - np.repeat(indptr[:-1], counts)
    valid = np.zeros((c, pmax), dtype=bool)
    valid[rows, slot] = True
    spos = np.full((c, pmax), np.inf)
    spos[rows, slot] = S[rows, idx]
    rank = np.empty((c, pmax), dtype=np.int64)
    for p in range(pmax):
        rank[:, p] = (S >= spos[:, p, None]).sum(axis=1)
    # positives scoring >= each positive (itself included): the true positives at its threshold
    above = ((spos[:, None, :] >= spos[:, :, None]) & valid[:, None, :]).sum(axis=2)
    first = 1 + np.where(valid, rank - above, np.iinfo(np.int64).max).min(axis=1)  # negatives >= best positive
    ap = np.where(valid, above / np.maximum(rank, 1), 0.0).sum(axis=1) / counts
    return first, ap


def _stats_sort(S: np.ndarray, indptr: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same as `_stats_count` via one sort per row; cost ~ n_gallery log n_gallery per row."""
    c, n = S.shape
    counts = np.diff(indptr)
    mask = np.zeros((c, n), dtype=bool)
    mask[np.repeat(np.arange(c), counts), idx] = True
    order = np.argsort(-S, axis=1)  # order within a tie group is irrelevant: groups are scored whole
    s = np.take_along_axis(S, order, axis=1)
    pos = np.take_along_axis(mask, order, axis=1)
    # pessimistic rank at sorted position j = 1 + the last position of j's tie group
    last_of_group = np.ones((c, n), dtype=bool)
    last_of_group[:, :-1] = s[:, :-1] != s[:, 1:]
    ends = np.where(last_of_group, np.arange(n), n)
    rank = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1] + 1
    tp = np.take_along_axis(np.cumsum(pos, axis=1), rank - 1, axis=1)
    first = 1 + np.where(pos, rank - tp, np.iinfo(np.int64).max).min(axis=1)  # negatives >= best positive
    ap = np.where(pos, tp / rank, 0.0).sum(axis=1) / counts
    return first, ap


def _default_chunk(n_gallery: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _SCORE_BUDGET // n_gallery)
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def retrieval(queries, gallery, positives, ks: Sequence[int] = (1, 5, 10),
              chunk_size: int | None = None) -> dict[str, float]:
    """Retrieve `gallery` items for each row of `queries` by cosine similarity.

    positives: which gallery items are correct for each query; one or several per query, as an int
    array (n_q,), an int array (n_q, P), a list of n_q int lists/arrays, or a boolean (n_q, n_g)
    matrix (see `positive_sets`).

    Returns {"R@k" for k in ks, "mAP", "MedR"}: R@k = fraction of queries with at least one positive
    in the top k; mAP = mean over queries of average precision (equal to
    `sklearn.metrics.average_precision_score` on the query's scores); MedR = median over queries of
    the 1-based rank of the first positive. Ties go against the positives (module docstring).
    """
    ks = _check_ks(ks, "ks")
    Q = normalized(queries, "queries")
    G = _unit64(gallery, "gallery")
    if Q.shape[1] != G.shape[1]:
        raise ValueError(f"queries have dim {Q.shape[1]} but gallery has dim {G.shape[1]}; they must match")
    n_q, n_g = Q.shape[0], G.shape[0]
    indptr, idx = positive_sets(positives, n_q, n_g)
    step = _default_chunk(n_g, chunk_size)
    first = np.empty(n_q, dtype=np.int64)
    ap = np.empty(n_q, dtype=np.float64)
    for a in range(0, n_q, step):
        b = min(a + step, n_q)
        S = np.asarray(Q[a:b], dtype=np.float64) @ G.T
        ptr = indptr[a : b + 1] - indptr[a]
        sub = idx[indptr[a] : indptr[b]]
        stats = _stats_sort if int(np.diff(ptr).max()) > _SORT_ABOVE else _stats_count
        first[a:b], ap[a:b] = stats(S, ptr, sub)
    out = {f"R@{k}": float(np.mean(first <= k)) for k in ks}
    out["mAP"] = float(np.mean(ap))
    out["MedR"] = float(np.median(first))
    return out


def paired_retrieval(za, zb, labels=None, positives: str | None = None, ks: Sequence[int] = (1, 5, 10),
                     chunk_size: int | None = None) -> dict[str, dict[str, float]]:
    """Retrieval both ways between two aligned arrays: row i of `za` matches row i of `zb`.

    positives: "index" (only row i of the other side is correct) or "label" (every row of the
    other side with the same label as row i is correct; needs `labels`, one concept id per row,
    shared by both sides). Default: "label" when labels are given, else "index".
    Returns {"a_to_b": retrieval(za, zb, ...), "b_to_a": retrieval(zb, za, ...)}.
    """
    A, B = normalized(za, "za"), normalized(zb, "zb")
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"za has {A.shape[0]} rows but zb has {B.shape[0]}; paired rows must align 1:1")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"za has dim {A.shape[1]} but zb has dim {B.shape[1]}; they must match")
    n = A.shape[0]
    mode = positives if positives is not None else ("index" if labels is None else "label")
    if mode == "index":
        if labels is not None:
            raise ValueError("labels are only used with positives='label'; drop them or pass positives='label'")
        pos = np.arange(n)
    elif mode == "label":
        if labels is None:
            raise ValueError("positives='label' needs labels (one concept id per row)")
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"labels: expected shape ({n},), one per paired row, got {lab.shape}")
        _, inv = np.unique(lab, return_inverse=True)
        groups = np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])
        pos = [groups[c] for c in inv.reshape(-1)]
    else:
        raise ValueError(f"positives: expected 'index' or 'label', got {positives!r}")
    return {
        "a_to_b": retrieval(A, B, pos, ks, chunk_size),
        "b_to_a": retrieval(B, A, pos, ks, chunk_size),
    }


def class_embeddings(class_text) -> np.ndarray:
    """(n_classes, d) unit class vectors: templates L2-normalised, averaged per class, re-normalised.

    class_text: (n_classes, n_templates, d) prompt-template embeddings, or (n_classes, d).
    """
    T = np.asarray(class_text)
    if T.ndim == 2:
        return _unit64(T, "class_text")
    if T.ndim != 3:
        raise ValueError(f"class_text: expected shape (n_classes, n_templates, d) or (n_classes, d), got {T.shape}")
    if 0 in T.shape:
        raise ValueError(f"class_text: empty array of shape {T.shape}")
    c, t, d = T.shape
    mean = _unit64(T.reshape(c * t, d), "class_text templates").reshape(c, t, d).mean(axis=1)
    norms = np.linalg.norm(mean, axis=1)
    if (norms < 1e-12).any():
        c0 = int(np.argmax(norms < 1e-12))
        raise ValueError(f"class_text: the template embeddings of class {c0} average to zero")
    return mean / norms[:, None]


def zero_shot(embeddings, class_text, labels, ks: Sequence[int] = (1, 3, 5),
              chunk_size: int | None = None) -> dict[str, float]:
    """Zero-shot classification accuracy (the CLIP prompt-ensemble protocol).

    embeddings: (n, d) samples; class_text: (n_classes, n_templates, d) or (n_classes, d) (see
    `class_embeddings`); labels: (n,) true class indices. A sample is correct at k when its true
    class is among the k most similar classes (cosine; ties pessimistic). Returns {"Acc@k"}.
    """
    ks = _check_ks(ks, "ks")
    X = normalized(embeddings, "embeddings")
    C = class_embeddings(class_text)
    if X.shape[1] != C.shape[1]:
        raise ValueError(f"embeddings have dim {X.shape[1]} but class_text has dim {C.shape[1]}; they must match")
    y = _as_int_array(labels, "labels")
    if y.shape != (X.shape[0],):
        raise ValueError(f"labels: expected shape ({X.shape[0]},), one per embedding, got {y.shape}")
    bad = (y < 0) | (y >= C.shape[0])
    if bad.any():
        raise ValueError(f"labels: label {int(y[np.argmax(bad)])} at row {int(np.argmax(bad))} is out of range "
                         f"for {C.shape[0]} classes")
    step = _default_chunk(C.shape[0], chunk_size)
    rank = np.empty(X.shape[0], dtype=np.int64)
    for a in range(0, X.shape[0], step):
        S = np.asarray(X[a : a + step], dtype=np.float64) @ C.T
        true = S[np.arange(S.shape[0]), y[a : a + step]]
        rank[a : a + step] = (S >= true[:, None]).sum(axis=1)
    return {f"Acc@{k}": float(np.mean(rank <= k)) for k in ks}
