"""A small searchable toy world shared by the search, service and browser tests: media files of the
small world's test split, stores written by `pairfree encode` with the toy encoders, an Ex-MCR
unified model (clip base; clap, ulip leaves) and a flat index over all four modalities."""

from pathlib import Path

import numpy as np

import pairfree as pf
from pairfree.encode import encode
from pairfree.toy import ToyWorldConfig, make_world
from pairfree.toy.media import write_media

STORES = (("clip", "image", "test/image"), ("clap", "audio", "test/audio"), ("ulip", "3d", "test/3d"),
          ("clip", "text", "test/texts.txt"))


def build(root: Path, cache: Path):
    world = make_world(ToyWorldConfig(seed=0, preset="small"), cache_dir=cache / "toy", progress=False)
    media = write_media(world, root / "media", splits=("test",), progress=False)
    model = pf.ExMCR(pf.ExMCRConfig(epochs=12, batch_size=512)).fit(
        world.spaces["clip"], {"clap": (world.spaces["clap"], "text"), "ulip": (world.spaces["ulip"], "image")},
        progress=False, cache_dir=cache / "pool")
    um = pf.UnifiedModel(model, {s: f"toy:{media}/{s}" for s in ("clip", "clap", "ulip")})
    um.save_pretrained(root / "model")
    um = pf.UnifiedModel.from_pretrained(root / "model")
    stores = []
    for space, modality, src in STORES:
        out = root / "stores" / f"{space}-{modality}"
        encode([media / src], encoder=f"toy:{media}/{space}", modality=modality, out=out, progress=False, batch_size=256)
        stores.append(f"{space}={out}")
    index = pf.search.build_index(um, stores, root / "index", metadata=media / "metadata.csv", progress=False)
    return world, media, um, stores, index


def labels(index, modality: str) -> np.ndarray:
    return np.asarray(index.metadata(modality)["concept"])
