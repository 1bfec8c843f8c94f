"""`pairfree fit` (C-MCR), `pairfree extend` (Ex-MCR) and `pairfree embed`, on `.npy` embeddings.

    pairfree fit --space clip text=T_clip.npy image=V.npy --space clap text=T_clap.npy audio=A.npy \\
                 --overlap text --out runs/x [--config cmcr.yaml] [--epochs 10 ...]
    pairfree extend --base clip image=V.npy text=T_clip.npy \\
                    --leaf clap:text text=T_clap.npy audio=A.npy --leaf ulip:image image=V_ulip.npy 3d=P.npy \\
                    --out runs/ex [--config exmcr.yaml] [--epochs 10 ...]
    pairfree embed --model runs/x --space clap --modality audio --input A_new.npy --output Z.npy

A run folder holds `config.yaml` (the resolved config), `checkpoints/` (resumed when present),
`model/` (written atomically at the end) and `history.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pairfree.config import add_config_flags, resolve_config, save_yaml
from pairfree.fileio import atomic_path, write_json
from pairfree.space import Space


def parse_space(tokens: list[str]) -> Space:
    """`NAME MOD=PATH [MOD=PATH ...]` -> Space with memory-mapped `.npy` arrays."""
    if len(tokens) < 2:
        raise ValueError(f"--space needs a name and at least one MODALITY=PATH, got {' '.join(tokens)!r}")
    name, arrays = tokens[0], {}
    for tok in tokens[1:]:
        if "=" not in tok:
            raise ValueError(f"--space {name}: expected MODALITY=PATH, got {tok!r}")
        mod, path = tok.split("=", 1)
        arrays[mod] = Path(path)
    return Space(name, arrays)


def load_model(path: str | Path):
    """Load a saved model folder (or a run folder holding `model/`) of any method."""
    path = Path(path)
    if not (path / "config.json").exists() and (path / "model" / "config.json").exists():
        path = path / "model"
    cfg = path / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{path}: no saved pairfree model here (config.json missing)")
    method = json.loads(cfg.read_text()).get("method")
    if method == "cmcr":
        from pairfree.connect import CMCR

        return CMCR.load(path)
    if method == "exmcr":
        from pairfree.extend import ExMCR

        return ExMCR.load(path)
    raise ValueError(f"{cfg}: field 'method' is {method!r}, expected 'cmcr' or 'exmcr'")


def cmd_fit(args: argparse.Namespace) -> int:
    from pairfree.connect import CMCR, CMCRConfig

    spaces = [parse_space(t) for t in args.space]
    if len(spaces) != 2:
        raise ValueError(f"C-MCR connects exactly two spaces: give --space twice (got {len(spaces)})")
    config = resolve_config(CMCRConfig, args, args.config)
    out = Path(args.out)
    _prepare_run(out, args.restart, config)
    model = CMCR(config).fit(spaces[0], spaces[1], args.overlap, run_dir=out / "checkpoints",
                             cache_dir=args.cache_dir, progress=not args.quiet)
    last = model.history[-1] if model.history else {}
    return _finish_run(out, model, f"epochs {len(model.history)}, final loss {last.get('loss', float('nan')):.4f}")


def _prepare_run(out: Path, restart: bool, config) -> None:
    if restart and (out / "checkpoints").exists():
        import shutil

        shutil.rmtree(out / "checkpoints")
    save_yaml(out / "config.yaml", config)


def _finish_run(out: Path, model, summary: str) -> int:
    model.save(out / "model")
    write_json(out / "history.json", model.history)
    print(f"saved {out / 'model'}  ({summary})")
    return 0


def cmd_extend(args: argparse.Namespace) -> int:
    from pairfree.extend import ExMCR, ExMCRConfig

    base = parse_space(args.base)
    leaves = {}
    for tokens in args.leaf:
        name, _, overlap = tokens[0].partition(":")
        space = parse_space([name, *tokens[1:]])
        leaves[name] = (space, overlap) if overlap else space
    config = resolve_config(ExMCRConfig, args, args.config)
    out = Path(args.out)
    _prepare_run(out, args.restart, config)
    model = ExMCR(config).fit(base, leaves, run_dir=out / "checkpoints", cache_dir=args.cache_dir,
                              progress=not args.quiet)
    return _finish_run(out, model, f"base {base.name}, leaves {', '.join(leaves)}")


def cmd_embed(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    X = np.load(args.input, mmap_mode="r", allow_pickle=False)
    Z = model.embed(args.space, args.modality, X)
    with atomic_path(args.output) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, Z)
    print(f"wrote {args.output}: {Z.shape[0]} x {Z.shape[1]} unified embeddings")
    return 0


def _add_run_flags(p: argparse.ArgumentParser, config_cls, cache_default: str, cache_help: str) -> None:
    """The flags every training command shares, then one flag per config field."""
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="YAML file of config fields (flags override it)")
    p.add_argument("--cache-dir", default=cache_default, help=cache_help)
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run folder")
    p.add_argument("--quiet", action="store_true")
    add_config_flags(p, config_cls)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pairfree.connect import CMCRConfig

    p = sub.add_parser("fit", help="train C-MCR on precomputed embeddings (.npy)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", nargs="+", action="append", required=True, metavar="TOKEN",
                   help="NAME MODALITY=PATH [MODALITY=PATH ...]; give it once per space")
    p.add_argument("--overlap", required=True, help="the modality both spaces share (rows aligned)")
    _add_run_flags(p, CMCRConfig, ".cache/pairfree/aggregate", "memory-aggregation cache")
    p.set_defaults(func=cmd_fit)

    from pairfree.extend import ExMCRConfig

    x = sub.add_parser("extend", help="train Ex-MCR: extend a frozen base space with leaf spaces (.npy)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--base", nargs="+", required=True, metavar="TOKEN", help="NAME MODALITY=PATH ...: the frozen base")
    x.add_argument("--leaf", nargs="+", action="append", required=True, metavar="TOKEN",
                   help="NAME[:OVERLAP] MODALITY=PATH ...; once per leaf (OVERLAP inferred when unambiguous)")
    _add_run_flags(x, ExMCRConfig, ".cache/pairfree/pool", "pseudo-data pool cache")
    x.set_defaults(func=cmd_extend)

    e = sub.add_parser("embed", help="map embeddings of one space into a trained unified space")
    e.add_argument("--model", required=True, help="run folder or saved model folder")
    e.add_argument("--space", required=True)
    e.add_argument("--modality", required=True)
    e.add_argument("--input", required=True, help=".npy (n, dim) embeddings from that space's encoder")
    e.add_argument("--output", required=True, help=".npy to write")
    e.set_defaults(func=cmd_embed)
