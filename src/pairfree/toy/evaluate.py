"""Evaluation of unified spaces on the toy world.

`evaluate_unified(model, world)` scores any fitted model exposing `embed(space, modality, X)`
(ExMCR, CMCR, the linear baselines) on the toy world's held-out paired items (`world.test`: row i
of every array is the same item rendered in every modality and encoded by every tower for it):

- retrieval tasks "<q>_to_<g>": queries = the test items in modality q, gallery = the same items in
  modality g; the one positive of query i is gallery row i (same item, `positives="index"`; other
  items of the same concept count as negatives). Each gives {"R@1", "R@5", "mAP"}.
- "3d_zero_shot": 3d test items classified against the concept prompts `world.classes["clip/text"]`
  (CLIP text, prompt templates averaged) by their primary concept: {"Acc@1", "Acc@3", "Acc@5"}.

Modalities are embedded through the model as `(space, modality)`: image and text from "clip",
audio from "clap", 3d from "ulip". A task is left out when the model cannot embed one of its sides
(C-MCR connects clip and clap only: no 3d tasks; its image<->text goes through the clip head).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

#: modality -> (space, modality) in the toy world
SOURCES = {"image": ("clip", "image"), "text": ("clip", "text"), "audio": ("clap", "audio"), "3d": ("ulip", "3d")}
RETRIEVAL_TASKS = (
    ("audio", "image"), ("image", "audio"), ("audio", "text"), ("text", "audio"),
    ("3d", "image"), ("image", "3d"), ("audio", "3d"), ("3d", "audio"),
    ("image", "text"), ("text", "image"),
)
TASKS = tuple(f"{a}_to_{b}" for a, b in RETRIEVAL_TASKS) + ("3d_zero_shot",)
RETRIEVAL_KEYS = ("R@1", "R@5", "mAP")


def _embedder(model) -> Callable[[str, np.ndarray], np.ndarray | None]:
    """modality -> unified embedding of the given test rows, or None when the model cannot embed it."""

    def can(space: str, modality: str) -> bool:
        if hasattr(model, "leaves") and hasattr(model, "base") and isinstance(getattr(model, "base"), dict):
            if space == model.base.get("name"):
                return modality in model.base.get("modalities", [])
            return space in model.leaves and modality in model.leaves[space]["modalities"]
        spaces = getattr(model, "spaces", {})
        return space in spaces and modality in spaces[space].get("modalities", [])

    def embed(modality: str, rows: np.ndarray) -> np.ndarray | None:
        space, mod = SOURCES[modality]
        return model.embed(space, mod, rows) if can(space, mod) else None

    return embed


def evaluate_unified(model, world, tasks: tuple[str, ...] | None = None) -> dict[str, dict[str, float]]:
    """Scores of a fitted unified space on world.test (module docstring); tasks it cannot do are omitted."""
    from pairfree import metrics

    want = set(tasks or TASKS)
    unknown = want - set(TASKS)
    if unknown:
        raise ValueError(f"evaluate_unified: unknown tasks {sorted(unknown)}; known: {list(TASKS)}")
    embed = _embedder(model)
    z: dict[str, np.ndarray | None] = {}
    for modality, (space, mod) in SOURCES.items():
        if any(modality in t.split("_to_") for t in want) or (modality == "3d" and "3d_zero_shot" in want):
            z[modality] = embed(modality, world.test[f"{space}/{mod}"])
    out: dict[str, dict[str, float]] = {}
    done: set[tuple[str, str]] = set()
    for a, b in RETRIEVAL_TASKS:
        if f"{a}_to_{b}" not in want and f"{b}_to_{a}" not in want:
            continue
        if (a, b) in done or z.get(a) is None or z.get(b) is None:
            continue
        res = metrics.paired_retrieval(z[a], z[b], positives="index", ks=(1, 5))
        done |= {(a, b), (b, a)}
        for name, r in ((f"{a}_to_{b}", res["a_to_b"]), (f"{b}_to_{a}", res["b_to_a"])):
            if name in want:
                out[name] = {k: round(float(r[k]), 4) for k in RETRIEVAL_KEYS}
    if "3d_zero_shot" in want and z.get("3d") is not None:
        classes = np.asarray(world.classes["clip/text"])
        c, t, d = classes.shape
        class_text = embed("text", classes.reshape(c * t, d))
        if class_text is not None:
            acc = metrics.zero_shot(z["3d"], class_text.reshape(c, t, -1), world.test["labels"])
            out["3d_zero_shot"] = {k: round(float(v), 4) for k, v in acc.items()}
    return {t: out[t] for t in TASKS if t in out}


def chance(world) -> dict[str, float]:
    """Chance levels of the reported numbers on this world's test set."""
    n = len(world.test["labels"])
    n_cls = np.asarray(world.classes["clip/text"]).shape[0]
    return {"R@1": 1 / n, "R@5": 5 / n, "Acc@1": 1 / n_cls, "Acc@5": 5 / n_cls}


def run_exmcr(world, config=None, progress: bool = True, *, leaves: tuple[str, ...] = ("clap", "ulip"),
              cache_dir: str | Path | None = None, run_dir: str | Path | None = None):
    """Fit Ex-MCR on the toy world (base clip; leaves clap via text, ulip via image) and evaluate it.

    Returns (model, results, seconds) with seconds = pseudo-data construction + training.
    """
    from pairfree.extend import ExMCR, ExMCRConfig

    overlaps = {"clap": "text", "ulip": "image"}
    t0 = time.perf_counter()
    model = ExMCR(config or ExMCRConfig()).fit(
        world.spaces["clip"], {name: (world.spaces[name], overlaps[name]) for name in leaves},
        cache_dir=cache_dir, run_dir=run_dir, progress=progress)
    seconds = time.perf_counter() - t0
    return model, evaluate_unified(model, world), seconds


def run_cmcr(world, config=None, progress: bool = True, *, cache_dir: str | Path | None = None):
    """Fit C-MCR clip+clap (overlap text) on the toy world and evaluate it: (model, results, seconds)."""
    from pairfree.connect import CMCR, CMCRConfig

    t0 = time.perf_counter()
    model = CMCR(config or CMCRConfig()).fit(world.spaces["clip"], world.spaces["clap"], "text",
                                             cache_dir=cache_dir, progress=progress)
    seconds = time.perf_counter() - t0
    return model, evaluate_unified(model, world), seconds
