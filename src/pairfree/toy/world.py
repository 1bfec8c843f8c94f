"""Build (or load from cache) the toy world: three really trained spaces, memories, test and class prompts.

Pipeline: concepts -> fixed renderers -> per-space pretraining pairs -> InfoNCE-trained towers ->
memories (unpaired corpora; the overlap corpora encoded by both spaces that share them) -> held-out
paired test / train_pairs -> prompt-template class embeddings -> realism statistics.
"""

from __future__ import annotations

import json
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pairfree.fileio import atomic_path, write_json
from pairfree.space import Space
from pairfree.toy import concepts as C
from pairfree.toy import realism
from pairfree.toy.config import FORMAT_VERSION, SPACE_MODALITIES, ToyWorldConfig
from pairfree.toy.render import MODALITIES, Renderer, make_renderer

#: test / train_pairs keys: which space encodes which raw modality of the same item
PAIRED_KEYS = ("clip/image", "clip/text", "clap/text", "clap/audio", "ulip/image", "ulip/3d")


@dataclass
class ToyWorld:
    """A built toy world. `spaces` are what a pair-free method may use; `test` is ground truth."""

    spaces: dict[str, Space]
    test: dict[str, np.ndarray]
    train_pairs: dict[str, np.ndarray]
    classes: dict[str, Any]
    info: dict[str, Any]
    config: ToyWorldConfig
    memory_labels: dict[str, np.ndarray]  # primary concept per memory row; diagnostics only, never for training
    towers: dict[str, dict[str, np.ndarray]]  # "space/modality" -> state dict, so new raw data can be encoded
    raw: dict[str, np.ndarray] | None = None  # fresh build only (not cached): "memory/text", "test/image", ...

    def renderers(self) -> "Renderers":
        """Regenerates any raw corpus of this world (e.g. to write it as media files)."""
        return Renderers(self.config)

    def encode(self, key: str, raw: np.ndarray) -> np.ndarray:
        """Embed raw vectors with one trained tower, e.g. `encode("clap/text", raw)`."""
        from pairfree.toy.towers import encode, make_tower

        p = self.config.resolved()
        space, modality = key.split("/")
        if key not in self.towers:
            raise KeyError(f"toy world has no tower {key!r}; it has {sorted(self.towers)}")
        tower = make_tower(p["towers"][key], p["raw_dim"][modality], p["space_dim"][space], 0)
        import torch

        tower.load_state_dict({k: torch.from_numpy(v) for k, v in self.towers[key].items()})
        return encode(tower.eval(), np.asarray(raw, dtype=np.float32))


def _render(c: C.Concepts, items: C.Items, r: Renderer, rng: np.random.Generator) -> np.ndarray:
    drop = rng.random(len(items)) < r.p_drop
    z = C.view(c, items, r.visible, drop)
    return r(z, r.nuisance(len(items), rng), rng)


def _tower_seed(seed: int, key: str) -> int:
    return int(C.rng_for(seed, f"tower/{key}").integers(2**31 - 1))


class Renderers:
    """The world's raw data, regenerated on demand: concepts, corpus distributions and renderers
    depend only on the config, so any corpus can be rendered again without the trained towers."""

    def __init__(self, cfg: ToyWorldConfig):
        self.p, self.seed = cfg.resolved(), cfg.seed
        self.concepts = C.make_concepts(self.p, self.seed)
        self.dists = C.distributions(self.concepts, self.p.get("clap_pretrain_like_clip", 0.0))
        self.renderers = {m: make_renderer(m, self.p, self.seed) for m in MODALITIES}

    def corpus(self, tag: str, dist: str, n: int, modalities: tuple[str, ...]) -> tuple[C.Items, dict[str, np.ndarray]]:
        con, seed = self.concepts, self.seed
        items = C.sample_items(con, self.dists[dist], n, self.p, C.rng_for(seed, f"{tag}/items"))
        return items, {m: _render(con, items, self.renderers[m], C.rng_for(seed, f"{tag}/{m}")) for m in modalities}

    def split(self, name: str) -> tuple[C.Items, dict[str, np.ndarray]]:
        """A split's items and raw vectors: "memory/<modality>", "test" or "train_pairs"."""
        if name.startswith("memory/"):
            m = name.split("/", 1)[1]
            return self.corpus(name, name, self.p[f"n_{m}"], (m,))
        if name in ("test", "train_pairs"):
            return self.corpus(name, name, self.p[f"n_{name}"], MODALITIES)
        raise ValueError(f"unknown toy-world split {name!r}; memory/<modality>, test or train_pairs")

    def prompts(self) -> np.ndarray:
        """(n_concepts * n_templates, raw text dim): each concept's pure latent under each fixed template."""
        r, con, k = self.renderers["text"], self.concepts, self.p["n_templates"]
        z = np.repeat(con.mu, k, axis=0)
        nuis = np.tile(r.templates * r.nuisance_scale, (con.n, 1))
        return r(z, nuis, C.rng_for(self.seed, "classes/text"))


def _build(cfg: ToyWorldConfig, progress: bool) -> ToyWorld:
    from pairfree.toy.towers import encode, make_tower, train_dual

    t0 = time.perf_counter()
    gen = Renderers(cfg)
    p, seed, con = gen.p, gen.seed, gen.concepts
    times: dict[str, float] = {}
    corpus = gen.corpus

    # 1. pretrain each space on its own pairs (its own concept distribution)
    towers, train_stats, pre_labels = {}, {}, {}
    for space, (ma, mb) in SPACE_MODALITIES.items():
        ts = time.perf_counter()
        items, raw = corpus(f"pretrain/{space}", f"pretrain/{space}", p["pretrain_pairs"][space], (ma, mb))
        pre_labels[space] = items.primary
        pair = tuple(
            make_tower(
                p["towers"][f"{space}/{m}"], p["raw_dim"][m], p["space_dim"][space], _tower_seed(seed, f"{space}/{m}")
            )
            for m in (ma, mb)
        )
        train_stats[space] = train_dual(
            pair,
            (raw[ma], raw[mb]),
            p["pretrain_epochs"][space],
            p,
            _tower_seed(seed, f"train/{space}"),
            f"toy: train {space}",
            progress,
        )
        towers[f"{space}/{ma}"], towers[f"{space}/{mb}"] = pair
        times[f"train_{space}"] = time.perf_counter() - ts

    # 2. memories: one raw corpus per modality; overlap corpora are encoded by both spaces that share them
    ts = time.perf_counter()
    raw_all, mem_labels = {}, {}
    for m in MODALITIES:
        items, raw = corpus(f"memory/{m}", f"memory/{m}", p[f"n_{m}"], (m,))
        raw_all[f"memory/{m}"], mem_labels[m] = raw[m], items.primary
    emb = {key: encode(towers[key], raw_all["memory/" + key.split("/")[1]]) for key in PAIRED_KEYS}
    spaces = {s: Space(s, {m: emb[f"{s}/{m}"] for m in ms}) for s, ms in SPACE_MODALITIES.items()}

    # 3. held-out paired items: every modality rendered once from the same item, encoded by every tower for it
    def paired(tag: str, n: int) -> dict[str, np.ndarray]:
        items, raw = corpus(tag, tag, n, MODALITIES)
        raw_all.update({f"{tag}/{m}": x for m, x in raw.items()})
        out = {key: encode(towers[key], raw[key.split("/")[1]]) for key in PAIRED_KEYS}
        out["labels"] = items.primary.astype(np.int64)
        return out

    test, train_pairs = paired("test", p["n_test"]), paired("train_pairs", p["n_train_pairs"])

    # 4. class prompts: pure concept latent x each fixed template nuisance, through both text towers
    k = p["n_templates"]
    raw_cls = gen.prompts()
    raw_all["classes/text"] = raw_cls
    classes: dict[str, Any] = {"names": con.names}
    for key in ("clip/text", "clap/text"):
        classes[key] = encode(towers[key], raw_cls).reshape(con.n, k, -1)
    times["encode"] = time.perf_counter() - ts

    state = {key: {n: v.detach().numpy().copy() for n, v in t.state_dict().items()} for key, t in towers.items()}
    info = _info(cfg, p, spaces, test, classes, train_stats, mem_labels, pre_labels, con)
    times["total"] = time.perf_counter() - t0
    info["build_seconds"] = times
    return ToyWorld(spaces, test, train_pairs, classes, info, cfg, mem_labels, state, raw=raw_all)


def _info(
    cfg: ToyWorldConfig,
    p: dict[str, Any],
    spaces: dict[str, Space],
    test: dict[str, np.ndarray],
    classes: dict[str, Any],
    train_stats: dict[str, dict[str, float]],
    mem_labels: dict[str, np.ndarray],
    pre_labels: dict[str, np.ndarray],
    con: C.Concepts,
) -> dict[str, Any]:
    """Sizes, dims, coverage and realism statistics: everything a reader needs to judge the world."""
    labels = test["labels"]
    per_space = {}
    for s, (ma, mb) in SPACE_MODALITIES.items():
        st = realism.pair_stats(test[f"{s}/{ma}"], test[f"{s}/{mb}"], labels)
        per_space[s] = {"modalities": [ma, mb], **st, **train_stats[s]}
    per_space["clip"]["zero_shot_image_acc"] = realism.zero_shot_accuracy(
        test["clip/image"], classes["clip/text"], labels
    )
    per_space["clap"]["zero_shot_audio_acc"] = realism.zero_shot_accuracy(
        test["clap/audio"], classes["clap/text"], labels
    )
    overlap = {
        "text clip->clap": realism.map_fits(
            spaces["clip"]["text"], spaces["clap"]["text"], test["clip/text"], test["clap/text"]
        ),
        "image clip->ulip": realism.map_fits(
            spaces["clip"]["image"], spaces["ulip"]["image"], test["clip/image"], test["ulip/image"]
        ),
    }
    cov = {f"memory/{m}": realism.coverage(lab, con.n) for m, lab in mem_labels.items()}
    cov.update({f"pretrain/{s}": realism.coverage(lab, con.n) for s, lab in pre_labels.items()})
    return {
        "format_version": FORMAT_VERSION,
        "key": cfg.key(),
        "config": {"seed": cfg.seed, "preset": cfg.preset, "resolved": p},
        "sizes": {
            **{f"{s}/{m}": spaces[s].count(m) for s, ms in SPACE_MODALITIES.items() for m in ms},
            "test": len(labels),
            "train_pairs": int(p["n_train_pairs"]),
            "concepts": con.n,
            "templates": int(p["n_templates"]),
        },
        "dims": {s: spaces[s].dim for s in spaces},
        "silent_concepts": np.flatnonzero(con.silent).tolist(),
        "shapeless_concepts": np.flatnonzero(con.shapeless).tolist(),
        "realism": {"spaces": per_space, "overlap": overlap, "coverage": cov},
    }


# ---- cache -------------------------------------------------------------------------------------


def _cache_paths(cache_dir: str | Path, cfg: ToyWorldConfig, threads: int) -> tuple[Path, Path]:
    # the thread count changes float rounding, so worlds built with different counts are cached apart
    stem = f"toyworld-{cfg.preset}-s{cfg.seed}-{cfg.key()}" + ("" if threads == 1 else f"-t{threads}")
    return Path(cache_dir) / f"{stem}.npz", Path(cache_dir) / f"{stem}.json"


def _save(world: ToyWorld, npz: Path, js: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for s, space in world.spaces.items():
        for m in space.modalities:
            arrays[f"spaces/{s}/{m}"] = space[m]
    arrays.update({f"test/{k}": v for k, v in world.test.items()})
    arrays.update({f"train_pairs/{k}": v for k, v in world.train_pairs.items()})
    arrays.update({f"classes/{k}": v for k, v in world.classes.items() if k != "names"})
    arrays.update({f"memory_labels/{k}": v for k, v in world.memory_labels.items()})
    for key, sd in world.towers.items():
        arrays.update({f"towers/{key}/{n}": v for n, v in sd.items()})
    # a file object, so np.savez does not append ".npz" to the temporary name
    with atomic_path(npz) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    write_json(js, {**world.info, "class_names": world.classes["names"]})  # JSON last: it marks the cache complete


def _load(npz: Path, js: Path, cfg: ToyWorldConfig) -> ToyWorld | None:
    try:
        info = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if info.get("key") != cfg.key() or info.get("format_version") != FORMAT_VERSION:
        return None
    names = info.pop("class_names", None)
    groups: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(npz, allow_pickle=False) as z:
            for name in z.files:
                head, rest = name.split("/", 1)
                groups.setdefault(head, {})[rest] = z[name]
        spaces = {s: Space(s, {m: groups["spaces"][f"{s}/{m}"] for m in ms}) for s, ms in SPACE_MODALITIES.items()}
        towers: dict[str, dict[str, np.ndarray]] = {}
        for name, v in groups["towers"].items():
            s, m, param = name.split("/", 2)
            towers.setdefault(f"{s}/{m}", {})[param] = v
        classes: dict[str, Any] = {"names": names, **groups["classes"]}
        return ToyWorld(
            spaces, groups["test"], groups["train_pairs"], classes, info, cfg, groups["memory_labels"], towers
        )
    except (
        OSError,
        ValueError,
        KeyError,
        EOFError,
        zipfile.BadZipFile,
    ) as e:  # truncated / foreign file: rebuild rather than fail
        warnings.warn(f"toy world cache {npz} is unreadable ({e}); rebuilding", stacklevel=3)
        return None


def make_world(
    config: ToyWorldConfig | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    threads: int = 1,
) -> ToyWorld:
    """Build the toy world for `config` (default: demo preset, seed 0), or load it from `cache_dir`.

    `threads` sets torch's CPU threads during the build (restored afterwards). Results are
    bit-identical on rebuild for a given thread count, but the thread count changes the float
    rounding, so it is fixed (default 1) rather than taken from the machine: the same config then
    gives the same arrays on any core count, and a busy 2-core machine is not oversubscribed.
    """
    import torch

    cfg = config or ToyWorldConfig()
    if cache_dir is not None:
        npz, js = _cache_paths(cache_dir, cfg, threads)
        if npz.exists() and js.exists():
            world = _load(npz, js, cfg)
            if world is not None:
                return world
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        world = _build(cfg, progress)
    finally:
        torch.set_num_threads(previous)
    if cache_dir is not None:
        _save(world, npz, js)
    return world
