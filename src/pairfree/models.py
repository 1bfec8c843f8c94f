"""One entry point for every kind of fitted unified-space model: load any saved folder, and describe
which pretrained spaces and modalities a model embeds (what the unified model, search and
evaluation need to know about it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: `method` field of a saved config.json -> "module:Class"
METHODS = {
    "cmcr": "pairfree.connect:CMCR",
    "exmcr": "pairfree.extend:ExMCR",
    "supervised": "pairfree.supervised:SupervisedMap",
    "ridge": "pairfree.baselines:RidgeMap",
    "procrustes": "pairfree.baselines:ProcrustesMap",
    "random": "pairfree.baselines:RandomMap",
    "centred": "pairfree.baselines:CentredMap",
    "relative": "pairfree.baselines:RelativeMap",
    "textoffset": "pairfree.textonly:TextOffsetMap",
}


def model_class(method: str):
    import importlib

    if method not in METHODS:
        raise ValueError(f"unknown model method {method!r}; known: {sorted(METHODS)}")
    module, name = METHODS[method].split(":")
    return getattr(importlib.import_module(module), name)


def load_model(path: str | Path):
    """Load a saved model folder (or a run folder holding `model/`) of any method."""
    from pairfree.checkpoint import CONFIG, model_folder, read_meta

    folder = model_folder(path)
    cfg = folder / CONFIG
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no saved pairfree model here (config.json missing)")
    method = read_meta(cfg).get("method")
    if method not in METHODS:
        raise ValueError(f"{cfg}: field 'method' is {method!r}, expected one of {sorted(METHODS)}")
    return model_class(method).load(folder)


def spaces_of(model: Any) -> dict[str, dict[str, Any]]:
    """{space: {"dim", "modalities"}} of the pretrained spaces a fitted model takes embeddings from,
    in the model's own order (for Ex-MCR: the base first, then the leaves)."""
    base = getattr(model, "base", None)
    if isinstance(base, dict) and base:
        out = {base["name"]: {"dim": base["dim"], "modalities": list(base["modalities"])}}
        out.update({n: {"dim": leaf["dim"], "modalities": list(leaf["modalities"])}
                    for n, leaf in model.leaves.items()})
        return out
    spaces = getattr(model, "spaces", None)
    if not spaces:
        raise ValueError(f"{type(model).__name__} is not fitted (it describes no spaces)")
    return {n: {"dim": s["dim"], "modalities": list(s["modalities"])} for n, s in spaces.items()}


def default_sources(model: Any) -> dict[str, tuple[str, str]]:
    """modality -> (space, modality): the first space (in the model's order) that embeds it."""
    out: dict[str, tuple[str, str]] = {}
    for name, info in spaces_of(model).items():
        for m in info["modalities"]:
            out.setdefault(m, (name, m))
    return out


def fingerprint(model: Any) -> str:
    """Content hash of a fitted model (method, spaces, weights as float32): an index records it and
    refuses to be queried through another model."""
    import hashlib
    import json

    import numpy as np

    h = hashlib.sha256(json.dumps({"method": getattr(model, "method", type(model).__name__),
                                   "spaces": spaces_of(model)}, sort_keys=True).encode())
    heads = getattr(model, "heads", None)
    if heads is not None:
        for k, v in sorted(heads.state_dict().items()):
            h.update(k.encode())
            h.update(np.ascontiguousarray(v.detach().float().cpu().numpy()).tobytes())
    arrays = model._arrays() if hasattr(model, "_arrays") and getattr(model, "fitted", False) else {
        k: getattr(model, k) for k in ("W", "mu_x", "mu_y") if getattr(model, k, None) is not None}
    for k, v in sorted(arrays.items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v, dtype=np.float64).tobytes())
    if getattr(model, "params", None):
        h.update(json.dumps(model.params, sort_keys=True, default=str).encode())
    return h.hexdigest()


class IdentitySpace:
    """A pretrained space as its own unified space: embeddings pass through (L2-normalised). The
    reference rows of an evaluation: CLIP's own image <-> text, CLAP's own audio <-> text, ..."""

    method = "identity"

    def __init__(self, name: str, dim: int, modalities: tuple[str, ...] | list[str]):
        self.spaces = {name: {"dim": int(dim), "modalities": list(modalities)}}

    def embed(self, space: str, modality: str, X):
        from pairfree.space import embedding_rows

        if space not in self.spaces or modality not in self.spaces[space]["modalities"]:
            raise ValueError(f"this identity space is {self.spaces}; it has no {space!r}/{modality!r}")
        return embedding_rows(X, self.spaces[space]["dim"], f"embed({space!r}, {modality!r})").copy()
