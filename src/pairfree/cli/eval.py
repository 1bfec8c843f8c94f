"""`pairfree eval`: score a unified space on the papers' benchmarks, from the datasets as distributed.

    pairfree eval --release ex-mcr/base --task ave/audio-image --task modelnet40/3d-zero-shot \\
                  --root ave=/data/AVE_Dataset --root modelnet40=/data/modelnet40_normal_resampled
    pairfree eval --space clip=hf-clip:openai/clip-vit-base-patch32 --task coco/image-text --root coco=/data/coco
    pairfree eval --toy [--preset small]       # every method of the demo on every toy task, offline
    pairfree eval --summary runs/eval          # a markdown table of all results in a folder
    pairfree eval --list                       # the tasks, their datasets and kinds

One JSON per (model, task) under --out/<name>/, with the protocol, the dataset coverage (missing
files are counted and the run goes on), versions and fingerprints; plots under plots/. Encoder
embeddings are cached in stores (--cache-dir), so a second model with the same encoders re-encodes
nothing. --limit N scores only the first N items of each dataset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pairfree.fileio import user_cache_dir


def _roots(tokens: list[str] | None) -> dict[str, str]:
    out = {}
    for tok in tokens or []:
        name, _, path = tok.partition("=")
        if not path:
            raise ValueError(f"--root expects DATASET=DIR, got {tok!r}")
        out[name] = path
    return out


def _models(args: argparse.Namespace) -> dict[str, Any]:
    from pairfree.cli.search import _load_unified

    models = {}
    for tok in args.space or []:
        name, _, spec = tok.partition("=")
        if not spec:
            raise ValueError(f"--space expects NAME=SPEC, got {tok!r}")
        from pairfree.encoders.registry import load_encoder
        from pairfree.models import IdentitySpace
        from pairfree.unified import UnifiedModel

        enc = load_encoder(spec, device=args.device, profile=args.profile or "default")
        models[f"{name}-own-space"] = UnifiedModel(IdentitySpace(name, enc.dim, enc.modalities), {name: enc},
                                                   profile=args.profile or "default")
    if args.pretrained or args.release or args.model:
        um = _load_unified(args)
        name = args.name or (args.release or Path(args.pretrained or args.model).name).replace("/", "-")
        models[name] = um
    return models


def run_all(models: dict[str, Any], tasks, roots: dict[str, str], out: Path, *, limit: int | None, cache: Path,
            progress: bool, plots: bool = True) -> list[dict]:
    from pairfree.eval.runner import run_task

    results = []
    for name, um in models.items():
        for spec in tasks:
            if spec.dataset not in roots:
                print(f"skip {spec.name}: no --root {spec.dataset}=DIR", file=sys.stderr)
                continue
            missing = spec.modalities() - set(um.modalities)
            if missing:
                print(f"skip {name} on {spec.name}: it does not embed {sorted(missing)}", file=sys.stderr)
                continue
            r = run_task(um, spec, roots[spec.dataset], out, name, limit=limit, cache=cache, progress=progress,
                         plots=plots)
            from pairfree.eval.summary import headline

            print(f"{name:<22} {spec.name:<30} {headline(r)}  (coverage {r['coverage']['present']}/"
                  f"{r['coverage']['expected']})", flush=True)
            results.append(r)
    return results


def toy_models(preset: str, seed: int, epochs: int, batch_size: int, cache: Path, progress: bool
               ) -> tuple[Path, dict[str, Any]]:
    """The demo's methods (and the three toy spaces themselves) as unified models with toy encoders,
    and the toy test items written as media files with localization scenes (cached)."""
    from pairfree.cli.demo import _methods
    from pairfree.models import IdentitySpace, spaces_of
    from pairfree.toy import ToyWorldConfig, make_world
    from pairfree.toy.evaluate import run_exmcr
    from pairfree.toy.media import write_media
    from pairfree.unified import UnifiedModel

    world = make_world(ToyWorldConfig(seed=seed, preset=preset), cache_dir=user_cache_dir("toy"), progress=progress)
    media = Path(cache) / "toy-media" / f"{preset}-s{seed}-{world.info['key']}"
    if not (media / "world.json").is_file():
        write_media(world, media, splits=("test", "scenes"), progress=progress)
    fitted = {name: build() for name, build in _methods(world, {"seed": seed, "epochs": epochs, "batch_size": batch_size},
                                                         user_cache_dir()).items()}
    from pairfree.extend import ExMCRConfig

    fitted["exmcr"] = run_exmcr(world, ExMCRConfig(seed=seed, epochs=epochs, batch_size=batch_size), progress,
                                cache_dir=user_cache_dir("pool"))[0]
    for space, sp in world.spaces.items():
        fitted[f"{space}-own-space"] = IdentitySpace(space, sp.dim, sp.modalities)
    models = {name: UnifiedModel(m, {s: f"toy:{media}/{s}" for s in spaces_of(m)}) for name, m in fitted.items()}
    return media, models


def cmd_eval(args: argparse.Namespace) -> int:
    from pairfree.eval.registry import TASKS, resolve
    from pairfree.eval.summary import table

    if args.list:
        for t in TASKS.values():
            print(f"{t.name:<32} {t.kind:<14} --root {t.dataset}=DIR   {t.description}")
        return 0
    if args.summary:
        print(table(args.summary))
        return 0
    out = Path(args.out)
    cache = Path(args.cache_dir)
    if args.toy:
        media, models = toy_models(args.preset, args.seed, args.epochs, args.batch_size, cache, not args.quiet)
        tasks = resolve(args.task or ["toy/all"])
        roots = {"toy": str(media)}
    else:
        models = _models(args)
        if not models:
            raise ValueError("name a model: --pretrained, --release, --model with --encoder, --space NAME=SPEC, or --toy")
        if not args.task:
            raise ValueError("name at least one --task (pairfree eval --list shows them)")
        tasks, roots = resolve(args.task), _roots(args.root)
    results = run_all(models, tasks, roots, out, limit=args.limit, cache=cache, progress=not args.quiet,
                      plots=not args.no_plots)
    print(f"\n{len(results)} results under {out}\n")
    print(table(out))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pairfree.cli.search import _model_flags

    p = sub.add_parser("eval", help="score a unified space on the papers' benchmarks (or the toy world)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", action="append", help="task name, DATASET/all or all (repeat)")
    p.add_argument("--root", action="append", metavar="DATASET=DIR", help="a dataset's root as distributed (repeat)")
    p.add_argument("--out", default="runs/eval", help="results folder (one JSON per model and task)")
    p.add_argument("--name", help="the model's name in the results (default: from the release / folder)")
    p.add_argument("--space", action="append", metavar="NAME=SPEC",
                   help="also score a pretrained space as its own unified space (reference rows)")
    p.add_argument("--profile", choices=["default", "official"])
    p.add_argument("--limit", type=int, help="score only the first N items of each dataset")
    p.add_argument("--cache-dir", default=str(user_cache_dir("eval")), help="encoder-embedding stores and extracted frames")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--summary", metavar="DIR", help="print a markdown table of the results in DIR and exit")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    t = p.add_argument_group("the toy world (offline)")
    t.add_argument("--toy", action="store_true", help="every demo method on the toy tasks")
    t.add_argument("--preset", default="demo", choices=["small", "demo"])
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--quiet", action="store_true")
    _model_flags(p, required=False)
    p.set_defaults(func=cmd_eval)
