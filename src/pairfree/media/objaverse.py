"""The Objaverse record format of ULIP-2 / OpenShape training data, read without running pickle code.

A record is a `.npy` file holding a pickled 0-d object array whose item is a dict:
`xyz` (10000 x 3 float16), `rgb` (10000 x 3 float16), `id`, `dataset`, `group`, `text` (list of
str), captions (`blip_caption`, `msft_caption`, `retrieval_text`) and precomputed OpenCLIP
ViT-bigG-14 features (1280-d, not normalised): `image_feat` (12 rendered views x 1280),
`thumbnail_feat` (1280), and `text_feat` / `blip_caption_feat` / `msft_caption_feat` /
`retrieval_text_feat` (a dict, or a list of dicts, of 1 x 1280 arrays under `original` and,
for some, `prompt_avg`).

Feature keys for `record_feature` / `records_to_space` (one embedding per record):
  - "thumbnail_feat": the thumbnail view's image feature;
  - "image_feat": the mean of the L2-normalised rendered views (then re-normalised by Space);
    "image_feat[i]": view i only;
  - "<name>_feat" for text-like fields (text_feat, blip_caption_feat, msft_caption_feat,
    retrieval_text_feat): the `original` variant; "<name>_feat:prompt_avg" picks that variant;
    a field holding a list (several texts) gives the mean of its L2-normalised entries.
Default space: {"image": "thumbnail_feat", "text": "text_feat"} -- the object's rendered
thumbnail and its name/tag text, both in OpenCLIP ViT-bigG-14's space (rows are paired here,
but a Space treats modalities as unpaired memories).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from pairfree.media._common import MediaError, Source, label

DEFAULT_MODALITIES = {"image": "thumbnail_feat", "text": "text_feat"}
FEATURE_DIM = 1280


def is_record(arr: Any) -> bool:
    return isinstance(arr, np.ndarray) and arr.dtype.hasobject and arr.shape == () and isinstance(arr.item(), dict)


def record_from_array(arr: np.ndarray, where: str) -> dict:
    """Validate the unpickled 0-d object array and return its dict with xyz / rgb as float32."""
    if not is_record(arr):
        raise MediaError(f"{where}: not an Objaverse record (expected a 0-d object array holding a dict)")
    rec = dict(arr.item())
    if "xyz" not in rec:
        raise MediaError(f"{where}: the record has no 'xyz' field (fields: {sorted(rec)})")
    for key in ("xyz", "rgb"):
        if key not in rec:
            continue
        a = rec[key]
        if not isinstance(a, np.ndarray) or a.ndim != 2 or a.shape[1] != 3 or not np.issubdtype(a.dtype, np.number):
            got = f"{type(a).__name__} {getattr(a, 'shape', '')} {getattr(a, 'dtype', '')}".strip()
            raise MediaError(f"{where}: field {key!r} must be an (N, 3) numeric array, got {got}")
        rec[key] = a.astype(np.float32)
    return rec


def load_objaverse_record(src: Source, *, name: str | None = None) -> dict:
    """Read one Objaverse record `.npy` safely (see `pairfree.media.safe_pickle`)."""
    from pairfree.media.safe_pickle import load_npy

    where = label(src, name)
    arr = load_npy(src, name=name)
    return record_from_array(arr, where)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


_KEY = re.compile(r"^(?P<field>[A-Za-z_]+)(?:\[(?P<index>\d+)\])?(?::(?P<variant>[A-Za-z_]+))?$")


def record_feature(record: Mapping[str, Any], key: str, where: str = "record") -> np.ndarray:
    """One float32 (dim,) feature of a record, chosen by `key` (see the module docstring)."""
    m = _KEY.match(key)
    if not m:
        raise ValueError(f"bad feature key {key!r}; expected e.g. 'thumbnail_feat', 'image_feat', 'image_feat[3]', 'text_feat:prompt_avg'")
    field, index, variant = m["field"], m["index"], m["variant"]
    if field not in record:
        feats = sorted(k for k in record if k.endswith("_feat"))
        raise MediaError(f"{where}: no field {field!r} (feature fields: {feats})")
    value = record[field]

    def pick(v: Any) -> np.ndarray:
        if isinstance(v, dict):
            var = variant or "original"
            if var not in v:
                raise MediaError(f"{where}: field {field!r} has no variant {var!r} (it has {sorted(v)})")
            v = v[var]
        elif variant is not None:
            raise MediaError(f"{where}: field {field!r} has no variants; drop ':{variant}'")
        a = np.asarray(v)
        if not np.issubdtype(a.dtype, np.number):
            raise MediaError(f"{where}: field {field!r} is not numeric (dtype {a.dtype})")
        return a.astype(np.float32).reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)

    if isinstance(value, list):
        if not value:
            raise MediaError(f"{where}: field {field!r} is an empty list (no text features in this record)")
        rows = np.concatenate([pick(v) for v in value])
    else:
        rows = pick(value)
    if index is not None:
        i = int(index)
        if i >= len(rows):
            raise MediaError(f"{where}: field {field!r} has {len(rows)} rows, no index {i}")
        rows = rows[i : i + 1]
    if len(rows) == 1:
        out = rows[0]
    else:
        out = _unit(rows).mean(axis=0)
    if not np.isfinite(out).all() or np.linalg.norm(out) < 1e-12:
        raise MediaError(f"{where}: feature {key!r} is zero or not finite")
    return out.astype(np.float32)


def records_to_space(
    paths: Iterable[str | Path],
    modalities: Mapping[str, str] | None = None,
    name: str = "openclip-vit-bigg-14",
    *,
    return_ids: bool = False,
):
    """A `pairfree.Space` of the OpenCLIP ViT-bigG-14 features stored inside Objaverse records.

    `modalities` maps a modality to a feature key (default `DEFAULT_MODALITIES`, i.e. image =
    thumbnail_feat, text = text_feat `original`); row i of every modality is record i. The Space
    L2-normalises the (unnormalised) features on entry. With `return_ids=True` returns
    (space, ids), ids being each record's `id` field (or the file stem when it has none).
    """
    from pairfree.space import Space

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("records_to_space: no record files given")
    modalities = dict(modalities or DEFAULT_MODALITIES)
    rows: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    ids = []
    for p in paths:
        rec = load_objaverse_record(p)
        ids.append(str(rec.get("id", p.stem)))
        for m, key in modalities.items():
            rows[m].append(record_feature(rec, key, where=str(p)))
    emb = {m: np.stack(r) for m, r in rows.items()}
    space = Space(name, emb)
    return (space, ids) if return_ids else space
