"""`pairfree demo`: every method side by side on the toy world, as a table, report.json and report.png.

Connect CLIP-like (image, text) and CLAP-like (audio, text) toy spaces through their texts only, then
measure audio<->image retrieval on held-out true pairs that no method saw. Baselines show what the
method buys: a random map (chance), ridge and orthogonal Procrustes maps fitted on the overlap texts,
the same maps after per-modality centring, relative representations (ASIF: training-free, each item
described by its similarities to the overlap anchors), a text-only projector with modality offsets
(TextME-style), plain C-MCR (text-text alignment only) and a supervised upper bound trained on true
audio-image pairs.
Ex-MCR (clip as the frozen base, clap and ulip as leaves) adds the four-modality tasks.

Schedule: every trained method uses the same epochs and batch size, by default 12 x 1024 so that the
whole demo fits in about 5 minutes on 2 CPU cores; `--epochs 36 --batch-size 4096` is the papers'
schedule. The supervised model trains at least as many steps as C-MCR and at least 100 epochs over
its true pairs, so that it is an upper bound rather than an undertrained reference; the text-only
projector trains at least 100 epochs over the overlap texts (cheap, and undertrained at 12 x 1024).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pairfree.fileio import atomic_path, user_cache_dir, write_json

METRICS = ("R@1", "R@5", "mAP")
METHODS = ("random", "ridge", "procrustes", "centred", "relative", "textoffset", "cmcr_plain", "cmcr", "supervised")


def _pick(res: dict[str, float]) -> dict[str, float]:
    return {k: round(float(res[k]), 4) for k in METRICS}


def audio_image_scores(model, test: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """audio->image and image->audio retrieval; positives are the true pair (same test row)."""
    from pairfree.metrics import paired_retrieval

    za = model.embed("clap", "audio", test["clap/audio"])
    zv = model.embed("clip", "image", test["clip/image"])
    r = paired_retrieval(za, zv, positives="index")
    return {"audio_to_image": _pick(r["a_to_b"]), "image_to_audio": _pick(r["b_to_a"])}


def _methods(world, cfg_kwargs: dict[str, Any], cache_dir: Path | None = None) -> dict[str, Callable[[], Any]]:
    """The demo's methods, from the one method zoo `pairfree study` and `pairfree tune` share."""
    from pairfree.cli.study import method_builders

    builders = method_builders(world, cfg_kwargs, cache_dir)
    return {name: builders[name] for name in METHODS}


def _supervised_schedule(cfg_kwargs: dict[str, Any], n_overlap: int, n_pairs: int) -> dict[str, Any]:
    """The supervised bound's config: at least C-MCR's number of steps and at least 100 epochs over
    its pairs (with C-MCR's step count alone it is still undertrained on the demo world)."""
    from pairfree.connect import CMCRConfig

    cfg = CMCRConfig(**cfg_kwargs)
    steps = cfg.epochs * math.ceil(n_overlap / cfg.batch_size)
    return {**cfg_kwargs, "epochs": max(100, cfg.epochs, math.ceil(steps / math.ceil(n_pairs / cfg.batch_size)))}


#: the demo's schedule (the papers': 36 epochs of batch 4096); see the module docstring
DEMO_EPOCHS, DEMO_BATCH = 12, 1024


def run_demo(out: str | Path = "runs/demo", preset: str = "demo", seed: int = 0, epochs: int = DEMO_EPOCHS,
             batch_size: int = DEMO_BATCH, cache_dir: str | Path | None = None, progress: bool = True,
             with_exmcr: bool = True) -> dict[str, Any]:
    from pairfree.toy import ToyWorldConfig, make_world

    t0 = time.perf_counter()
    world = make_world(ToyWorldConfig(seed=seed, preset=preset),
                       cache_dir=Path(cache_dir) / "toy" if cache_dir else None, progress=progress)
    world_s = time.perf_counter() - t0
    cfg_kwargs: dict[str, Any] = {"seed": seed, "epochs": epochs, "batch_size": batch_size}
    report: dict[str, Any] = {"world": {**world.info, "load_or_build_seconds": round(world_s, 2)},
                              "schedule": {"epochs": epochs, "batch_size": batch_size}, "methods": {}}
    models = {}
    for name, build in _methods(world, cfg_kwargs, Path(cache_dir) if cache_dir else None).items():
        t = time.perf_counter()
        models[name] = build()
        seconds = time.perf_counter() - t
        report["methods"][name] = {**audio_image_scores(models[name], world.test), "seconds": round(seconds, 2)}
        if progress:
            print(f"  {name:11s} done in {seconds:6.1f} s")
    if with_exmcr:
        from pairfree.toy.evaluate import evaluate_unified, run_exmcr
        from pairfree.extend import ExMCRConfig

        model, results, seconds = run_exmcr(world, ExMCRConfig(**cfg_kwargs), progress,
                                            cache_dir=Path(cache_dir) / "pool" if cache_dir else None)
        report["methods"]["exmcr"] = {**results, "seconds": round(seconds, 2)}
        report["methods"]["cmcr"].update({k: v for k, v in evaluate_unified(models["cmcr"], world).items()
                                          if k not in report["methods"]["cmcr"]})
    out = Path(out)
    write_json(out / "report.json", report)
    plot_report(report, models.get("cmcr"), world, out / "report.png")
    print(format_table(report))
    print(f"\nwrote {out / 'report.json'} and {out / 'report.png'}  (total {time.perf_counter() - t0:.0f} s)")
    return report


def format_table(report: dict[str, Any]) -> str:
    head = f"{'method':12s}" + "".join(f"{'a->i ' + m:>11s}" for m in METRICS) + "".join(
        f"{'i->a ' + m:>11s}" for m in METRICS) + f"{'seconds':>9s}"
    lines = [head, "-" * len(head)]
    for name, r in report["methods"].items():
        row = f"{name:12s}" + "".join(f"{r['audio_to_image'][m]:11.3f}" for m in METRICS)
        row += "".join(f"{r['image_to_audio'][m]:11.3f}" for m in METRICS) + f"{r['seconds']:9.1f}"
        lines.append(row)
    extra = [k for k in report["methods"].get("exmcr", {}) if k not in ("audio_to_image", "image_to_audio", "seconds")]
    if extra:
        lines += ["", f"{'task':16s}{'cmcr':>26s}{'exmcr':>26s}"]
        for task in extra:
            cells = []
            for name in ("cmcr", "exmcr"):
                r = report["methods"][name].get(task)
                cells.append("-" if r is None else "  ".join(f"{k} {v:.3f}" for k, v in list(r.items())[:2]))
            lines.append(f"{task:16s}{cells[0]:>26s}{cells[1]:>26s}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], cmcr_model, world, path: Path) -> None:
    """Methods side by side, and a 2-D view (PCA) of C-MCR's unified space coloured by modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    extra = [k for k in methods.get("exmcr", {}) if k not in ("audio_to_image", "image_to_audio", "seconds")]
    ncols = 3 if extra else 2
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4.8))
    ax = axes[0]
    names = list(methods)
    bars = [("audio_to_image", "R@1"), ("image_to_audio", "R@1"), ("audio_to_image", "mAP")]
    width = 0.8 / len(bars)
    for j, (task, metric) in enumerate(bars):
        ax.bar(np.arange(len(names)) + j * width, [methods[n][task][metric] for n in names], width,
               label=f"{task.replace('_to_', '->')} {metric}")
    ax.set_xticks(np.arange(len(names)) + width)
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("score (held-out true pairs)")
    ax.set_title("audio <-> image, connected through text only")
    ax.legend(fontsize=8)
    ax = axes[1]
    if cmcr_model is not None:
        test = world.test
        parts = {"audio (clap)": cmcr_model.embed("clap", "audio", test["clap/audio"]),
                 "image (clip)": cmcr_model.embed("clip", "image", test["clip/image"]),
                 "text (clip)": cmcr_model.embed("clip", "text", test["clip/text"])}
        allz = np.concatenate(list(parts.values()))
        mean = allz.mean(0)
        _, _, vt = np.linalg.svd(allz - mean, full_matrices=False)
        for label, z in parts.items():
            p = (z - mean) @ vt[:2].T
            ax.scatter(p[:, 0], p[:, 1], s=4, alpha=0.5, label=label)
        ax.legend(fontsize=8, markerscale=3)
        ax.set_title("C-MCR unified space (PCA of test embeddings)")
    if extra:
        ax = axes[2]
        key = lambda r: r.get("R@1", r.get("Acc@1", 0.0))  # noqa: E731
        y = np.arange(len(extra))
        ax.barh(y + 0.2, [key(methods["exmcr"][t]) for t in extra], 0.4, label="exmcr")
        ax.barh(y - 0.2, [key(methods["cmcr"].get(t, {})) if t in methods["cmcr"] else 0 for t in extra], 0.4,
                label="cmcr")
        ax.set_yticks(y)
        ax.set_yticklabels(extra, fontsize=8)
        ax.set_xlabel("R@1 (Acc@1 for zero-shot)")
        ax.set_title("Ex-MCR unified space: all tasks")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, args.preset, args.seed, args.epochs, args.batch_size, args.cache_dir, progress=not args.quiet,
             with_exmcr=not args.no_exmcr)
    if args.search:
        from pairfree.cli.search import demo_assets

        index_dir, model_dir = demo_assets("small", args.cache_dir or None, progress=not args.quiet)
        print(f"\nsearch the toy world: pairfree serve --index {index_dir} --pretrained {model_dir}\n"
              f"(or simply: pairfree serve --demo), then open http://127.0.0.1:8000/")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="all methods side by side on the toy world", description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--preset", default="demo", choices=["demo", "small"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="epochs of every trained method (papers: 36)")
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH, help="batch size of every trained method (papers: 4096)")
    p.add_argument("--cache-dir", default=str(user_cache_dir()),
                   help="toy-world and pseudo-data cache ($PAIRFREE_CACHE, else $XDG_CACHE_HOME/pairfree, "
                        "else ~/.cache/pairfree); '' for none")
    p.add_argument("--no-exmcr", action="store_true", help="skip the Ex-MCR rows")
    p.add_argument("--search", action="store_true",
                   help="also build a search index on the toy world's media files and print how to serve it "
                        "(needs pairfree[serve])")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
