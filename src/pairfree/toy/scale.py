"""The paper-scale world: the papers' corpus sizes at d = 512, written in bounded memory.

`python -m pairfree.toy.scale --preset paper --out DIR` writes, as float16 `.npy` (memory-mapped by
every reader, the storage type of clip-retrieval's stores):

    clip/text.npy  clap/text.npy    2.31M texts, one raw text per row in both (rows aligned)
    clip/image.npy ulip/image.npy   1.3M images, aligned likewise
    clap/audio.npy                  1.8M audio clips
    ulip/3d.npy                     0.8M point clouds
    test/*.npy                      held-out items rendered in every space and modality (ground truth)
    labels/*.npy                    primary concept per row (diagnostics only, never for training)
    world.json                      config, sizes, build time, realism statistics

What it keeps of real embedding spaces: a long-tailed concept hierarchy (topics -> concepts -> items,
Zipf popularity, so popular concepts have thousands of near neighbours and rare ones a handful);
uneven coverage per modality (audio favours sound-bearing concepts, 3D object-like ones; some
concepts have no audio or no 3D at all); items mixing two concepts; a low intrinsic dimension (128
latent + 64 per-item raw detail dimensions seen through nonlinear towers) in 512 ambient dimensions;
the cone effect and the modality gap (a space-wide mean direction plus one offset per modality, set
so the within-modality mean cosine and the matched cross-modal cosine are near what Liang et al.
2022, "Mind the Gap", and CLIPScore report for CLIP: ~0.5 and ~0.3); two text towers that see the
same raw text through different nonlinear maps (related, not a rotation of each other).
What it does not keep: the towers are random fixed networks, not trained contrastively (training six
towers on 10M items is not possible on 2 cores), so the cross-modal alignment inside a space comes
from the shared latent, not from learning; semantics beyond the latent hierarchy; real duplicates.
The toy world (`pairfree.toy.world`) has trained towers at small scale; this one is for measuring
cost and the accuracy of approximations (top-k, IVF) at the papers' sizes, where what matters is the
neighbour structure, which `realism()` reports.

Every chunk of 65,536 rows is generated from its own seeded stream, so the content does not depend
on memory limits, a crash and resume regenerates only unfinished files, and a world built twice is
bit-identical.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pairfree.fileio import write_json
from pairfree.toy.concepts import rng_for

FORMAT_VERSION = 1
CHUNK = 65536
DIM = 512
#: corpus -> the (space, modality) arrays that encode it, rows aligned (same raw items)
CORPORA = {"text": ("clip/text", "clap/text"), "image": ("clip/image", "ulip/image"),
           "audio": ("clap/audio",), "3d": ("ulip/3d",)}
SPACES = {"clip": ("image", "text"), "clap": ("text", "audio"), "ulip": ("image", "3d")}
PRESETS: dict[str, dict[str, int]] = {
    "paper": {"text": 2_310_000, "image": 1_300_000, "audio": 1_800_000, "3d": 800_000, "test": 5000,
              "n_concepts": 50_000, "n_topics": 2_000},
    # the same world at 1/50 of the rows (concept counts scaled too, so neighbourhoods keep their size)
    "mini": {"text": 46_200, "image": 26_000, "audio": 36_000, "3d": 16_000, "test": 1000,
             "n_concepts": 1_000, "n_topics": 40},
}


@dataclass(frozen=True)
class ScaleWorldConfig:
    preset: str = "paper"
    seed: int = 0
    d_latent: int = 128
    d_raw: int = 64  # per-item raw detail (wording, framing, recording) that the towers of one raw item share
    hidden: int = 1024
    zipf: float = 1.0
    topic_scale: float = 1.0
    concept_scale: float = 0.7
    item_scale: float = 0.55
    p_secondary: float = 0.3
    # mean norms of a tower's parts, relative to the space's shared semantic map (norm 1); see realism()
    distort: float = 1.0  # modality-specific map of the latent (image and text of one space differ in shape)
    detail: dict[str, float] = field(default_factory=lambda: {"text": 1.0, "image": 1.2, "audio": 1.3, "3d": 1.2})
    cone: float = 1.0  # the space-wide mean direction (cone effect)
    gap: float = 1.5  # each modality's own offset (modality gap)
    sizes: dict[str, int] | None = None  # override the preset's counts

    def resolved_sizes(self) -> dict[str, int]:
        if self.preset not in PRESETS:
            raise ValueError(f"ScaleWorldConfig.preset: unknown {self.preset!r}; choose from {sorted(PRESETS)}")
        return {**PRESETS[self.preset], **(self.sizes or {})}

    def key(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, **asdict(self), "sizes": self.resolved_sizes()}


# ---- the latent world ------------------------------------------------------------------------------------
class Latent:
    """Topics, concepts, per-modality concept distributions and the fixed tower weights."""

    def __init__(self, cfg: ScaleWorldConfig):
        self.cfg = cfg
        sizes = cfg.resolved_sizes()
        rng = rng_for(cfg.seed, "scale/concepts")
        k, t, d = sizes["n_concepts"], sizes["n_topics"], cfg.d_latent
        topics = rng.normal(size=(t, d)) * cfg.topic_scale
        self.topic = rng.integers(0, t, size=k)
        self.mu = (topics[self.topic] + cfg.concept_scale * rng.normal(size=(k, d))).astype(np.float32)
        pop = (1.0 + rng.permutation(k)) ** -cfg.zipf
        sound, shape = self._trait(rng), self._trait(rng)
        silent = sound < np.quantile(sound, 0.04)
        shapeless = shape < np.quantile(shape, 0.04)
        self.probs = {
            "text": _norm(pop**0.8),
            "image": _norm(0.7 / k + 0.3 * pop / pop.sum()),
            "audio": _norm(pop**0.5 * sound**1.5 * ~silent),
            "3d": _norm(shape * ~shapeless),
            "test": _norm(np.ones(k) * ~silent * ~shapeless),
        }
        order = np.argsort(self.topic, kind="stable")
        self.members, self.member_start = order, np.searchsorted(self.topic[order], np.arange(t + 1))
        self.towers = {key: self._tower(key) for space, mods in SPACES.items() for key in (f"{space}/{m}" for m in mods)}

    def _trait(self, rng: np.random.Generator) -> np.ndarray:
        score = (self.mu - self.mu.mean(0)) @ rng.normal(size=self.mu.shape[1])
        return 1.0 / (1.0 + np.exp(-1.5 * score / (score.std() + 1e-12)))

    def _tower(self, key: str) -> dict[str, torch.Tensor]:
        """One (space, modality) tower: the space's shared nonlinear map, a modality-specific linear part,
        a raw-detail map, and the offsets (cone + gap). Scales are set so each part has unit mean norm."""
        cfg = self.cfg
        space, modality = key.split("/")
        g = torch.Generator().manual_seed(int(rng_for(cfg.seed, f"scale/space/{space}").integers(2**62)))
        w1 = torch.randn(cfg.d_latent, cfg.hidden, generator=g) / math.sqrt(cfg.d_latent)
        b1 = 0.5 * torch.randn(cfg.hidden, generator=g)
        w2 = torch.randn(cfg.hidden, DIM, generator=g) / math.sqrt(cfg.hidden)
        cone = torch.nn.functional.normalize(torch.randn(DIM, generator=g), dim=0) * cfg.cone
        gm = torch.Generator().manual_seed(int(rng_for(cfg.seed, f"scale/tower/{key}").integers(2**62)))
        h = torch.randn(cfg.d_latent, DIM, generator=gm) / math.sqrt(cfg.d_latent)
        r = torch.randn(cfg.d_raw, DIM, generator=gm) / math.sqrt(cfg.d_raw * DIM)  # raw ~ N(0, I): mean norm ~1
        gap = torch.nn.functional.normalize(torch.randn(DIM, generator=gm), dim=0) * cfg.gap
        probe = torch.from_numpy(self.mu[: min(4096, len(self.mu))])
        s_space = torch.tanh(probe @ w1 + b1) @ w2
        w2 = w2 / s_space.norm(dim=1).mean()
        h = h / (probe @ h).norm(dim=1).mean()
        return {"w1": w1, "b1": b1, "w2": w2, "h": h * cfg.distort, "r": r * cfg.detail[modality],
                "offset": cone + gap}

    def items(self, corpus: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(latent views (n, d_latent) float32, primary concepts) of n sampled items of a corpus."""
        cfg = self.cfg
        k = len(self.mu)
        probs = self.probs["test" if corpus == "test" else corpus]
        primary = rng.choice(k, size=n, p=probs)
        # a secondary concept: half the time from the same topic, else from the corpus distribution
        same_topic = rng.random(n) < 0.5
        t = self.topic[primary]
        lo, hi = self.member_start[t], self.member_start[t + 1]
        in_topic = self.members[lo + (rng.random(n) * (hi - lo)).astype(np.int64)]
        secondary = np.where(same_topic, in_topic, rng.choice(k, size=n, p=probs))
        w = np.where((rng.random(n) < cfg.p_secondary) & (secondary != primary), rng.uniform(0.15, 0.4, n), 0.0)
        z = (1 - w)[:, None] * self.mu[primary] + w[:, None] * self.mu[secondary]
        z += cfg.item_scale * rng.normal(size=z.shape)
        return z.astype(np.float32), primary.astype(np.int32)

    def chunk(self, corpus: str, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(latent views, raw detail, primary concepts) of the corpus's i-th chunk of CHUNK rows, drawn
        whole from its own seeded stream (the draws depend on the chunk's size)."""
        rng = _chunk_rng(self.cfg.seed, corpus, i)
        n = min(CHUNK, self.cfg.resolved_sizes()[corpus] - i * CHUNK)
        z, primary = self.items(corpus, n, rng)
        raw = rng.normal(size=(n, self.cfg.d_raw)).astype(np.float32)  # one raw item, seen by every tower
        return z, raw, primary

    def encode(self, key: str, z: np.ndarray, raw: np.ndarray) -> np.ndarray:
        return self.encode_tensor(key, torch.from_numpy(z), torch.from_numpy(raw)).numpy()

    def encode_tensor(self, key: str, z: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """`encode` on z's device (a GPU regenerates the world's rows instead of reading 9.5 GB)."""
        t = {name: w.to(z.device) for name, w in self.towers[key].items()}
        e = torch.tanh(z @ t["w1"] + t["b1"]) @ t["w2"] + z @ t["h"] + raw @ t["r"] + t["offset"]
        return torch.nn.functional.normalize(e, dim=1)


def _norm(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return p / p.sum()


# ---- writing ------------------------------------------------------------------------------------------------
def _chunk_rng(seed: int, corpus: str, i: int) -> np.random.Generator:
    return rng_for(seed, f"scale/items/{corpus}/{i}")


def _write_corpus(latent: Latent, out: Path, corpus: str, n: int, progress) -> None:
    keys = CORPORA[corpus]
    finals = [out / f"{k}.npy" for k in keys] + [out / "labels" / f"{corpus}.npy"]
    if all(_complete(f, n) for f in finals):
        return
    partials = [f.with_name(f.name + ".partial") for f in finals]
    for p in partials:
        p.parent.mkdir(parents=True, exist_ok=True)
    arrays = [np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(n, DIM)) for p in partials[:-1]]
    labels = np.lib.format.open_memmap(partials[-1], mode="w+", dtype=np.int32, shape=(n,))
    for i, s in enumerate(range(0, n, CHUNK)):
        z, raw, primary = latent.chunk(corpus, i)
        m = len(z)
        for key, arr in zip(keys, arrays):
            arr[s : s + m] = latent.encode(key, z, raw)
        labels[s : s + m] = primary
        progress.update(m)
    for a in (*arrays, labels):
        a.flush()
    del arrays, labels
    for p, f in zip(partials, finals):
        p.replace(f)


def _complete(path: Path, n: int) -> bool:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return a.shape[0] == n


def _write_test(latent: Latent, out: Path, n: int) -> None:
    """Held-out items rendered in every space and modality: row i is the same item everywhere. Each
    modality sees its own raw detail (a photo and a recording of one event differ), the towers of one
    modality share it (the same image in CLIP and ULIP)."""
    rng = rng_for(latent.cfg.seed, "scale/test")
    z, primary = latent.items("test", n, rng)
    folder = out / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for corpus, keys in CORPORA.items():
        raw = rng.normal(size=(n, latent.cfg.d_raw)).astype(np.float32)
        for key in keys:
            np.save(folder / f"{key.replace('/', '_')}.npy", latent.encode(key, z, raw).astype(np.float32))
    np.save(folder / "labels.npy", primary)


def build(out: str | Path, cfg: ScaleWorldConfig | None = None, *, progress: bool = True,
          stats: bool = True) -> Path:
    """Write the world under `out` (resumable: finished files are kept) and return the folder."""
    from pairfree.progress import progress as progress_bar

    cfg = cfg or ScaleWorldConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "world.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("config") != cfg.key():
            raise ValueError(f"{out} holds another scale world (world.json config differs); use a new folder")
        if meta.get("complete"):
            return out
    sizes = cfg.resolved_sizes()
    write_json(meta_path, {"config": cfg.key(), "complete": False})
    t0 = time.perf_counter()
    latent = Latent(cfg)
    total = sum(sizes[c] for c in CORPORA)
    bar = progress_bar(total, "scale world", progress, unit="item")
    for corpus in CORPORA:
        _write_corpus(latent, out, corpus, sizes[corpus], bar)
    bar.close()
    _write_test(latent, out, sizes["test"])
    meta = {"config": cfg.key(), "complete": True, "sizes": sizes, "dim": DIM, "dtype": "float16",
            "build_seconds": round(time.perf_counter() - t0, 1)}
    if stats:
        meta["realism"] = realism(out)
    write_json(meta_path, meta)
    return out


# ---- reading -----------------------------------------------------------------------------------------------
def load(folder: str | Path) -> dict[str, Any]:
    """{"spaces": {name: Space}, "test": {"clip/image": array, ...}, "labels": ..., "info": world.json}."""
    from pairfree.space import Space

    folder = Path(folder)
    info = json.loads((folder / "world.json").read_text())
    if not info.get("complete"):
        raise ValueError(f"{folder}: the scale world is incomplete; run its build again to finish it")
    spaces = {s: Space(s, {m: folder / s / f"{m}.npy" for m in mods}) for s, mods in SPACES.items()}
    test = {key: np.load(folder / "test" / f"{key.replace('/', '_')}.npy") for keys in CORPORA.values() for key in keys}
    return {"spaces": spaces, "test": test, "test_labels": np.load(folder / "test" / "labels.npy"), "info": info}


def realism(folder: str | Path, sample: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Statistics to compare with real embeddings, on `sample` rows (neighbours against the full arrays).

    Per array: mean cosine between random rows (cone), participation ratio of the spectrum (effective
    dimension), nearest-neighbour cosines at ranks 1 / 10 / 100 against the whole array, the share of
    the 10 nearest that have the query's primary concept, and the effective number of neighbours of the
    aggregation softmax at τ = 0.01 (exp of its entropy). Per space: matched vs random cross-modal cosine
    and R@1 on the test items. Overlap: how far the two towers of one modality are from a rotation.
    """
    from pairfree.toy.realism import map_fits, pair_stats

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"arrays": {}, "spaces": {}, "overlap": {}, "cross_modal_softmax": {}}
    for corpus, keys in CORPORA.items():
        labels = np.load(folder / "labels" / f"{corpus}.npy", mmap_mode="r")
        for key in keys:
            a = np.load(folder / f"{key}.npy", mmap_mode="r")
            idx = np.sort(rng.choice(len(a), min(sample, len(a)), replace=False))
            x = np.asarray(a[idx], dtype=np.float32)
            cov = np.cov(x.T)
            ev = np.clip(np.linalg.eigvalsh(cov), 0, None)
            nn = _neighbours(x, a, 100, exclude=idx)
            top = nn["index"][:, :10]
            out["arrays"][key] = {
                "rows": len(a), "random_pair_cosine": float(((x @ x.T).sum() - len(x)) / (len(x) ** 2 - len(x))),
                "effective_dim": float(ev.sum() ** 2 / (ev**2).sum()),
                "nn_cosine": {str(r): float(nn["score"][:, r - 1].mean()) for r in (1, 10, 100)},
                "top10_same_concept": float((np.asarray(labels)[top] == np.asarray(labels)[idx][:, None]).mean()),
                "softmax_effective_neighbours": nn["effective"],
            }
    test = {k: np.load(folder / "test" / f"{k.replace('/', '_')}.npy") for ks in CORPORA.values() for k in ks}
    labels = np.load(folder / "test" / "labels.npy")
    for space, (m1, m2) in SPACES.items():
        st = pair_stats(test[f"{space}/{m1}"], test[f"{space}/{m2}"], labels)
        out["spaces"][space] = {"modalities": [m1, m2], **{k: st[k] for k in (
            "matched_cosine", "random_pair_cosine", "centroid_gap_l2", "r1_a_to_b", "r1_b_to_a", "r1_chance")}}
    for corpus in ("text", "image"):
        k1, k2 = CORPORA[corpus]
        a1, a2 = (np.load(folder / f"{k}.npy", mmap_mode="r") for k in (k1, k2))
        fit = np.sort(rng.choice(len(a1), min(20000, len(a1)), replace=False))
        fits = map_fits(np.asarray(a1[fit], np.float32), np.asarray(a2[fit], np.float32), test[k1], test[k2])
        out["overlap"][f"{k1}~{k2}"] = {k: fits[k] for k in ("procrustes_residual", "linear_r2")}
    # the hops the methods run: overlap texts against the other modality of their space
    for q_key, m_key in (("clip/text", "clip/image"), ("clap/text", "clap/audio"), ("ulip/image", "ulip/3d")):
        q = np.load(folder / f"{q_key}.npy", mmap_mode="r")
        qi = np.sort(rng.choice(len(q), min(sample, len(q)), replace=False))
        nn = _neighbours(np.asarray(q[qi], np.float32), np.load(folder / f"{m_key}.npy", mmap_mode="r"), 10)
        out["cross_modal_softmax"][f"{q_key}->{m_key}"] = {"nn_cosine_1": float(nn["score"][:, 0].mean()),
                                                           "effective_neighbours": nn["effective"]}
    return out


def _neighbours(q: np.ndarray, memory, k: int, exclude: np.ndarray | None = None, tau: float = 0.01,
                chunk: int = 32768) -> dict[str, Any]:
    """Exact top-k of unit rows q against a (memory-mapped) array, and the softmax's effective size
    exp(entropy), accumulated online over memory chunks (entropy = log Z - E_p[logit])."""
    qt = torch.from_numpy(q)
    best_s = torch.full((len(q), 0), -math.inf)
    best_i = torch.zeros((len(q), 0), dtype=torch.long)
    row_max = torch.full((len(q),), -math.inf)
    z = torch.zeros(len(q), dtype=torch.float64)  # Σ e^(l - max)
    zl = torch.zeros(len(q), dtype=torch.float64)  # Σ e^(l - max) · l
    for s in range(0, len(memory), chunk):
        sc = qt @ torch.from_numpy(np.asarray(memory[s : s + chunk], dtype=np.float32)).T
        if exclude is not None:  # a sample row is not its own neighbour
            rows = np.nonzero((exclude >= s) & (exclude < s + sc.shape[1]))[0]
            sc[torch.from_numpy(rows), torch.from_numpy(exclude[rows] - s)] = -math.inf
        cs, ci = sc.topk(min(k, sc.shape[1]), dim=1)
        best_s, pos = torch.cat([best_s, cs], 1).topk(min(k, best_s.shape[1] + cs.shape[1]), dim=1)
        best_i = torch.cat([best_i, ci + s], 1).gather(1, pos)
        logits = sc.div_(tau)
        new_max = torch.maximum(row_max, logits.amax(1))
        scale = torch.exp(row_max - new_max).double()
        w = torch.exp(logits - new_max[:, None])
        z = z * scale + w.sum(1, dtype=torch.float64)
        zl = zl * scale + (w * logits.nan_to_num(0.0, neginf=0.0)).sum(1, dtype=torch.float64)
        row_max = new_max
    entropy = torch.log(z) + row_max.double() - zl / z
    return {"score": best_s.numpy(), "index": best_i.numpy(), "effective": float(torch.exp(entropy).mean())}


def main(argv: list[str] | None = None) -> None:
    """`python -m pairfree.toy.scale --preset paper --out DIR`: build (or finish) a scale world."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pairfree.toy.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="world folder (resumed if a build there was interrupted)")
    args = ap.parse_args(argv)
    folder = build(args.out, ScaleWorldConfig(preset=args.preset, seed=args.seed))
    print(json.dumps(json.loads((folder / "world.json").read_text()).get("sizes"), indent=1))


if __name__ == "__main__":
    main()
