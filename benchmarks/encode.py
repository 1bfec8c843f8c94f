"""Benchmark of the `pairfree encode` pipeline with a tiny CPU encoder.

Measures, in one run on this machine:
  - items/s through the whole pipeline (PNG decode + preprocess + model + store) with 0 and with
    2 DataLoader workers, and the speed-up of 2 workers over 0;
  - the store's share of the time: seconds spent inside the store writer (normalise, float
    conversion, shard + ids files with fsync, sha256, manifest) as a fraction of the encoding time
    (everything else in the run).
Both stores are checked to be identical. Prints a table and writes JSON. Reports ratios measured
in the same run; nothing asserts on absolute times.

    python benchmarks/encode.py [--items 1024] [--image-size 224] [--shard-size 128] [--out runs/bench/encode.json]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_encoder(dim: int):
    import torch

    from pairfree.encoders.base import Encoder

    class TinyImageEncoder(Encoder):
        """Resize to 32x32 + a 3072 -> 512 -> dim MLP: a small but real CPU workload."""

        id = "bench:tiny-image"
        modalities = ("image",)

        def __init__(self):
            super().__init__("cpu", "float32")
            self.dim = dim
            g = torch.Generator().manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(3072, 512), torch.nn.GELU(), torch.nn.Linear(512, dim))
            for p in self.net.parameters():
                p.data = torch.randn(p.shape, generator=g) * 0.02
            self.net.eval()

        def preprocess(self, modality, item):
            a = np.asarray(item.resize((32, 32)), dtype=np.float32) / 255.0
            return torch.from_numpy((a - 0.5).transpose(2, 0, 1).copy())

        def forward(self, modality, batch):
            return self.net(batch.flatten(1))

    return TinyImageEncoder()


def make_images(folder: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = np.roll(base, i, axis=(0, 1)) ^ np.uint8(i % 251)
        Image.fromarray(img).save(folder / f"img{i:05d}.png")


class WriterClock:
    """Accumulates the wall time spent inside StoreWriter methods (patched for the run)."""

    def __init__(self):
        self.seconds = 0.0
        self.depth = 0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            self.depth += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - t

        return timed


def run(items: Path, out: Path, encoder, workers: int, batch_size: int, shard_size: int, limit: int | None = None) -> dict:
    from pairfree import store
    from pairfree.encode import encode

    clock = WriterClock()
    saved = {name: getattr(store.StoreWriter, name) for name in ("__init__", "add", "add_errors", "flush", "finish")}
    for name, fn in saved.items():
        setattr(store.StoreWriter, name, clock.wrap(fn))
    try:
        t = time.perf_counter()
        res = encode([items], encoder=encoder, modality="image", out=out, batch_size=batch_size, workers=workers,
                     shard_size=shard_size, limit=limit, progress=False)
        total = time.perf_counter() - t
    finally:
        for name, fn in saved.items():
            setattr(store.StoreWriter, name, fn)
    return {
        "workers": workers,
        "items": res.encoded,
        "seconds": total,
        "items_per_s": res.encoded / total,
        "store_seconds": clock.seconds,
        "store_fraction_of_encoding": clock.seconds / max(total - clock.seconds, 1e-9),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--out", default="runs/bench/encode.json")
    args = ap.parse_args(argv)

    import torch

    from pairfree.store import EmbeddingStore

    encoder = make_encoder(args.dim)
    with tempfile.TemporaryDirectory(prefix="pairfree-bench-") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", args.items, args.image_size)
        run(tmp / "images", tmp / "warmup", encoder, 0, args.batch_size, args.shard_size, limit=64)  # lazy imports
        rows = [run(tmp / "images", tmp / f"w{w}", encoder, w, args.batch_size, args.shard_size) for w in (0, 2)]
        a, b = EmbeddingStore.open(tmp / "w0"), EmbeddingStore.open(tmp / "w2")
        identical = a.ids == b.ids and bool(np.array_equal(a.array(), b.array()))
    result = {
        "benchmark": "encode",
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "torch_threads": torch.get_num_threads()},
        "settings": vars(args),
        "runs": rows,
        "speedup_2_workers_over_0": rows[1]["items_per_s"] / rows[0]["items_per_s"],
        "store_fraction_of_encoding": rows[0]["store_fraction_of_encoding"],
        "stores_identical": identical,
    }
    print(f"encode benchmark: {args.items} PNG images {args.image_size}px, dim {args.dim}, "
          f"batch {args.batch_size}, shard {args.shard_size} rows, float32 store")
    print(f"{'workers':>8} {'items/s':>10} {'store s':>9} {'store / encoding':>17}")
    for r in rows:
        print(f"{r['workers']:>8} {r['items_per_s']:>10.1f} {r['store_seconds']:>9.3f} {r['store_fraction_of_encoding']:>16.1%}")
    print(f"speed-up of 2 workers over 0: {result['speedup_2_workers_over_0']:.2f}x; stores identical: {identical}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from pairfree.fileio import write_json

    write_json(out, result)
    print(f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
