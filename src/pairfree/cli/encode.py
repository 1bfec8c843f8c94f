"""`pairfree encode`: media files / texts -> a sharded embedding store (the library: `pairfree.encode`)."""

from __future__ import annotations

import argparse
import os

from pairfree.encode import __doc__ as ENCODE_DOC
from pairfree.encode import encode


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "encode",
        help="embed media files / texts with a pretrained encoder into a sharded embedding store",
        description=ENCODE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folder, file list, text file, .tar shard or media file")
    p.add_argument("--encoder", required=True, help="encoder spec, e.g. hf-clip:openai/clip-vit-base-patch32")
    p.add_argument("--modality", required=True, choices=["image", "text", "audio", "3d"])
    p.add_argument("--out", required=True, help="store folder (created; an existing store is resumed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader workers (local) or encoder actors (ray)")
    p.add_argument("--shard-size", type=int, default=65536, help="rows per committed shard")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float32", help="storage dtype of the embeddings")
    p.add_argument("--model-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the encoder runs in")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--column", help="column / key of the texts in .csv, .tsv, .jsonl, .parquet inputs")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--limit", type=int, help="encode only the first N inputs (in listing order)")
    p.add_argument("--retry-errors", action="store_true", help="retry inputs recorded in errors.jsonl")
    p.add_argument("--profile", choices=["default", "official"], default="default",
                   help="preprocessing: pairfree's (default) or exactly what the official C-MCR / Ex-MCR code "
                        "feeds each encoder (official); see the README's profile table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    res = encode(
        args.inputs, encoder=args.encoder, modality=args.modality, out=args.out, batch_size=args.batch_size,
        workers=args.workers, shard_size=args.shard_size, dtype=args.dtype, device=args.device,
        model_dtype=args.model_dtype, column=args.column, backend=args.backend, limit=args.limit,
        retry_errors=args.retry_errors, progress=not args.quiet, profile=args.profile,
    )
    print(res.summary())
    return 0
