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
from pairfree.models import load_model
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
        table = aggregation_table(getattr(model, "aggregation", {}))
        if table:
            print(table)
        print(f"saved {self.out / 'model'}  ({summary})")
        return 0


def _hop_reports(reports: dict, prefix: str = "") -> list[tuple[str, dict]]:
    """(hop, report) pairs of a model's `aggregation` ({hop: report}, or per leaf {leaf: {hop: report}})."""
    out = []
    for name, r in reports.items():
        if isinstance(r, dict) and "method" in r:
            out.append((prefix + name, r))
        elif isinstance(r, dict):
            out += _hop_reports(r, f"{prefix}{name} ")
    return out


def aggregation_table(reports: dict) -> str | None:
    """The approximate hops of a fit, one line each: what ran, its share of exact's work and its measured
    cosine to exact (mean / 1st percentile / min over the check queries). None when every hop ran exact:
    a paper-scale run should show its accuracy on the terminal, not only in the model's config.json."""
    hops = [(h, r) for h, r in _hop_reports(reports) if r.get("method") not in ("exact", None)]
    if not hops:
        return None
    width = max(len(h) for h, _ in hops)
    lines = [f"{'pseudo pairs':{width}s}  {'method':20s}  {'work':>6s}  cosine to exact: mean / 1st pct / min"]
    for hop, r in hops:
        what = r["method"] + (f" {r['select']}" if r.get("select") else "") + (" -> exact" if r.get("ran") else "")
        what += " (cached)" if r.get("cached") else ""
        c = r.get("cosine_to_exact")
        acc = f"{c['mean']:.5f} / {c['p1']:.4f} / {c['min']:.4f}" if c else "-"
        if r.get("redo"):
            acc += f"  ({r['redo']['queries']} redone exactly)"
        lines.append(f"{hop:{width}s}  {what:20s}  {100 * r.get('work_fraction', 1):5.1f}%  {acc}")
    return "\n".join(lines)


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


#: `pairfree fit --method`: the closed-form and training-free maps (docs/methods.md compares them)
TRAINING_FREE = {"relative": "RelativeMap", "procrustes": "ProcrustesMap", "centred": "CentredMap", "ridge": "RidgeMap"}


def _fit_training_free(args: argparse.Namespace) -> int:
    """Nothing is trained, so there is no config, schedule or checkpoint: the model folder only."""
    import pairfree.baselines as baselines
    from pairfree.space import check_overlap

    if args.select:
        raise ValueError(f"--select: only --method cmcr trains epochs to choose from (got --method {args.method})")
    run = RunFolder(args.out, args.restart)
    spaces = [parse_space(t) for t in args.space]
    if len(spaces) != 2:
        raise ValueError(f"--method {args.method} connects exactly two spaces: give --space twice (got {len(spaces)})")
    check_overlap(spaces[0], spaces[1], args.overlap)
    if run.out.is_dir() and any(run.out.iterdir()) and not args.restart:
        raise ValueError(f"--out {run.out}: already holds a run; choose another --out or pass --restart to replace it")
    model = getattr(baselines, TRAINING_FREE[args.method])().fit(spaces[0], spaces[1], args.overlap)
    for stale in ("config.yaml", "history.json"):  # a replaced trained run: the folder describes the new model only
        (run.out / stale).unlink(missing_ok=True)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    model.save(run.out / "model")
    print(f"saved {run.out / 'model'}  ({args.method}: {spaces[1].name} -> {spaces[0].name} through {args.overlap})")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from pairfree.connect import CMCR, CMCRConfig

    if args.method != "cmcr":
        return _fit_training_free(args)
    config = resolve_config(CMCRConfig, args, args.config)
    run = RunFolder(args.out, args.restart)
    spaces = [parse_space(t) for t in args.space]
    if len(spaces) != 2:
        raise ValueError(f"C-MCR connects exactly two spaces: give --space twice (got {len(spaces)})")
    _set_threads(args)
    model = CMCR(config)
    from pairfree.space import check_overlap

    check_overlap(spaces[0], spaces[1], args.overlap)
    x, y, monitor = spaces[0], spaces[1], None
    if args.select:  # hold rows out of training for the label-free score (pairfree.selection)
        from pairfree.selection import Scorer, split_holdout

        x, y, held = split_holdout(x, y, args.overlap, fraction=args.holdout, seed=config.seed)
        monitor = Scorer(x, y, args.overlap, held)
    run.check_model(model.run_key(x, y, args.overlap))
    model.fit(x, y, args.overlap, run_dir=run.checkpoints, cache_dir=args.cache_dir,
              progress=not args.quiet, restart=args.restart, on_start=run.starter(config, _header(args, "fit")),
              monitor=monitor, select=args.select)
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
    sources = [x for x in (args.model, args.pretrained, args.release) if x]
    if len(sources) != 1:
        raise ValueError("give exactly one of --model (a saved model or run folder), --pretrained (a folder or Hub "
                         "repo written by save_pretrained / pairfree push) or --release (an official release)")
    if args.input is not None:  # precomputed embeddings of one space
        if args.inputs or not args.space:
            raise ValueError("--input (precomputed embeddings) needs --space and takes no media INPUTs")
        from pairfree.space import as_array

        model = load_model(args.model) if args.model else _unified(args).model
        Z = model.embed(args.space, args.modality, as_array(Path(args.input), f"--input {args.input}"))
        ids = None
    else:
        if not args.inputs:
            raise ValueError("give media INPUTs (files, folders, a text file) or --input with precomputed embeddings")
        um = _unified(args)
        Z, ids = um.encode(args.modality, [Path(p) for p in args.inputs] if args.modality != "text" else
                           _text_inputs(args.inputs), return_ids=True, progress=not args.quiet)
    save_npy(out, Z)
    msg = f"wrote {out}: {Z.shape[0]} x {Z.shape[1]} unified embeddings"
    if ids is not None:
        ids_file = out.with_suffix(".ids.txt")
        from pairfree.fileio import write_text

        write_text(ids_file, "".join(f"{i}\n" for i in ids))
        msg += f" (row ids in {ids_file})"
    print(msg)
    return 0


def _text_inputs(inputs: list[str]) -> list:
    """Text INPUTs: existing files / folders are read, anything else is a text to embed."""
    return [Path(x) if Path(x).exists() else x for x in inputs]


def _unified(args: argparse.Namespace):
    from pairfree.unified import UnifiedModel

    encoders = {}
    for tok in args.encoder or []:
        space, _, spec = tok.partition("=")
        if not spec:
            raise ValueError(f"--encoder expects SPACE=SPEC (e.g. clip=hf-clip:openai/clip-vit-base-patch32), got {tok!r}")
        encoders[space] = spec
    kw = dict(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    if args.release:
        from pairfree.releases import load_release

        return load_release(args.release, weights_dir=args.weights_dir, profile=args.profile or "official", **kw)
    if args.pretrained:
        return UnifiedModel.from_pretrained(args.pretrained, encoders=encoders or None, weights_dir=args.weights_dir,
                                            profile=args.profile, **kw)
    model = load_model(args.model)
    if not encoders:
        raise ValueError(f"--model {args.model} holds projectors only: name the encoder of each space with "
                         "--encoder SPACE=SPEC (or save a unified model with save_pretrained and use --pretrained)")
    return UnifiedModel(model, encoders, profile=args.profile or "default", **kw)


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
    p.add_argument("--method", default="cmcr", choices=["cmcr", *TRAINING_FREE],
                   help="cmcr (default), or a training-free map: relative (relative representations / ASIF, "
                        "the strongest on the toy worlds, docs/methods.md), procrustes, centred, ridge")
    _add_run_flags(p, CMCRConfig, "aggregate", "memory-aggregation cache")
    p.add_argument("--select", choices=["overlap", "pseudo", "anchored"],
                   help="hold out --holdout of the overlap rows and of the other modality, log that label-free "
                        "score every epoch and keep the best epoch (pairfree.selection)")
    p.add_argument("--holdout", type=float, default=0.05)
    p.set_defaults(func=cmd_fit)

    from pairfree.extend import ExMCRConfig

    x = sub.add_parser("extend", help="train Ex-MCR: extend a frozen base space with leaf spaces",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("--base", nargs="+", required=True, metavar="TOKEN", help="NAME MODALITY=PATH ...: the frozen base")
    x.add_argument("--leaf", nargs="+", action="append", required=True, metavar="TOKEN",
                   help="NAME[:OVERLAP] MODALITY=PATH ...; once per leaf (OVERLAP inferred when unambiguous)")
    _add_run_flags(x, ExMCRConfig, "pool", "pseudo-data pool cache")
    x.set_defaults(func=cmd_extend)

    e = sub.add_parser("embed", help="embed raw media (or precomputed embeddings) into a unified space",
                       description=EMBED_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("inputs", nargs="*", metavar="INPUT", help="media files, folders, text files (or texts, for text)")
    src = e.add_argument_group("the unified space (one of)")
    src.add_argument("--model", help="a saved model or run folder (with --encoder for raw media)")
    src.add_argument("--pretrained", help="a folder or Hub repo written by save_pretrained / pairfree push")
    src.add_argument("--release", help=f"an official release: {', '.join(RELEASE_NAMES)}")
    e.add_argument("--modality", required=True, choices=["image", "text", "audio", "3d"])
    e.add_argument("--output", required=True, help=".npy to write (row ids beside it as .ids.txt for media)")
    e.add_argument("--encoder", action="append", metavar="SPACE=SPEC", help="encoder of a space, e.g. "
                   "clip=hf-clip:openai/clip-vit-base-patch32 (overrides a saved one)")
    e.add_argument("--weights-dir", help="folder holding release files under their official names "
                   "(also $PAIRFREE_WEIGHTS)")
    e.add_argument("--profile", choices=["default", "official"],
                   help="preprocessing (default: official for --release, else the saved or default one)")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="encoder dtype")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--space", help="with --input: the pretrained space the embeddings come from")
    e.add_argument("--input", help="precomputed (n, dim) embeddings of --space: .npy, .npz or a store")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_embed)

    p = sub.add_parser("push", help="upload a unified model folder (save_pretrained) to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("repo_id", help="user/name")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    r = sub.add_parser("releases", help="list the official releases, their files and licences")
    r.set_defaults(func=cmd_releases)


EMBED_DOC = """Embed into a unified space.

    pairfree embed --release ex-mcr/base --modality audio clips/ --output z.npy [--weights-dir W]
    pairfree embed --pretrained user/repo --modality text "a dog barking" prompts.txt --output t.npy
    pairfree embed --model runs/x --encoder clip=hf-clip:openai/clip-vit-base-patch32 --modality image photos/ --output v.npy
    pairfree embed --model runs/x --space clap --modality audio --input A.npy --output z.npy   (precomputed)
"""
RELEASE_NAMES = ("c-mcr/clap-clip", "c-mcr/ulip-clip", "ex-mcr/base")


def cmd_push(args: argparse.Namespace) -> int:
    from pairfree.hub import push_folder

    url = push_folder(args.folder, args.repo_id, private=args.private)
    print(f"pushed {args.folder} to {url}")
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    from pairfree.releases import RELEASES

    for rel in RELEASES.values():
        print(f"{rel.name}: {rel.description}\n  {rel.paper}")
        for wf in rel.projectors.values():
            print(f"  projector {wf.name}: {wf.source} (git object {wf.git_blob}), licence {wf.licence}")
        for space, src in rel.encoders.items():
            where = src.file.source if src.file else f"huggingface.co/{src.hub_folder}"
            name = src.file.name if src.file else src.hub_folder
            print(f"  encoder {space}: {src.kind} {name} from {where}, licence {src.licence}")
    return 0
