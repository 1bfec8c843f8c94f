"""`pairfree study`: every method on every toy-world variant, over world seeds x training seeds.

    pairfree study [--preset small] [--variants base,small-gap,similar-text,even-coverage]
                   [--world-seeds 0,1,2] [--train-seeds 0,1,2] [--methods ...] [--out runs/study]

One JSON per (variant, world seed, training seed, method) under the cache (`$PAIRFREE_CACHE/study`),
written when the cell finishes, so an interrupted study resumes where it stopped and a second
study reuses every cell it shares. Methods that do not train (the linear maps, relative
representations) depend on the world seed only. Output: a table of mean ± std per variant and
method (audio <-> image R@1 and mAP, audio <-> text R@1), `study.json` and `study.png`.

Also here: `run_method`, the method zoo the study, `pairfree tune` and docs/methods.md share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pairfree.fileio import user_cache_dir, write_json

TASKS = ("audio_to_image", "image_to_audio", "audio_to_text", "text_to_audio")
#: methods whose result does not depend on the training seed
UNTRAINED = ("random", "ridge", "procrustes", "centred", "relative")


def _supervised(world, cfg_kwargs):
    from pairfree.cli.demo import _supervised_schedule
    from pairfree.connect import CMCRConfig
    from pairfree.supervised import SupervisedMap

    pairs = world.train_pairs
    cfg = CMCRConfig(**_supervised_schedule(cfg_kwargs, world.spaces["clip"].count("text"), len(pairs["clip/image"])))
    return SupervisedMap(cfg).fit_paired(("clip", "image", pairs["clip/image"]), ("clap", "audio", pairs["clap/audio"]),
                                         progress=False)


def _relative_pairs(world, cfg_kwargs):
    """Idea: distil relative representations into dense heads. Mutual nearest neighbours between the
    audio and image memories under the relative (anchor) representation become pseudo audio-image pairs,
    on which the supervised recipe trains the two heads (no true pair is used)."""
    from pairfree.baselines import RelativeMap
    from pairfree.connect import CMCRConfig
    from pairfree.supervised import SupervisedMap

    clip, clap = world.spaces["clip"], world.spaces["clap"]
    rel = RelativeMap().fit(clip, clap, "text")
    ra, rv = rel.embed("clap", "audio", clap["audio"]), rel.embed("clip", "image", clip["image"])
    a2v, v2a = np.empty(len(ra), np.int64), np.empty(len(rv), np.int64)
    best_v = np.full(len(rv), -np.inf)
    for s in range(0, len(ra), 2048):
        sim = ra[s : s + 2048] @ rv.T
        a2v[s : s + len(sim)] = sim.argmax(1)
        col = sim.max(0)
        better = col > best_v
        v2a[better], best_v[better] = sim.argmax(0)[better] + s, col[better]
    mutual = np.flatnonzero(v2a[a2v] == np.arange(len(ra)))
    from pairfree.cli.demo import _supervised_schedule

    cfg = CMCRConfig(**_supervised_schedule(cfg_kwargs, clip.count("text"), len(mutual)))
    model = SupervisedMap(cfg).fit_paired(("clip", "image", np.asarray(clip["image"])[a2v[mutual]]),
                                          ("clap", "audio", np.asarray(clap["audio"])[mutual]), progress=False)
    model.pseudo_pairs_ = int(len(mutual))
    return model


class Ensemble:
    """Idea: several unified spaces side by side. Each model's unit embedding, scaled by sqrt(weight),
    concatenated: the cosine of two such vectors is the weighted mean of the models' cosines."""

    method = "ensemble"

    def __init__(self, models: dict[str, Any], weights: dict[str, float]):
        self.models, self.weights = models, weights
        self.spaces = next(iter(models.values())).spaces

    def embed(self, space: str, modality: str, X) -> np.ndarray:
        total = sum(self.weights.values())
        parts = [np.sqrt(self.weights[n] / total) * m.embed(space, modality, X) for n, m in self.models.items()]
        return np.concatenate(parts, axis=1).astype(np.float32)


def method_builders(world, cfg_kwargs: dict[str, Any], cache_dir: Path | None) -> dict[str, Callable[[], Any]]:
    """name -> a function fitting that method on the toy world's clip (image, text) and clap (text,
    audio) spaces with the given schedule and seed (`cfg_kwargs`: epochs, batch_size, seed)."""
    from pairfree.baselines import CentredMap, ProcrustesMap, RandomMap, RelativeMap, RidgeMap
    from pairfree.connect import CMCR, CMCRConfig
    from pairfree.extend import ExMCR, ExMCRConfig
    from pairfree.textonly import TextOffsetConfig, TextOffsetMap

    clip, clap = world.spaces["clip"], world.spaces["clap"]
    pool = None if cache_dir is None else cache_dir / "pool"

    def cmcr(**kw):
        return CMCR(CMCRConfig(**cfg_kwargs, **kw)).fit(clip, clap, "text", cache_dir=pool, progress=False)

    return {
        "random": lambda: RandomMap().fit(clip, clap, "text"),
        "ridge": lambda: RidgeMap().fit(clip, clap, "text"),
        "procrustes": lambda: ProcrustesMap().fit(clip, clap, "text"),
        "centred": lambda: CentredMap().fit(clip, clap, "text"),
        "relative": lambda: RelativeMap().fit(clip, clap, "text"),
        # texts only, so cheap: trained to convergence (at the shared 12 x 1024 it is undertrained)
        "textoffset": lambda: TextOffsetMap(TextOffsetConfig(**{**cfg_kwargs, "epochs": max(100, cfg_kwargs["epochs"])}))
        .fit(clip, clap, "text"),
        "cmcr_plain": lambda: cmcr(semantic_consistency=False, semantic_completion=False),
        "cmcr": lambda: cmcr(),
        "cmcr_retrieve": lambda: cmcr(pseudo_pairs="retrieve"),
        "exmcr": lambda: ExMCR(ExMCRConfig(**cfg_kwargs)).fit(clip, {"clap": (clap, "text")}, cache_dir=pool,
                                                              progress=False),
        "supervised": lambda: _supervised(world, cfg_kwargs),
        "relative_pairs": lambda: _relative_pairs(world, cfg_kwargs),
    }


def score(model, world) -> dict[str, Any]:
    from pairfree.toy.evaluate import evaluate_unified

    return evaluate_unified(model, world, TASKS)


def variant_world(variant: str, preset: str, seed: int, cache: Path | None):
    from pairfree.toy import ToyWorldConfig, make_world
    from pairfree.toy.config import VARIANTS

    if variant not in VARIANTS:
        raise ValueError(f"unknown world variant {variant!r}; known: {sorted(VARIANTS)}")
    return make_world(ToyWorldConfig(seed=seed, preset=preset, overrides=VARIANTS[variant]),
                      cache_dir=None if cache is None else cache / "toy", progress=False)


def run_study(variants, world_seeds, train_seeds, methods, *, preset: str = "small", epochs: int = 12,
              batch_size: int = 1024, cache: Path | None = None, say: Callable[[str], None] = print) -> dict:
    """Every (variant, world seed, training seed, method) cell, cached as JSON; returns them all."""
    cells: dict[str, Any] = {}
    root = None if cache is None else cache / "study" / f"{preset}-e{epochs}-b{batch_size}"
    for variant in variants:
        for ws in world_seeds:
            world = None
            for ts in train_seeds:
                schedule = {"epochs": epochs, "batch_size": batch_size, "seed": ts}
                for name in methods:
                    if name in UNTRAINED and ts != train_seeds[0]:
                        continue  # the same for every training seed
                    key = f"{variant}/w{ws}/" + ("untrained" if name in UNTRAINED else f"t{ts}") + f"/{name}"
                    path = None if root is None else root / f"{key}.json"
                    if path is not None and path.exists():
                        cells[key] = json.loads(path.read_text())
                        continue
                    if world is None:
                        world = variant_world(variant, preset, ws, cache)
                    t0 = time.perf_counter()
                    if name == "ensemble":
                        builders = method_builders(world, schedule, cache)
                        model = Ensemble({"cmcr": builders["cmcr"](), "relative": builders["relative"]()},
                                         {"cmcr": 0.5, "relative": 0.5})
                    else:
                        model = method_builders(world, schedule, cache)[name]()
                    cell = {"scores": score(model, world), "seconds": round(time.perf_counter() - t0, 2),
                            "variant": variant, "world_seed": ws, "train_seed": ts, "method": name}
                    if path is not None:
                        write_json(path, cell)
                    cells[key] = cell
                    say(f"{key}: audio<->image R@1 {0.5 * (cell['scores']['audio_to_image']['R@1'] + cell['scores']['image_to_audio']['R@1']):.3f} "
                        f"({cell['seconds']:.0f} s)")
    return cells


def summarize(cells: dict[str, Any]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """variant -> method -> metric -> [mean, std, n] over every (world seed, training seed) cell."""
    vals: dict[tuple[str, str], dict[str, list[float]]] = {}
    for c in cells.values():
        s = c["scores"]
        row = vals.setdefault((c["variant"], c["method"]), {})
        metrics = {"a<->i R@1": 0.5 * (s["audio_to_image"]["R@1"] + s["image_to_audio"]["R@1"]),
                   "a<->i mAP": 0.5 * (s["audio_to_image"]["mAP"] + s["image_to_audio"]["mAP"])}
        if "audio_to_text" in s:
            metrics["a<->t R@1"] = 0.5 * (s["audio_to_text"]["R@1"] + s["text_to_audio"]["R@1"])
        for k, v in metrics.items():
            row.setdefault(k, []).append(v)
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (variant, method), metrics in vals.items():
        out.setdefault(variant, {})[method] = {k: [float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                                                   len(v)] for k, v in metrics.items()}
    return out


def format_summary(summary: dict, metric: str = "a<->i R@1") -> str:
    variants = list(summary)
    methods = list(dict.fromkeys(m for v in summary.values() for m in v))
    lines = ["| method | " + " | ".join(variants) + " |", "| --- |" + " ---: |" * len(variants)]
    for m in methods:
        cells = []
        for v in variants:
            r = summary[v].get(m, {}).get(metric)
            cells.append("-" if r is None else f"{r[0]:.3f} ± {r[1]:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path, metric: str = "a<->i R@1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pairfree.fileio import atomic_path

    variants = list(summary)
    methods = list(dict.fromkeys(m for v in summary.values() for m in v))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(methods)), 4.5))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        means = [summary[v].get(m, {}).get(metric, [np.nan, 0])[0] for m in methods]
        stds = [summary[v].get(m, {}).get(metric, [np.nan, 0])[1] for m in methods]
        ax.bar(np.arange(len(methods)) + j * width, means, width, yerr=stds, capsize=2, label=v)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
    ax.set_xticklabels(methods, rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def cmd_study(args: argparse.Namespace) -> int:
    from pairfree.toy.config import VARIANTS

    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    methods = args.methods.split(",")
    for m in methods:
        if m not in ALL_METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; known: {', '.join(ALL_METHODS)}")
    cache = Path(args.cache_dir) if args.cache_dir else None
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    cells = run_study(variants, _ints(args.world_seeds), _ints(args.train_seeds), methods, preset=args.preset,
                      epochs=args.epochs, batch_size=args.batch_size, cache=cache, say=say)
    summary = summarize(cells)
    out = Path(args.out)
    write_json(out / "study.json", {"summary": summary, "cells": cells, "preset": args.preset,
                                    "schedule": {"epochs": args.epochs, "batch_size": args.batch_size}})
    plot_summary(summary, out / "study.png")
    for metric in ("a<->i R@1", "a<->i mAP", "a<->t R@1"):
        print(f"\n{metric} (mean ± std over {len(_ints(args.world_seeds))} world seeds x "
              f"{len(_ints(args.train_seeds))} training seeds; untrained methods: world seeds only)\n")
        print(format_summary(summary, metric))
    print(f"\nwrote {out / 'study.json'} and {out / 'study.png'}")
    return 0


ALL_METHODS = ("random", "ridge", "procrustes", "centred", "relative", "textoffset", "cmcr_plain", "cmcr",
               "cmcr_retrieve", "exmcr", "supervised", "relative_pairs", "ensemble")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pairfree.toy.config import VARIANTS

    p = sub.add_parser("study", help="every method on every toy-world variant, over world x training seeds",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", choices=["small", "demo"])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--world-seeds", default="0,1,2")
    p.add_argument("--train-seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--cache-dir", default=str(user_cache_dir()), help="worlds, pools and finished cells ('' for none)")
    p.add_argument("--out", default="runs/study")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_study)
