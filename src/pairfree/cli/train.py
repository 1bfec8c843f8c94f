"""`pairfree fit` (C-MCR), `pairfree extend` (Ex-MCR) and `pairfree embed`, on precomputed embeddings.

    pairfree fit --space clip text=T_clip.npy image=V.npy --space clap text=T_clap.npy audio=A.npy \\
                 --overlap text --out runs/x [--config cmcr.yaml] [--epochs 10 ...]
    pairfree extend --base clip image=V.npy text=T_clip.npy \\
                    --leaf clap:text text=T_clap.npy audio=A.npy --leaf ulip:image image=V_ulip.npy 3d=P.npy \\
                    --out runs/ex [--config exmcr.yaml] [--epochs 10 ...]
    pairfree embed --model runs/x --space clap --modality audio --input A_new.npy --output Z.npy

MODALITY=PATH reads a .npy file (memory-mapped), a .npz file (one array, or FILE.npz:KEY) or an
embedding store folder written by `pairfree encode`.

A run folder holds `config.yaml` (the resolved config; its header comments name the cache, the
thread count and the versions), `checkpoints/` (resumed when present), `model/` (written
atomically at the end) and `history.json`. Everything is validated before the folder is touched:
a refused or failing start leaves it as it was. A resumed run must use the same CPU thread count
(it changes float rounding); `--threads` sets it.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
from pathlib import Path
from typing import Callable


from pairfree.config import add_config_flags, resolve_config, save_yaml
from pairfree.fileio import save_npy, user_cache_dir, write_json
from pairfree.space import Space


def parse_space(tokens: list[str], flag: str = "--space") -> Space:
    """`NAME MOD=PATH [MOD=PATH ...]` -> Space (paths as `pairfree.space.as_array` reads them)."""
    if len(tokens) < 2:
        raise ValueError(f"{flag} needs a name and at least one MODALITY=PATH, got {' '.join(tokens)!r}")
    name, arrays = tokens[0], {}
    for tok in tokens[1:]:
        if "=" not in tok:
            raise ValueError(f"{flag} {name}: expected MODALITY=PATH, got {tok!r}")
        mod, path = tok.split("=", 1)
        if mod in arrays:
            raise ValueError(f"{flag} {name}: modality {mod!r} given twice")
        arrays[mod] = Path(path)
    return Space(name, arrays)


def load_model(path: str | Path):
    """Load a saved model folder (or a run folder holding `model/`) of any method."""
    from pairfree.checkpoint import CONFIG, model_folder, read_meta

    folder = model_folder(path)
    cfg = folder / CONFIG
    if not cfg.is_file():
        raise FileNotFoundError(f"{path}: no saved pairfree model here (config.json missing)")
    method = read_meta(cfg).get("method")
    if method == "cmcr":
        from pairfree.connect import CMCR

        return CMCR.load(folder)
    if method == "exmcr":
        from pairfree.extend import ExMCR

        return ExMCR.load(folder)
    raise ValueError(f"{cfg}: field 'method' is {method!r}, expected 'cmcr' or 'exmcr'")


class RunFolder:
    """A run folder that always describes the model in it.

    Checks happen before anything is written: `--out` must be a folder (or absent), and a
    `model/` already there must come from the same run (else --restart). `start` (called by the
    fit once its own validation passed) writes config.yaml and, with --restart, removes the old
    model; `finish` writes the model and its history.
    """

    def __init__(self, out: str | Path, restart: bool):
        self.out, self.restart = Path(out), restart
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out}: exists and is not a folder")
        self.checkpoints = self.out / "checkpoints"

    def check_model(self, run_key: str) -> None:
        from pairfree.checkpoint import CONFIG, read_meta

        cfg = self.out / "model" / CONFIG
        if self.restart or not cfg.is_file():
            return
        if read_meta(cfg).get("run_key") != run_key:
            raise ValueError(f"--out {self.out}: holds a model trained on other data or settings ({cfg}); "
                             "choose another --out or pass --restart to replace it")

    def starter(self, config, header: str) -> Callable[[], None]:
        def start() -> None:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.restart and (self.out / "model").exists():
                shutil.rmtree(self.out / "model")
            save_yaml(self.out / "config.yaml", config, header)

        return start

    def finish(self, model, summary: str) -> int:
        model.save(self.out / "model")
        write_json(self.out / "history.json", model.history)
        print(f"saved {self.out / 'model'}  ({summary})")
        return 0


def _header(args: argparse.Namespace, command: str) -> str:
    import torch

    from pairfree import __version__

    return (f"pairfree {command}: resolved config (use it again with --config)\n"
            f"written {datetime.datetime.now().isoformat(timespec='seconds')} by pairfree {__version__}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n"
            f"aggregation cache: {args.cache_dir}")


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def cmd_fit(args: argparse.Namespace) -> int:
    from pairfree.connect import CMCR, CMCRConfig

    config = resolve_config(CMCRConfig, args, args.config)
    run = RunFolder(args.out, args.restart)
    spaces = [parse_space(t) for t in args.space]
    if len(spaces) != 2:
        raise ValueError(f"C-MCR connects exactly two spaces: give --space twice (got {len(spaces)})")
    _set_threads(args)
    model = CMCR(config)
    from pairfree.space import check_overlap

    check_overlap(spaces[0], spaces[1], args.overlap)
    run.check_model(model.run_key(spaces[0], spaces[1], args.overlap))
    model.fit(spaces[0], spaces[1], args.overlap, run_dir=run.checkpoints, cache_dir=args.cache_dir,
              progress=not args.quiet, restart=args.restart, on_start=run.starter(config, _header(args, "fit")))
    last = model.history[-1] if model.history else {}
    return run.finish(model, f"epochs {len(model.history)}, final loss {last.get('loss', float('nan')):.4f}")


def cmd_extend(args: argparse.Namespace) -> int:
    from pairfree.extend import ExMCR, ExMCRConfig, combined_key

    config = resolve_config(ExMCRConfig, args, args.config)
    run = RunFolder(args.out, args.restart)
    base = parse_space(args.base, "--base")
    leaves = {}
    for tokens in args.leaf:
        name, _, overlap = tokens[0].partition(":")
        space = parse_space([name, *tokens[1:]], "--leaf")
        if name in leaves:
            raise ValueError(f"--leaf {name}: given twice")
        leaves[name] = (space, overlap) if overlap else space
    _set_threads(args)
    model = ExMCR(config)
    run.check_model(combined_key(model.run_keys(base, leaves)))
    model.fit(base, leaves, run_dir=run.checkpoints, cache_dir=args.cache_dir, progress=not args.quiet,
              restart=args.restart, on_start=run.starter(config, _header(args, "extend")))
    return run.finish(model, f"base {base.name}, leaves {', '.join(leaves)}")


def cmd_embed(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.is_dir():
        raise ValueError(f"--output {out}: is a folder; give the .npy file to write")
    model = load_model(args.model)
    from pairfree.space import as_array

    X = as_array(Path(args.input), f"--input {args.input}")
    Z = model.embed(args.space, args.modality, X)
    save_npy(out, Z)
    print(f"wrote {out}: {Z.shape[0]} x {Z.shape[1]} unified embeddings")
    return 0


def _add_run_flags(p: argparse.ArgumentParser, config_cls, cache_name: str, cache_help: str) -> None:
    """The flags every training command shares, then one flag per config field."""
    cache = user_cache_dir(cache_name)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--config", help="YAML file of config fields (flags override it)")
    p.add_argument("--cache-dir", default=str(cache),
                   help=f"{cache_help} (default {cache}: $PAIRFREE_CACHE, else $XDG_CACHE_HOME/pairfree, "
                        "else ~/.cache/pairfree)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints and model in the run folder")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; a resumed run must use the same)")
    p.add_argument("--quiet", action="store_true", help="no progress output, no library warnings")
    add_config_flags(p, config_cls)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pairfree.connect import CMCRConfig

    p = sub.add_parser("fit", help="train C-MCR on precomputed embeddings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", nargs="+", action="append", required=True, metavar="TOKEN",
                   help="NAME MODALITY=PATH [MODALITY=PATH ...]; give it once per space")
    p.add_argument("--overlap", required=True, help="the modality both spaces share (rows aligned)")
    _add_run_flags(p, CMCRConfig, "aggregate", "memory-aggregation cache")
    p.set_defaults(func=cmd_fit)

    from pairfree.extend import ExMCRConfig

    x = sub.add_parser("extend", help="train Ex-MCR: extend a frozen base space with leaf spaces",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--base", nargs="+", required=True, metavar="TOKEN", help="NAME MODALITY=PATH ...: the frozen base")
    x.add_argument("--leaf", nargs="+", action="append", required=True, metavar="TOKEN",
                   help="NAME[:OVERLAP] MODALITY=PATH ...; once per leaf (OVERLAP inferred when unambiguous)")
    _add_run_flags(x, ExMCRConfig, "pool", "pseudo-data pool cache")
    x.set_defaults(func=cmd_extend)

    e = sub.add_parser("embed", help="map embeddings of one space into a trained unified space")
    e.add_argument("--model", required=True, help="run folder or saved model folder")
    e.add_argument("--space", required=True)
    e.add_argument("--modality", required=True)
    e.add_argument("--input", required=True, help="(n, dim) embeddings from that space's encoder: .npy, .npz or a store")
    e.add_argument("--output", required=True, help=".npy to write")
    e.set_defaults(func=cmd_embed)
