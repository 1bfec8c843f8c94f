"""Embedding stores a search index is built from: pairfree's own (`pairfree encode`) and the folders
clip-retrieval / embedding-reader write (`img_emb/*.npy`, `text_emb/*.npy`, `metadata/*.parquet`),
so users bring what they already computed.

Both expose the same small interface: `modality`, `encoder` (an id, or None when unknown),
`count`, `ids`, `chunks()` (memory-mapped blocks of rows) and `metadata(rows)` (a dict of columns).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pairfree.store import EmbeddingStore, StoreError

CHUNK = 65536
#: clip-retrieval's embedding folders -> modality
CLIP_RETRIEVAL_FOLDERS = {"img_emb": "image", "text_emb": "text"}
_ID_COLUMNS = ("image_path", "url", "key", "id", "caption")


class PairfreeStore:
    """A store written by `pairfree encode`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.store = EmbeddingStore.open(self.path, verify=False)
        self.modality, self.encoder, self.count = self.store.modality, self.store.encoder, self.store.count

    @property
    def ids(self) -> list[str]:
        return self.store.ids

    def chunks(self) -> Iterator[np.ndarray]:
        for i in range(len(self.store.manifest["shards"])):
            shard = self.store.shard(i)
            for start in range(0, len(shard), CHUNK):
                yield np.asarray(shard[start : start + CHUNK], dtype=np.float32)

    def metadata(self) -> dict[str, list[Any]]:
        return {}

    def fingerprint(self) -> str:
        """Checksums of the committed shards: changes whenever the rows do."""
        import hashlib

        h = hashlib.sha256()
        for s in self.store.manifest["shards"]:
            h.update(s["sha256"].encode())
        return h.hexdigest()


class ClipRetrievalStore:
    """One modality of a clip-retrieval / embedding-reader output folder: `<folder>/img_emb` (or
    `text_emb`) with `*_<n>.npy` parts and `<folder>/metadata/metadata_<n>.parquet` with the same
    row order; ids come from the first of image_path / url / key / id / caption in the metadata."""

    def __init__(self, path: str | Path, encoder: str | None = None):
        path = Path(path)
        if path.name in CLIP_RETRIEVAL_FOLDERS:
            root, emb = path.parent, path
        else:
            raise StoreError(f"{path}: a clip-retrieval embedding folder is img_emb/ or text_emb/")
        self.path, self.modality, self.encoder = emb, CLIP_RETRIEVAL_FOLDERS[emb.name], encoder
        self.parts = sorted(emb.glob("*.npy"), key=_part_number)
        if not self.parts:
            raise StoreError(f"{emb}: no .npy embedding files")
        self.arrays = []
        for p in self.parts:
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                raise StoreError(f"{p}: not a plain numeric .npy array ({e})") from None
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.floating):
                raise StoreError(f"{p}: expected a 2-D float array of embeddings, got {a.dtype} {a.shape}")
            self.arrays.append(a)
        if len({a.shape[1] for a in self.arrays}) != 1:
            raise StoreError(f"{emb}: parts have different dimensions {[a.shape[1] for a in self.arrays]}")
        self.count = sum(len(a) for a in self.arrays)
        self.meta_files = sorted((root / "metadata").glob("*.parquet"), key=_part_number)
        self._meta: dict[str, list[Any]] | None = None

    def metadata(self) -> dict[str, list[Any]]:
        if self._meta is None:
            if not self.meta_files:
                self._meta = {}
            else:
                import pyarrow.parquet as pq

                tables = [pq.read_table(f).to_pydict() for f in self.meta_files]
                cols = {k: [v for t in tables for v in t.get(k, [None] * len(next(iter(t.values()))))]
                        for k in tables[0]}
                n = len(next(iter(cols.values()))) if cols else 0
                if n != self.count:
                    raise StoreError(f"{self.meta_files[0].parent}: {n} metadata rows for {self.count} embeddings")
                self._meta = cols
        return self._meta

    @property
    def ids(self) -> list[str]:
        meta = self.metadata()
        col = next((c for c in _ID_COLUMNS if c in meta), None)
        return [str(v) for v in meta[col]] if col else [str(i) for i in range(self.count)]

    def chunks(self) -> Iterator[np.ndarray]:
        for a in self.arrays:
            for start in range(0, len(a), CHUNK):
                yield np.asarray(a[start : start + CHUNK], dtype=np.float32)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for p in self.parts:
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()


def _part_number(p: Path) -> int:
    m = re.search(r"(\d+)\D*$", p.name)
    return int(m.group(1)) if m else 0


def open_store(path: str | Path, encoder: str | None = None):
    """A pairfree store folder, or a clip-retrieval `img_emb` / `text_emb` folder."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store folder")
    if (path / "manifest.json").is_file():
        return PairfreeStore(path)
    if path.name in CLIP_RETRIEVAL_FOLDERS:
        return ClipRetrievalStore(path, encoder)
    raise StoreError(f"{path}: neither a pairfree store (manifest.json) nor a clip-retrieval img_emb / text_emb folder")
