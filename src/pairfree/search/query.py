"""Any-to-any search: a query of any modality against the indices of every other one.

    s = Searcher("runs/index", um)                    # um: the UnifiedModel the index was built with
    s.search("a dog barking", modalities=["image", "audio"], k=10)
    s.search(Path("bark.wav"))                        # a file: its modality from the extension
    s.search({"id": "clips/003.wav", "modality": "audio"})      # an item already in an index
    s.search({"embedding": z})                        # a unified-space vector

Results: one entry per target modality, `{"modality", "results": [{"rank", "score", "row", "id",
"path", "caption", ...metadata}]}`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pairfree.search.index import IndexSet

MAX_K = 1000


class QueryError(ValueError):
    """A query that cannot be answered (unknown id, wrong dimension, unsupported file...)."""


def modality_of_file(path: str | Path) -> str:
    from pairfree.media import EXTENSIONS

    ext = Path(path).suffix.lower()
    for m in ("image", "audio", "3d"):
        if ext in EXTENSIONS[m]:
            return m
    raise QueryError(f"{path}: cannot tell the modality from the extension {ext or '(none)'}; "
                     f"images {', '.join(EXTENSIONS['image'])}, audio {', '.join(EXTENSIONS['audio'])}, "
                     f"3d {', '.join(EXTENSIONS['3d'])}")


class Searcher:
    """An index plus the unified model that embeds queries (only needed for raw-media queries)."""

    def __init__(self, index: IndexSet | str | Path, model=None):
        self.index = index if isinstance(index, IndexSet) else IndexSet.open(index)
        self.model = model
        if model is not None:
            built = self.index.info["model"]["fingerprint"]
            if model.fingerprint != built:
                raise ValueError(f"index {self.index.path} was built with another model (fingerprint {built[:12]}, "
                                 f"this model {model.fingerprint[:12]}); query it with the model it was built "
                                 f"with, or rebuild it with `pairfree index`")

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.index.modalities

    # ---- queries -> unified vectors ------------------------------------------------------------------
    def query_vector(self, query: Any, modality: str | None = None) -> tuple[np.ndarray, str]:
        """(unit (d,) vector, query modality or "embedding") for one query (see the module docstring)."""
        if isinstance(query, dict):
            if "embedding" in query:
                return self._embedding(query["embedding"]), "embedding"
            if "id" in query:
                m = query.get("modality") or modality
                if m is None:
                    hits = [mm for mm in self.modalities if _has(self.index, mm, str(query["id"]))]
                    if not hits:
                        raise QueryError(f"no item {query['id']!r} in any index ({list(self.modalities)})")
                    m = hits[0]
                try:
                    row = self.index.find(m, str(query["id"]))
                except (KeyError, ValueError) as e:
                    raise QueryError(str(e).strip('"')) from None
                return self.index.vector(m, row), m
            if "text" in query:
                return self._encode("text", str(query["text"])), "text"
            if "file" in query:
                path = Path(query["file"])
                return self._encode(modality or modality_of_file(path), path), modality or modality_of_file(path)
            raise QueryError(f"a query dict needs one of 'text', 'file', 'id', 'embedding'; got {sorted(query)}")
        if isinstance(query, (np.ndarray, list, tuple)) and np.asarray(query).ndim == 1 and \
                np.issubdtype(np.asarray(query).dtype, np.number):
            return self._embedding(query), "embedding"
        if isinstance(query, Path) or (isinstance(query, str) and modality != "text" and Path(query).is_file()):
            m = modality or modality_of_file(query)
            return self._encode(m, Path(query)), m
        if isinstance(query, str):
            return self._encode("text", query), "text"
        if self.model is None:
            raise QueryError(f"cannot embed a {type(query).__name__} query without the unified model")
        if modality is None:
            raise QueryError(f"say which modality a {type(query).__name__} query is (modality=...)")
        return self._encode(modality, query), modality

    def _embedding(self, x: Any) -> np.ndarray:
        v = np.asarray(x, dtype=np.float64).reshape(-1)
        if v.shape[0] != self.index.dim:
            raise QueryError(f"embedding has {v.shape[0]} values, the index space has {self.index.dim}")
        n = np.linalg.norm(v)
        if not np.isfinite(v).all() or n < 1e-12:
            raise QueryError("embedding must be finite and non-zero")
        return (v / n).astype(np.float32)

    def _encode(self, modality: str, x: Any) -> np.ndarray:
        if self.model is None:
            raise QueryError(f"a {modality} query needs the unified model the index was built with "
                             "(Searcher(index, model); pairfree search --pretrained / --model / --release)")
        if modality not in self.model.modalities:
            raise QueryError(f"this unified model embeds {list(self.model.modalities)} from raw media, not {modality!r}")
        return self.model.encode(modality, x)[0]

    # ---- search ----------------------------------------------------------------------------------------
    def search(self, query: Any, modalities: Sequence[str] | None = None, k: int = 10,
               query_modality: str | None = None) -> list[dict[str, Any]]:
        vec, qmod = self.query_vector(query, query_modality)
        return self.search_vectors(vec[None], modalities, k, exclude=query if isinstance(query, dict) and "id" in query
                                   else None, query_modality=qmod)[0]

    def search_batch(self, queries: Iterable[Any], modalities: Sequence[str] | None = None, k: int = 10
                     ) -> list[list[dict[str, Any]]]:
        return [self.search(q, modalities, k) for q in queries]

    def search_vectors(self, vectors: np.ndarray, modalities: Sequence[str] | None = None, k: int = 10,
                       exclude: dict | None = None, query_modality: str | None = None) -> list[list[dict[str, Any]]]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise QueryError(f"k must be an integer in [1, {MAX_K}], got {k!r}")
        targets = list(modalities) if modalities else list(self.modalities)
        unknown = [m for m in targets if m not in self.modalities]
        if unknown:
            raise QueryError(f"no index for {unknown}; this index has {list(self.modalities)}")
        out: list[list[dict[str, Any]]] = [[] for _ in range(len(vectors))]
        for m in targets:
            skip = str(exclude["id"]) if exclude and (exclude.get("modality") in (None, m)) else None
            scores, rows = self.index.search(vectors, m, k + (1 if skip else 0))
            for qi in range(len(vectors)):
                results = []
                for s, r in zip(scores[qi].tolist(), rows[qi].tolist()):
                    if r < 0:
                        continue
                    meta = self.index.row(m, r)
                    if skip is not None and str(meta["id"]) == skip:
                        continue  # the query item itself
                    results.append({"rank": len(results) + 1, "score": round(float(s), 6) if math.isfinite(s) else None,
                                    **{k2: v for k2, v in meta.items()}})
                out[qi].append({"modality": m, "query_modality": query_modality, "results": results[:k]})
        return out


def _has(index: IndexSet, modality: str, item_id: str) -> bool:
    try:
        index.find(modality, item_id)
        return True
    except KeyError:
        return False


def format_table(results: list[dict[str, Any]], width: int = 60) -> str:
    """The results of one query as a plain-text table, one block per target modality."""
    lines = []
    for block in results:
        lines.append(f"== {block['modality']} ({len(block['results'])} results)")
        lines.append(f"{'rank':>4}  {'score':>7}  {'id':<{width}}  caption")
        for r in block["results"]:
            rid = str(r["id"])
            rid = rid if len(rid) <= width else "..." + rid[-(width - 3):]
            lines.append(f"{r['rank']:>4}  {r['score']:7.4f}  {rid:<{width}}  {str(r.get('caption') or '')[:60]}")
    return "\n".join(lines)
