"""Embeddings of a dataset's items through a unified model, cached in encode stores.

The pretrained encoder's embeddings of a dataset's items are written once, by `pairfree.encode`
(resumable, unreadable files in errors.jsonl), into `<cache>/<dataset>/<encoder key>/<modality>`,
the encoder key hashing the encoder spec and the preprocessing profile. Any model that uses the
same encoder (another C-MCR, a baseline, the raw space) then re-encodes nothing: only its own
projector runs over the stored rows.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from pairfree.eval.data import Item


def encoder_key(spec: str, profile: str) -> str:
    return hashlib.sha256(f"{spec}|{profile}".encode()).hexdigest()[:16]


def embed_items(um, modality: str, items: list[Item], *, cache: Path | None, dataset: str,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(unified embeddings (len(items), d), ok mask): rows of unreadable items are zero, ok False."""
    if modality not in um.sources:
        raise ValueError(f"the model embeds {sorted(um.sources)}, not {modality!r}")
    space, mod = um.sources[modality]
    spec = um.encoder_specs.get(space)
    raw, ok = _encoder_rows(um, space, mod, spec, items, cache, dataset, progress)
    dim = um.spaces[space]["dim"]
    z = np.zeros((len(items), _out_dim(um, space, mod, dim)), np.float32)
    if ok.any():
        z[ok] = um.embed(space, mod, raw[ok])
    return z, ok


def _out_dim(um, space: str, mod: str, dim: int) -> int:
    return int(um.embed(space, mod, np.zeros((0, dim), np.float32)).shape[1])


def _encoder_rows(um, space, mod, spec, items, cache, dataset, progress) -> tuple[np.ndarray, np.ndarray]:
    dim = um.spaces[space]["dim"]
    out = np.zeros((len(items), dim), np.float32)
    ok = np.zeros(len(items), bool)
    if not items:
        return out, ok
    if cache is None or not isinstance(spec, str):  # no cache: the encoder directly, failing on a bad item
        enc = um.encoder(space)
        from pairfree.unified import load_input

        loaded = [it.source if isinstance(it.source, str) else load_input(mod, it.source, enc, um.profile) for it in items]
        out[:] = enc.encode(mod, loaded)
        ok[:] = True
        return out, ok
    from pairfree.encode import encode
    from pairfree.store import EmbeddingStore

    folder = Path(cache) / _safe(dataset) / encoder_key(spec, um.profile) / mod
    folder.mkdir(parents=True, exist_ok=True)
    if mod == "text":
        lines = [" ".join(str(it.source).split()) for it in items]
        listing = folder / "inputs.txt"
        _write_if_changed(listing, "".join(f"{t}\n" for t in lines))
        ids = [f"{listing}#{i}" for i in range(len(items))]
    else:
        listing = folder / "inputs.lst"
        paths = [os.path.normpath(str(Path(it.source).resolve())) for it in items]
        _write_if_changed(listing, "".join(f"{p}\n" for p in paths))
        ids = paths
    store_dir = folder / ("store-" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12])
    try:
        encode([listing], encoder=um.encoder(space), modality=mod, out=store_dir, progress=progress, profile=um.profile,
               batch_size=32)
    except ValueError as e:  # nothing readable: every item is missing
        if "could be read" not in str(e):
            raise
        return out, ok
    store = EmbeddingStore.open(store_dir, verify=False)
    rows = {i: r for r, i in enumerate(store.ids)}
    arr = store.array()
    for k, i in enumerate(ids):
        r = rows.get(i)
        if r is not None:
            out[k] = arr[r]
            ok[k] = True
    return out, ok


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_if_changed(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    from pairfree.fileio import write_text

    write_text(path, text)
