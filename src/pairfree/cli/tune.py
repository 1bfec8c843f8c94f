"""`pairfree tune`: pick C-MCR hyperparameters and the stopping epoch without paired data.

    pairfree tune --space clip image=V.npy text=T_clip.npy --space clap text=T_clap.npy audio=A.npy \\
                  --overlap text [--grid lam=0.1,1 --grid temperature=0.05,0.1] [--score anchored] --out runs/tune
    pairfree tune --toy [--variants base,small-gap] [--preset small] --out runs/tune-toy

A small share of the overlap rows and of Y's other modality is held out (`--holdout`), every config of
the grid is trained on the rest, and the label-free scores of `pairfree.selection` are logged after
every epoch; the (config, epoch) with the best `--score` wins and is saved under --out/model. On the
toy world (`--toy`) the true held-out audio <-> image mAP is logged too, never used for the choice,
and the output is the selection study: how well each score ranks the (config, epoch) points
(Spearman correlation with the truth) and the regret of the point it picks (true mAP of the best
point minus that of the picked one).
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pairfree.fileio import user_cache_dir, write_json

#: the default grid: the knobs the C-MCR paper leaves open or fixes without a study
DEFAULT_GRID = {"lam": ["0.1", "1.0"], "temperature": ["0.05", "0.1"], "lr": ["0.001", "0.003"],
                "semantic_consistency": ["true", "false"]}


def parse_grid(items: list[str] | None) -> dict[str, list[str]]:
    from pairfree.connect import CMCRConfig

    if not items:
        return dict(DEFAULT_GRID)
    fields = set(CMCRConfig.__dataclass_fields__)
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--grid: expected FIELD=V1,V2,..., got {item!r}")
        name, values = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in fields:
            raise ValueError(f"--grid: {name!r} is not a C-MCR config field; known: {sorted(fields)}")
        grid[name] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[name]:
            raise ValueError(f"--grid {name}: no values")
    return grid


def configs(grid: dict[str, list[str]], base: dict[str, Any]):
    """Every combination of the grid as a validated CMCRConfig (values coerced as YAML ones are)."""
    from pairfree.connect import CMCRConfig

    names = list(grid)
    for values in itertools.product(*(grid[n] for n in names)):
        over = dict(zip(names, values))
        yield over, CMCRConfig.from_dict({**base, **over}, f"--grid {over}")


def _ranks(a) -> np.ndarray:
    """Ranks 0..n-1, ties given their average rank."""
    a = np.asarray(a, dtype=np.float64)
    values, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return (first + (counts - 1) / 2.0)[inverse]


def spearman(a, b) -> float:
    """Spearman's rank correlation (Pearson correlation of the tie-averaged ranks)."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def run_tune(x, y, overlap: str, grid: dict[str, list[str]], base: dict[str, Any], *, holdout: float = 0.05,
             truth=None, cache_dir: Path | None = None, say=print) -> dict[str, Any]:
    """Train every config with label-free scores logged per epoch (and `truth(model)` when given)."""
    from pairfree.connect import CMCR
    from pairfree.selection import Scorer, split_holdout

    x_tr, y_tr, held = split_holdout(x, y, overlap, fraction=holdout, seed=base.get("seed", 0))
    scorer = Scorer(x_tr, y_tr, overlap, held)

    def monitor(model):
        out = scorer(model)
        if truth is not None:
            out["true_mAP"] = truth(model)
        return out

    runs = []
    for over, cfg in configs(grid, base):
        t0 = time.perf_counter()
        model = CMCR(cfg).fit(x_tr, y_tr, overlap, cache_dir=cache_dir, progress=False, monitor=monitor)
        runs.append({"config": over, "history": model.history, "seconds": round(time.perf_counter() - t0, 1),
                     "model": model})
        last = model.history[-1]
        say(f"{over}: " + ", ".join(f"{k} {last[k]:.3f}" for k in ("overlap", "pseudo", "anchored", "true_mAP")
                                    if k in last) + f" ({runs[-1]['seconds']:.0f} s)")
    return {"runs": runs, "holdout": {"overlap": len(held.x_overlap), "other": len(held.y_other)}}


def analyse(runs: list[dict], scores=("overlap", "pseudo", "anchored")) -> dict[str, Any]:
    """Per score: Spearman with the truth over all (config, epoch) points and over the configs' final
    epochs, and the regret of the point / config it would pick."""
    points = [(i, h) for i, r in enumerate(runs) for h in r["history"]]
    truth = np.array([h["true_mAP"] for _, h in points])
    finals = [r["history"][-1] for r in runs]
    truth_final = np.array([h["true_mAP"] for h in finals])
    out = {"best_true_mAP": float(truth.max()), "best_final_true_mAP": float(truth_final.max())}
    for s in scores:
        vals = np.array([h[s] for _, h in points])
        vals_final = np.array([h[s] for h in finals])
        pick, pick_final = int(np.argmax(vals)), int(np.argmax(vals_final))
        out[s] = {"spearman_points": spearman(vals, truth), "spearman_configs": spearman(vals_final, truth_final),
                  "regret_point": float(truth.max() - truth[pick]),
                  "regret_config": float(truth_final.max() - truth_final[pick_final]),
                  "picked": runs[points[pick][0]]["config"] | {"epoch": points[pick][1]["epoch"]}}
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    from pairfree.cli.train import parse_space

    grid = parse_grid(args.grid)
    base = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed}
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    cache = Path(args.cache_dir) if args.cache_dir else None
    out = Path(args.out)
    if args.toy:
        from pairfree.cli.study import variant_world
        from pairfree.metrics import paired_retrieval

        report: dict[str, Any] = {"grid": grid, "schedule": base, "variants": {}}
        for variant in args.variants.split(","):
            world = variant_world(variant, args.preset, args.seed, cache)

            def truth(model, w=world):
                r = paired_retrieval(model.embed("clap", "audio", w.test["clap/audio"]),
                                     model.embed("clip", "image", w.test["clip/image"]), positives="index", ks=(1,))
                return 0.5 * (r["a_to_b"]["mAP"] + r["b_to_a"]["mAP"])

            say(f"== {variant}")
            res = run_tune(world.spaces["clip"], world.spaces["clap"], "text", grid, base, holdout=args.holdout,
                           truth=truth, cache_dir=None if cache is None else cache / "pool", say=say)
            report["variants"][variant] = {"analysis": analyse(res["runs"]), "holdout": res["holdout"],
                                           "runs": [{k: v for k, v in r.items() if k != "model"} for r in res["runs"]]}
        write_json(out / "selection.json", report)
        print(format_analysis(report))
        print(f"\nwrote {out / 'selection.json'}")
        return 0
    if not args.space or len(args.space) != 2 or not args.overlap:
        raise ValueError("pairfree tune: give two --space NAME MOD=PATH ... and --overlap (or --toy)")
    x, y = (parse_space(t) for t in args.space)
    res = run_tune(x, y, args.overlap, grid, base, holdout=args.holdout, cache_dir=cache, say=say)
    best = max(((r, h) for r in res["runs"] for h in r["history"]), key=lambda rh: rh[1][args.score])
    run, epoch = best[0], best[1]["epoch"]
    say(f"best by {args.score}: {run['config']} at epoch {epoch} ({args.score} {best[1][args.score]:.4f}); "
        f"refitting it for {epoch} epochs on all rows")
    from pairfree.connect import CMCR, CMCRConfig

    cfg = CMCRConfig.from_dict({**base, **run["config"], "epochs": epoch}, "best config")
    model = CMCR(cfg).fit(x, y, args.overlap, cache_dir=cache, progress=not args.quiet)
    model.save(out / "model")
    write_json(out / "tune.json", {"score": args.score, "best": {"config": run["config"], "epoch": epoch},
                                   "runs": [{k: v for k, v in r.items() if k != "model"} for r in res["runs"]],
                                   "holdout": res["holdout"], "refit": asdict(cfg)})
    print(f"wrote {out / 'model'} and {out / 'tune.json'}")
    return 0


def format_analysis(report: dict[str, Any]) -> str:
    lines = ["| world | score | Spearman (config x epoch) | Spearman (configs) | regret (point) | regret (config) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for variant, v in report["variants"].items():
        a = v["analysis"]
        for s in ("overlap", "pseudo", "anchored"):
            r = a[s]
            lines.append(f"| {variant} | {s} | {r['spearman_points']:.2f} | {r['spearman_configs']:.2f} | "
                         f"{r['regret_point']:.3f} | {r['regret_config']:.3f} |")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pairfree.toy.config import VARIANTS

    p = sub.add_parser("tune", help="choose C-MCR hyperparameters and epoch by label-free scores",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", nargs="+", action="append", metavar="TOKEN", help="NAME MODALITY=PATH ... (twice)")
    p.add_argument("--overlap")
    p.add_argument("--grid", action="append", metavar="FIELD=V1,V2", help=f"default: {DEFAULT_GRID}")
    p.add_argument("--score", default="anchored", choices=["overlap", "pseudo", "anchored"])
    p.add_argument("--holdout", type=float, default=0.05)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--toy", action="store_true", help="the selection study on toy-world variants (with the truth)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--preset", default="small", choices=["small", "demo"])
    p.add_argument("--cache-dir", default=str(user_cache_dir()))
    p.add_argument("--out", default="runs/tune")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_tune)
