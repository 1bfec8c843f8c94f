"""A search index over a unified space: one faiss index per target modality, built from embedding
stores through a unified model, with the stores' ids and a metadata table.

Layout of an index folder (written atomically, opened memory-mapped):

    index.json           format, the model's fingerprint, per modality: count, kind and parameters,
                         the stores it came from (path, space, fingerprint), recall@10 against exact
                         search per query modality (approximate kinds), media roots
    <modality>.index     faiss index over the unified embeddings (inner product = cosine)
    <modality>.parquet   one row per vector: row, id, store, path (the media file, when the id is
                         one), caption, and any columns the stores or a metadata table carry

Kinds: "flat" (exact inner product, the default), "ivf" (IVF-Flat), "hnsw" (HNSW-Flat), "ivfpq"
(IVF + product quantisation, re-ranked exactly from the stored vectors unless `refine=0`).

Cross-modal queries against approximate indices (clip-retrieval #76: an index trained on image
embeddings gave poor text->image results). In a unified space every modality sits in its own cone
(the modality gap), so a query from another modality lands far from every indexed vector and the
score margins between its neighbours are small. pairfree uses the query modalities where they
help, and measured where they do not:
- the search parameters (IVF `nprobe`, HNSW `efSearch`) are calibrated on held-out queries of
  *every* modality the index will be queried from, until the worst of them reaches
  `target_recall` recall@10 against exact search; the recall per query modality is recorded;
- coarse centroids and PQ codebooks are trained on the indexed modality (`train_on="indexed"`):
  trained on the query modalities as well (`train_on="all"`), IVF lists form in the query cones
  where no indexed vector lives, probes are wasted, and PQ spends its codes there; on the demo
  world that lowered text->image recall@10 at equal nprobe (IVF-Flat 0.997 -> 0.971, IVF-PQ
  0.679 -> 0.605), so it is an option, not the default;
- IVF-PQ re-ranks its candidates with the exact vectors (`refine`), the cure #76 found (flat).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pairfree.fileio import atomic_dir, child_path

FORMAT, VERSION = "pairfree-index", 1
KINDS = ("flat", "ivf", "hnsw", "ivfpq")
INDEX_JSON = "index.json"
_TRAIN_ROWS = 65536  # per modality, for approximate kinds
_RECALL_QUERIES = 1000


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise ImportError("search indices need faiss: pip install 'pairfree[search]' (faiss-cpu)") from e
    return faiss


@dataclass
class Source:
    """One store to index: its rows are `modality` embeddings of the pretrained space `space`."""

    store: Any
    space: str
    modality: str

    @property
    def target(self) -> str:
        return self.modality


def resolve_sources(um, stores: Sequence[Any]) -> list[Source]:
    """Stores (paths, `open_store` objects, or `SPACE=PATH` strings) -> which space each comes from.

    Unnamed: the space whose encoder wrote the store (its encoder id matches), else the space
    the unified model embeds that modality from."""
    from pairfree.search.stores import open_store

    out = []
    for s in stores:
        space = None
        if isinstance(s, str) and "=" in s and not Path(s).exists():
            space, s = s.split("=", 1)
        store = open_store(s) if isinstance(s, (str, Path)) else s
        modality = store.modality
        if space is None:
            by_encoder = [n for n, spec in um.encoder_specs.items() if isinstance(spec, str) and spec == store.encoder]
            if by_encoder:
                space = by_encoder[0]
            elif modality in um.sources:
                space = um.sources[modality][0]
            else:
                raise ValueError(f"{getattr(store, 'path', store)}: which space are these {modality} embeddings from? "
                                 f"give SPACE={getattr(store, 'path', '')} (spaces: {list(um.spaces)})")
        if space not in um.spaces or modality not in um.spaces[space]["modalities"]:
            raise ValueError(f"{getattr(store, 'path', store)}: the model has no modality {modality!r} in a space "
                             f"{space!r}; it has { {n: i['modalities'] for n, i in um.spaces.items()} }")
        out.append(Source(store, space, modality))
    return out


def _unified_chunks(um, src: Source) -> Iterator[np.ndarray]:
    for chunk in src.store.chunks():
        yield np.ascontiguousarray(um.embed(src.space, src.modality, chunk), dtype=np.float32)


def _sample(um, sources: list[Source], n: int, seed: int) -> np.ndarray:
    """Up to n unified rows spread evenly over the sources' rows (a deterministic stride)."""
    total = sum(s.store.count for s in sources)
    if total == 0:
        return np.zeros((0, 0), np.float32)
    step = max(1, total // n)
    out, offset = [], 0
    for src in sources:
        for z in _unified_chunks(um, src):
            idx = np.arange((-offset) % step, len(z), step)
            out.append(z[idx])
            offset += len(z)
    x = np.concatenate(out)[:n]
    return x


def _make_index(kind: str, d: int, n: int, params: dict[str, Any]):
    faiss = _faiss()
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, int(params.setdefault("M", 32)), ip)
        idx.hnsw.efConstruction = int(params.setdefault("efConstruction", 80))
        return idx
    nlist = int(params.setdefault("nlist", max(1, min(4096, int(4 * np.sqrt(n))))))
    if kind == "ivf":
        return faiss.index_factory(d, f"IVF{nlist},Flat", ip)
    m = int(params.setdefault("pq_m", max(1, d // 4)))
    while d % m:
        m -= 1
    params["pq_m"] = m
    base = faiss.index_factory(d, f"IVF{nlist},PQ{m}", ip)
    # index_factory turns on polysemous training (codes ordered for Hamming filtering), which we never
    # search with; it took 2-4 s per sub-quantizer (262 s for PQ128 on 1,600 rows, 0.4 s without)
    base.do_polysemous_training = False
    refine = int(params.setdefault("refine", 4))
    if refine <= 0:
        return base
    idx = faiss.IndexRefineFlat(base)
    idx.k_factor = refine
    return idx


#: the search parameter each kind calibrates, and the values tried (smallest first)
_KNOB = {"ivf": "nprobe", "ivfpq": "nprobe", "hnsw": "efSearch"}


def _set_search_params(index, kind: str, params: dict[str, Any]) -> None:
    knob = _KNOB.get(kind)
    if knob and knob in params:
        _faiss().ParameterSpace().set_index_parameter(index, knob, int(params[knob]))


def _knob_values(kind: str, params: dict[str, Any]) -> list[int]:
    if kind == "hnsw":
        return [16, 32, 64, 128, 256, 512, 1024]
    nlist = int(params["nlist"])
    return sorted({min(nlist, 2**i) for i in range(0, 13)})


def _calibrate(um, index, kind: str, params: dict[str, Any], indexed: list[Source],
               queries_from: dict[str, list[Source]], target: float, seed: int) -> dict[str, float]:
    """Smallest nprobe / efSearch whose recall@10 reaches `target` for every query modality;
    returns the recall per query modality at the chosen value."""
    samples = {m: _sample(um, ss, _RECALL_QUERIES, seed + 1) for m, ss in queries_from.items()}
    exact = {m: _exact_topk(um, indexed, q, 10) for m, q in samples.items()}
    recall: dict[str, float] = {}
    for value in _knob_values(kind, params):
        params[_KNOB[kind]] = value
        _set_search_params(index, kind, params)
        recall = {}
        for m, q in samples.items():
            _, got = index.search(q, 10)
            recall[m] = round(float(np.mean([len(set(a) & set(b)) / len(a) for a, b in
                                             zip(exact[m].tolist(), got.tolist())])), 4)
        if min(recall.values()) >= target:
            break
    return recall


def _exact_topk(um, sources: list[Source], queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows of the indexed vectors for each query, by brute force over the stores in chunks."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for src in sources:
        for z in _unified_chunks(um, src):
            s = queries @ z.T
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
            best_i = np.concatenate([best_i, part + offset], 1)
            order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
            offset += len(z)
    return best_i


def build_index(um, stores: Sequence[Any], out: str | Path, *, kind: str = "flat", params: dict[str, Any] | None = None,
                metadata: str | Path | None = None, progress: bool = True, seed: int = 0,
                train_on: str = "indexed", target_recall: float = 0.95) -> "IndexSet":
    """Index the stores (see `resolve_sources`) in the unified space of `um` (a `UnifiedModel`).

    One faiss index per target modality (stores of the same modality are indexed together, in the
    order given). `metadata`: a CSV or parquet table with an `id` column (ids as in the stores,
    or relative to the table's folder) whose columns are joined onto the rows. Approximate kinds:
    `params` (nlist, M, pq_m, refine, or a fixed nprobe / efSearch), `train_on` ("indexed" or
    "all") and `target_recall` (module docstring).
    """
    faiss = _faiss()
    from pairfree.progress import progress as progress_bar

    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose from {KINDS}")
    if train_on not in ("indexed", "all"):
        raise ValueError(f"train_on must be 'indexed' or 'all', got {train_on!r}")
    sources = resolve_sources(um, stores)
    by_mod: dict[str, list[Source]] = {}
    for src in sources:
        by_mod.setdefault(src.target, []).append(src)
    extra = _read_metadata(metadata) if metadata else None
    info: dict[str, Any] = {"format": FORMAT, "version": VERSION, "created": datetime.datetime.now().isoformat(timespec="seconds"),
                            "model": {"fingerprint": um.fingerprint, "method": getattr(um.model, "method", None),
                                      "encoders": {s: e if isinstance(e, str) else getattr(e, "id", None)
                                                   for s, e in um.encoder_specs.items()}, "meta": um.meta},
                            "modalities": {}, "media_roots": []}
    roots: set[str] = set()
    with atomic_dir(out) as tmp:
        for modality, srcs in by_mod.items():
            count = sum(s.store.count for s in srcs)
            p = dict(params or {})
            queries_from = {m: ss for m, ss in by_mod.items()}
            first = next(_unified_chunks(um, srcs[0]))
            d = first.shape[1]
            index = _make_index(kind, d, count, p)
            if not index.is_trained:
                train_sources = list(queries_from.values()) if train_on == "all" else [srcs]
                index.train(np.concatenate([_sample(um, ss, _TRAIN_ROWS, seed) for ss in train_sources]))
            with progress_bar(count, f"index {modality}", progress, unit="row") as bar:
                for src in srcs:
                    for z in _unified_chunks(um, src):
                        index.add(z)
                        bar.update(len(z))
            if kind in ("ivf", "ivfpq"):
                faiss.extract_index_ivf(index).make_direct_map()  # vectors by row, for queries by id
            recall = None
            if kind != "flat":
                fixed = _KNOB[kind] in p
                recall = _calibrate(um, index, kind, p, srcs, queries_from, 0.0 if fixed else target_recall, seed)
            _set_search_params(index, kind, p)
            faiss.write_index(index, str(tmp / f"{modality}.index"))
            table, mod_roots = _metadata_table(srcs, extra)
            roots |= mod_roots
            _write_table(tmp / f"{modality}.parquet", table)
            entry = {"count": count, "dim": d, "kind": kind, "params": p, "train_on": train_on,
                     "stores": [{"path": str(getattr(s.store, "path", "")), "space": s.space, "modality": s.modality,
                                 "count": s.store.count, "fingerprint": s.store.fingerprint()} for s in srcs]}
            if recall is not None:
                entry["recall@10"] = recall
            info["modalities"][modality] = entry
        info["media_roots"] = sorted(roots)
        (tmp / INDEX_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return IndexSet.open(out)


def _read_metadata(path: str | Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata table {path} does not exist")
    import pandas as pd

    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    if "id" not in df.columns:
        raise ValueError(f"{path}: the metadata table needs an 'id' column; it has {list(df.columns)}")
    return path.parent, {str(r["id"]): {k: v for k, v in r.items() if k != "id"} for r in df.to_dict("records")}


def _relative_id(rid: str, base: Path) -> str | None:
    """`rid` relative to `base` ("/data/media/test/a.png" -> "test/a.png"; texts keep their "#i")."""
    file, sep, frag = rid.rpartition("#")
    path, suffix = (file, sep + frag) if sep and frag.isdigit() else (rid, "")
    try:
        return Path(path).resolve().relative_to(base.resolve()).as_posix() + suffix
    except (ValueError, OSError):
        return None


def _metadata_table(srcs: list[Source], extra) -> tuple[dict[str, list[Any]], set[str]]:
    """Row metadata: ids, media paths (when an id is a file), captions (texts), joined columns."""
    from pairfree.media.texts import read_texts

    rows: list[dict[str, Any]] = []
    roots: set[str] = set()
    texts: dict[str, list[str]] = {}
    for si, src in enumerate(srcs):
        store_meta = src.store.metadata()
        for j, rid in enumerate(src.store.ids):
            r: dict[str, Any] = {"row": len(rows), "id": rid, "store": si, "path": "", "caption": ""}
            file, _, frag = rid.rpartition("#")
            if src.modality == "text" and frag.isdigit() and Path(file).is_file():
                if file not in texts:
                    try:
                        texts[file] = read_texts(file)[0]
                    except Exception:  # unreadable now: no caption, the row stays searchable
                        texts[file] = []
                r["caption"] = texts[file][int(frag)] if int(frag) < len(texts[file]) else ""
            elif Path(rid).is_file():
                r["path"] = str(Path(rid).resolve())
                roots.add(str(Path(r["path"]).parent))
            r.update({k: v[j] for k, v in store_meta.items()})
            if extra is not None:
                base, table = extra
                hit = table.get(rid) or table.get(_relative_id(rid, base) or "")
                r.update({k: v for k, v in (hit or {}).items() if v not in (None, "")})
            r["caption"] = str(r.get("caption") or r.get("TEXT") or r.get("text") or "")[:500]
            rows.append(r)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}, roots


def _write_table(path: Path, cols: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: pa.array([None if v is None else (v if isinstance(v, (int, float)) else str(v))
                                          for v in vals]) for k, vals in cols.items()}), path)


class IndexSet:
    """An opened index folder: the faiss indices (memory-mapped) and their metadata tables."""

    def __init__(self, path: Path, info: dict[str, Any]):
        self.path, self.info = path, info
        self._index: dict[str, Any] = {}
        self._meta: dict[str, dict[str, list[Any]]] = {}
        self._rows_by_id: dict[str, dict[str, int]] = {}

    @classmethod
    def open(cls, path: str | Path) -> "IndexSet":
        path = Path(path)
        f = path / INDEX_JSON
        if not f.is_file():
            raise FileNotFoundError(f"{path}: not a pairfree index ({INDEX_JSON} missing); build one with `pairfree index`")
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: invalid JSON ({e})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("version") != VERSION:
            raise ValueError(f"{f}: fields 'format'/'version' must be {FORMAT!r}/{VERSION}")
        mods = info.get("modalities")
        if not isinstance(mods, dict) or not mods:
            raise ValueError(f"{f}: field 'modalities' must describe at least one index")
        for m in mods:
            for ext in (".index", ".parquet"):
                child_path(path, f"{m}{ext}", f"{f}: field 'modalities'")  # names stay inside the folder
        return cls(path, info)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.info["modalities"])

    @property
    def dim(self) -> int:
        return int(next(iter(self.info["modalities"].values()))["dim"])

    def count(self, modality: str) -> int:
        return int(self.info["modalities"][modality]["count"])

    def index(self, modality: str):
        if modality not in self.info["modalities"]:
            raise ValueError(f"index {self.path} has no {modality!r} index; it has {list(self.modalities)}")
        if modality not in self._index:
            faiss = _faiss()
            idx = faiss.read_index(str(self.path / f"{modality}.index"), faiss.IO_FLAG_MMAP)
            entry = self.info["modalities"][modality]
            _set_search_params(idx, entry["kind"], entry.get("params", {}))
            self._index[modality] = idx
        return self._index[modality]

    def metadata(self, modality: str) -> dict[str, list[Any]]:
        if modality not in self._meta:
            import pyarrow.parquet as pq

            self._meta[modality] = pq.read_table(self.path / f"{modality}.parquet").to_pydict()
        return self._meta[modality]

    def row(self, modality: str, i: int) -> dict[str, Any]:
        meta = self.metadata(modality)
        return {k: v[i] for k, v in meta.items()}

    def find(self, modality: str, item_id: str) -> int:
        if modality not in self._rows_by_id:
            self._rows_by_id[modality] = {str(v): i for i, v in enumerate(self.metadata(modality)["id"])}
        rows = self._rows_by_id[modality]
        if item_id not in rows:
            raise KeyError(f"no item {item_id!r} in the {modality} index")
        return rows[item_id]

    def vector(self, modality: str, row: int) -> np.ndarray:
        return self.index(modality).reconstruct(int(row)).astype(np.float32)

    def search(self, vectors: np.ndarray, modality: str, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the k nearest items of `modality` for each unified query vector."""
        q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query vectors have dim {q.shape[1]}, the index has {self.dim}")
        k = min(int(k), self.count(modality))
        scores, rows = self.index(modality).search(q, k)
        return scores, rows
