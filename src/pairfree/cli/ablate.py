"""`pairfree ablate`: rerun Ex-MCR's ablation studies (Tables 3-6: modality-centric data, alignment
objectives, f_l structure, f_m depth) on the toy world, each row one Ex-MCR CLAP->CLIP fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pairfree.fileio import atomic_path, user_cache_dir, write_json
from pairfree.toy.evaluate import chance, evaluate_unified


# ---- ablations ------------------------------------------------------------------------------------
#: the paper's ablation groups; every row is a set of ExMCRConfig overrides of the default
GROUPS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "data": [(name, {"passes": ",".join(name.split("+"))})
             for name in ("A", "I", "T", "A+I", "A+T", "I+T", "A+I+T")],
    "objective": [(name, {"objectives": name}) for name in ("A-T", "T-T", "A-V", "T-V", "dense")],
    "f_l": [("linear", {"fl": "linear"}), ("1-layer MLP", {"fl": "mlp1"}), ("2-layer MLP", {"fl": "mlp2"})],
    "f_m": [("linear", {"fm_depth": 0})] + [(f"{k}-layer MLP", {"fm_depth": k}) for k in range(1, 6)],
}
#: which row of each group is the default configuration (shared, trained once)
DEFAULT_ROWS = {"data": "A+I+T", "objective": "dense", "f_l": "linear", "f_m": "2-layer MLP"}
ABLATE_TASKS = ("audio_to_image", "image_to_audio", "audio_to_text", "text_to_audio")
ABLATE_DEFAULTS = {"epochs": 12, "batch_size": 1024}


def _row_key(overrides: dict[str, Any], base) -> str:
    cfg = replace(base, **overrides)
    return json.dumps(asdict(cfg), sort_keys=True)


def run_ablations(world, base_config=None, *, cache_dir: str | Path | None = None,
                  groups: tuple[str, ...] | None = None, progress: Callable[[str], None] | None = None,
                  ulip_default: bool = True) -> dict[str, Any]:
    """Fit every ablation row (rows identical to the default are trained once) and score them."""
    from pairfree.extend import ExMCR, ExMCRConfig

    base = base_config or ExMCRConfig(**ABLATE_DEFAULTS)
    say = progress or (lambda msg: None)
    todo = [(g, name, ov) for g in (groups or tuple(GROUPS)) for name, ov in GROUPS[g]]
    unique: dict[str, dict[str, Any]] = {}
    for _, _, ov in todo:
        unique.setdefault(_row_key(ov, base), ov)
    results: dict[str, dict[str, Any]] = {}
    t_all = time.perf_counter()
    for i, (key, ov) in enumerate(unique.items()):
        t0 = time.perf_counter()
        model = ExMCR(replace(base, **ov)).fit(world.spaces["clip"], {"clap": (world.spaces["clap"], "text")},
                                               cache_dir=cache_dir, progress=False)
        scores = evaluate_unified(model, world, ABLATE_TASKS)
        results[key] = {"scores": scores, "seconds": round(time.perf_counter() - t0, 2)}
        say(f"[{i + 1}/{len(unique)}] {ov or 'default'}: audio->image R@1 {scores['audio_to_image']['R@1']:.3f} "
            f"mAP {scores['audio_to_image']['mAP']:.3f} | audio->text R@1 {scores['audio_to_text']['R@1']:.3f} "
            f"mAP {scores['audio_to_text']['mAP']:.3f}  ({results[key]['seconds']:.1f}s)")
    rows = []
    for g, name, ov in todo:
        r = results[_row_key(ov, base)]
        rows.append({"group": g, "variant": name, "overrides": ov, "default": DEFAULT_ROWS[g] == name,
                     "scores": r["scores"], "seconds": r["seconds"]})
    out: dict[str, Any] = {"config": asdict(base), "rows": rows, "unique_fits": len(unique)}
    if ulip_default:
        t0 = time.perf_counter()
        model = ExMCR(base).fit(world.spaces["clip"], {"clap": (world.spaces["clap"], "text"),
                                                       "ulip": (world.spaces["ulip"], "image")},
                                cache_dir=cache_dir, progress=False)
        out["ulip_default"] = {"scores": evaluate_unified(model, world), "seconds": round(time.perf_counter() - t0, 2)}
        say(f"default with both leaves (clap, ulip): {json.dumps(out['ulip_default']['scores'])}")
    out["baselines"] = baseline_rows(world, base, say)
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    out["chance"] = chance(world)
    return out


#: the training-free and text-only rivals the ablation rows are read against (docs/methods.md)
BASELINES = ("procrustes", "centred", "relative", "textoffset")


def baseline_rows(world, base, say: Callable[[str], None]) -> dict[str, Any]:
    """The baseline ladder on the same world and tasks, built as `pairfree study` builds it."""
    from pairfree.cli.study import method_builders

    builders = method_builders(world, {"epochs": base.epochs, "batch_size": base.batch_size, "seed": base.seed}, None)
    rows = {}
    for name in BASELINES:
        t0 = time.perf_counter()
        rows[name] = {"scores": evaluate_unified(builders[name](), world, ABLATE_TASKS),
                      "seconds": round(time.perf_counter() - t0, 2)}
        say(f"baseline {name}: audio->image R@1 {rows[name]['scores']['audio_to_image']['R@1']:.3f}")
    return rows


def summary(scores: dict[str, Any]) -> tuple[float, float, float, float]:
    """(audio->image R@1, audio->image mAP, audio->text R@1, audio->text mAP) of one row (audio queries)."""
    return (scores["audio_to_image"]["R@1"], scores["audio_to_image"]["mAP"],
            scores["audio_to_text"]["R@1"], scores["audio_to_text"]["mAP"])


def format_table(result: dict[str, Any]) -> str:
    """Plain-text table of the ablation rows (scores in %, audio queries)."""
    lines = [f"{'group':<10} {'variant':<14} {'A-I R@1':>8} {'A-I mAP':>8} {'A-T R@1':>8} {'A-T mAP':>8}"]
    last = None
    for r in result["rows"]:
        if last is not None and r["group"] != last:
            lines.append("")
        last = r["group"]
        vals = summary(r["scores"])
        mark = " *" if r["default"] else ""
        lines.append(f"{r['group']:<10} {r['variant'] + mark:<14} " + " ".join(f"{100 * v:8.2f}" for v in vals))
    if result.get("baselines"):
        lines.append("")
        for name, r in result["baselines"].items():
            lines.append(f"{'baseline':<10} {name:<14} " + " ".join(f"{100 * v:8.2f}" for v in summary(r["scores"])))
    return "\n".join(lines)


def _plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys(r["group"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.6), squeeze=False)
    for ax, g in zip(axes[0], groups):
        rows = [r for r in result["rows"] if r["group"] == g]
        x = np.arange(len(rows))
        vals = np.array([summary(r["scores"]) for r in rows]) * 100
        ax.bar(x - 0.2, vals[:, 1], 0.4, label="audio-image mAP")
        ax.bar(x + 0.2, vals[:, 3], 0.4, label="audio-text mAP")
        ax.set_xticks(x, [r["variant"] for r in rows], rotation=40, ha="right", fontsize=8)
        ax.set_title(g)
    axes[0][0].set_ylabel("mAP (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def cmd_ablate(args: argparse.Namespace) -> int:
    from pairfree.extend import ExMCRConfig
    from pairfree.toy import ToyWorldConfig, make_world

    out = Path(args.out)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    say(f"toy world: preset {args.preset}, seed {args.seed} (cached under {args.cache_dir})")
    world = make_world(ToyWorldConfig(seed=args.seed, preset=args.preset), cache_dir=Path(args.cache_dir) / "toy",
                       progress=not args.quiet)
    base = ExMCRConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    say(f"Ex-MCR ablations (CLAP -> CLIP), {args.epochs} epochs, batch {args.batch_size}"
        + (" (reduced from the paper's 36 x 4096 so the study fits in minutes on a laptop CPU)"
           if (args.epochs, args.batch_size) == (ABLATE_DEFAULTS["epochs"], ABLATE_DEFAULTS["batch_size"]) else ""))
    groups = tuple(args.groups.split(",")) if args.groups else None
    if groups and set(groups) - set(GROUPS):
        raise ValueError(f"--groups: unknown {sorted(set(groups) - set(GROUPS))}; choose from {list(GROUPS)}")
    result = run_ablations(world, base, cache_dir=Path(args.cache_dir) / "pool", groups=groups, progress=say,
                           ulip_default=not args.no_ulip)
    result["world"] = {"preset": args.preset, "seed": args.seed, "sizes": world.info.get("sizes")}
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    table = format_table(result)
    write_json(out / "ablate.json", result)
    with atomic_path(out / "ablate.txt") as tmp:
        tmp.write_text(table + "\n")
    plotted = _plot(result, out / "ablate.png")
    print(table)
    print(f"\n(* = default; scores in %, audio queries; chance R@1 "
          f"{100 * result['chance']['R@1']:.2f}%)")
    print(f"wrote {out / 'ablate.json'}" + (f", {out / 'ablate.png'}" if plotted else "")
          + f" in {result['total_seconds']:.0f}s")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="rerun Ex-MCR's ablation studies on the toy world",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=("small", "demo"), help="toy-world size")
    p.add_argument("--out", default="runs/ablate", help="folder for ablate.json / ablate.txt / ablate.png")
    p.add_argument("--epochs", type=int, default=ABLATE_DEFAULTS["epochs"],
                   help=f"epochs per fit (default {ABLATE_DEFAULTS['epochs']}; the paper trains 36)")
    p.add_argument("--batch-size", type=int, default=ABLATE_DEFAULTS["batch_size"],
                   help=f"batch size (default {ABLATE_DEFAULTS['batch_size']}; the paper uses 4096)")
    p.add_argument("--seed", type=int, default=0, help="toy-world and training seed")
    p.add_argument("--groups", help=f"comma-separated subset of {list(GROUPS)}")
    p.add_argument("--no-ulip", action="store_true", help="skip the default fit with both leaves (3d tasks)")
    p.add_argument("--cache-dir", default=str(user_cache_dir()),
                   help="toy-world and pseudo-data cache ($PAIRFREE_CACHE, else $XDG_CACHE_HOME/pairfree, "
                        "else ~/.cache/pairfree)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_ablate)
