"""`pairfree index`, `pairfree search` and `pairfree serve`: any-to-any search over a unified space.

    pairfree index --pretrained my-space --store clip-image=stores/img --store stores/clap-audio \\
                   --out runs/index [--kind flat|ivf|hnsw|ivfpq] [--metadata meta.csv]
    pairfree search --index runs/index "a dog barking" bark.wav id:photos/003.jpg [--modality image] [-k 10] [--json]
    pairfree serve --index runs/index [--host 127.0.0.1] [--port 8000]
    pairfree serve --demo            # the toy world, built once into the cache, then served

A store is a `pairfree encode` folder or a clip-retrieval `img_emb` / `text_emb` folder; SPACE=
names the pretrained space its embeddings come from when the store does not say. The model a
query is embedded with is the one the index was built with: `search` and `serve` reload it from
where `index` found it (a saved folder, a Hub repo or a release) unless you name it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pairfree.fileio import user_cache_dir


def _model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("the unified model" + ("" if required else " (default: the one the index was built with)"))
    g.add_argument("--pretrained", help="a folder or Hub repo written by save_pretrained / pairfree push")
    g.add_argument("--release", help="an official release (c-mcr/clap-clip, c-mcr/ulip-clip, ex-mcr/base)")
    g.add_argument("--model", help="a saved model folder, with --encoder SPACE=SPEC")
    g.add_argument("--encoder", action="append", metavar="SPACE=SPEC", help="encoder of a space")
    g.add_argument("--weights-dir", help="release files under their official names (also $PAIRFREE_WEIGHTS)")
    g.add_argument("--device", default="cpu")


def _load_unified(args: argparse.Namespace, index_info: dict | None = None):
    """The unified model the flags name, else the one recorded in an index."""
    from pairfree.cli.train import _unified

    if args.pretrained or args.release or args.model:
        ns = argparse.Namespace(model=args.model, pretrained=args.pretrained, release=args.release,
                                encoder=args.encoder, weights_dir=args.weights_dir, profile=None,
                                device=args.device, dtype="float32", batch_size=32)
        um = _unified(ns)
    elif index_info is not None:
        meta = index_info["model"].get("meta", {})
        from pairfree.unified import UnifiedModel

        if meta.get("source"):
            um = UnifiedModel.from_pretrained(meta["source"], weights_dir=args.weights_dir, device=args.device)
        elif meta.get("release"):
            um = UnifiedModel.from_release(meta["release"], weights_dir=args.weights_dir, device=args.device)
        else:
            return None  # queries by id and by embedding still work
    else:
        raise ValueError("name the unified model: --pretrained, --release or --model with --encoder")
    return um


def cmd_index(args: argparse.Namespace) -> int:
    from pairfree.search import build_index

    um = _load_unified(args)
    params: dict[str, Any] = {}
    for key in ("nlist", "M", "pq_m", "refine", "nprobe", "efSearch"):
        value = getattr(args, key.lower(), None)
        if value is not None:
            params[key] = value
    ix = build_index(um, args.store, args.out, kind=args.kind, params=params, metadata=args.metadata,
                     progress=not args.quiet, train_on=args.train_on, target_recall=args.target_recall)
    for m, e in ix.info["modalities"].items():
        extra = f", recall@10 vs exact by query modality {e['recall@10']}" if "recall@10" in e else ""
        print(f"{ix.path}/{m}.index: {e['count']} {m} items, {e['kind']} {e['params']}{extra}")
    return 0


def _parse_query(text: str) -> Any:
    if text.startswith("id:"):
        return {"id": text[3:]}
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError:
            return text
    return Path(text) if Path(text).is_file() else text


def cmd_search(args: argparse.Namespace) -> int:
    from pairfree.search import IndexSet, Searcher, format_table

    index = IndexSet.open(args.index)
    searcher = Searcher(index, _load_unified(args, index.info))
    queries = [_parse_query(q) for q in args.queries]
    if args.queries_file:
        lines = Path(args.queries_file).read_text(encoding="utf-8").splitlines()
        queries += [_parse_query(line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    if not queries:
        raise ValueError("give at least one QUERY (text, a file, id:ITEM) or --queries FILE")
    out = [{"query": str(q), "results": searcher.search(q, args.modality or None, args.k, args.query_modality)}
           for q in queries]
    if args.json:
        json.dump(out, sys.stdout, indent=1, default=str)
        print()
    else:
        for o in out:
            print(f"query: {o['query']}")
            print(format_table(o["results"]))
            print()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pairfree.search import IndexSet, Searcher
    from pairfree.search.service import Service, serve

    if args.demo:
        index_dir, model_dir = demo_assets(args.preset, progress=not args.quiet)
        specs = [f"toy={index_dir}"]
        args.pretrained = args.pretrained or str(model_dir)
    else:
        specs = args.index or []
    if not specs:
        raise ValueError("give --index [NAME=]DIR (several allowed) or --demo")
    searchers = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        index = IndexSet.open(path)
        searchers[name or Path(path).name] = Searcher(index, _load_unified(args, index.info))
    service = Service(searchers, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), timeout_s=args.timeout)
    where = f"http://{args.host}:{args.port}/"
    print(f"serving {', '.join(searchers)} at {where}  (Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: reachable from other machines", file=sys.stderr)
    serve(service, args.host, args.port, log_level="warning" if args.quiet else "info")
    return 0


def demo_assets(preset: str = "small", cache_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, Path]:
    """The toy world as files, an Ex-MCR unified model (clip base; clap, ulip leaves) saved with its
    toy encoders, stores of every memory modality and an index over them; built once, cached."""
    import pairfree as pf
    from pairfree.encode import encode
    from pairfree.search import build_index
    from pairfree.toy import ToyWorldConfig, make_world
    from pairfree.toy.media import write_media

    root = Path(cache_dir or user_cache_dir()) / "search-demo" / preset
    index_dir, model_dir, media = root / "index", root / "model", root / "media"
    if (index_dir / "index.json").is_file() and (model_dir / "unified.json").is_file():
        return index_dir, model_dir
    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    world = make_world(ToyWorldConfig(preset=preset), cache_dir=user_cache_dir("toy"), progress=progress)
    if not (media / "world.json").is_file():
        say(f"writing the {preset} toy world as media files to {media}")
        write_media(world, media, splits=("memory",), progress=progress)
    say("fitting Ex-MCR (base clip; leaves clap via text, ulip via image)")
    model = pf.ExMCR(pf.ExMCRConfig(epochs=12, batch_size=1024)).fit(
        world.spaces["clip"], {"clap": (world.spaces["clap"], "text"), "ulip": (world.spaces["ulip"], "image")},
        progress=progress, cache_dir=user_cache_dir("pool"))
    um = pf.UnifiedModel(model, {s: f"toy:{media}/{s}" for s in ("clip", "clap", "ulip")})
    um.meta["source"] = str(model_dir)
    um.save_pretrained(model_dir, title=f"pairfree toy world ({preset})")
    stores = []
    for space, modality, src in (("clip", "image", "memory/image"), ("clap", "audio", "memory/audio"),
                                 ("ulip", "3d", "memory/3d"), ("clip", "text", "memory/texts.txt")):
        out = root / "stores" / f"{space}-{modality}"
        encode([media / src], encoder=f"toy:{media}/{space}", modality=modality, out=out, progress=progress,
               batch_size=256)
        stores.append(f"{space}={out}")
    build_index(um, stores, index_dir, metadata=media / "metadata.csv", progress=progress)
    return index_dir, model_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    from pairfree.search.index import KINDS

    p = sub.add_parser("index", help="build a search index over a unified space from embedding stores",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", action="append", required=True, metavar="[SPACE=]STORE",
                   help="a pairfree store or a clip-retrieval img_emb/text_emb folder; repeat per store")
    p.add_argument("--out", required=True, help="index folder (written atomically)")
    p.add_argument("--kind", choices=KINDS, default="flat", help="flat = exact inner product (default)")
    p.add_argument("--metadata", help="CSV / parquet with an 'id' column joined onto the rows (captions, ...)")
    p.add_argument("--nlist", type=int, help="IVF lists (ivf, ivfpq)")
    p.add_argument("--m", dest="m", type=int, help="HNSW neighbours per node")
    p.add_argument("--pq-m", type=int, help="PQ sub-quantisers (ivfpq)")
    p.add_argument("--refine", type=int, help="ivfpq: re-rank refine x k candidates exactly (0 = off; default 4)")
    p.add_argument("--nprobe", type=int, help="fixed nprobe instead of calibrating it")
    p.add_argument("--efsearch", type=int, help="fixed HNSW efSearch instead of calibrating it")
    p.add_argument("--train-on", choices=["indexed", "all"], default="indexed",
                   help="train IVF/PQ on the indexed modality only (default) or on every store")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="calibrate nprobe / efSearch until every query modality reaches this recall@10")
    p.add_argument("--quiet", action="store_true")
    _model_flags(p, required=True)
    p.set_defaults(func=cmd_index)

    s = sub.add_parser("search", help="query an index with text, a media file, an id or an embedding",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("queries", nargs="*", metavar="QUERY", help="text, a media file, id:ITEM or a JSON query")
    s.add_argument("--index", required=True)
    s.add_argument("--queries", dest="queries_file", help="a file of queries, one per line")
    s.add_argument("--modality", action="append", help="target modality (repeat; default: all)")
    s.add_argument("--query-modality", help="the modality of file queries when the extension does not tell")
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--json", action="store_true", help="JSON instead of a table")
    _model_flags(s, required=False)
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("serve", help="HTTP search service and web page (FastAPI)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--index", action="append", metavar="[NAME=]DIR", help="an index to serve (repeat)")
    v.add_argument("--demo", action="store_true", help="serve the toy world (built once into the cache)")
    v.add_argument("--preset", default="small", choices=["small", "demo"], help="toy world for --demo")
    v.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-upload-mb", type=float, default=20.0)
    v.add_argument("--timeout", type=float, default=30.0, help="seconds a query may take")
    v.add_argument("--quiet", action="store_true")
    _model_flags(v, required=False)
    v.set_defaults(func=cmd_serve)
