"""Ex-MCR: extend a frozen base space with leaf spaces, without paired data (DESIGN.md §4).

The base space (e.g. CLIP = image, text) stays frozen and *is* the unified space. Each leaf space
(CLAP = audio, text; ULIP-2 = 3d, image) shares one overlap modality with the base (rows aligned
1:1, same raw samples) and gets its own decoupled projector into the base space, trained
independently of the other leaves. Leaf-to-leaf alignment (audio <-> 3d) then emerges through the
base space; nothing is trained on it.

Roles, for a leaf L = (overlap o, leaf non-overlap c) and the base B = (o, base non-overlap b):
memories C^L (e.g. CLAP audio), O^L (CLAP texts), O^B (the same texts in CLIP), N^B (CLIP images).
Every training tuple is (c~, o~L, o~B, n~B) = (a~^A, t~^A, t~^I, v~^I) in the paper's notation.

Various modality-centric pseudo data (`passes`, DESIGN §4.1), one tuple per query:
- "overlap" (paper: text-centric, ablation "T"): o~L = O^L_i, o~B = O^B_i, c~ = agg(o~L, C^L),
  n~B = agg(o~B, N^B).
- "leaf" (audio-centric, "A"): c~ = c_j; w = softmax(c_j·O^Lᵀ/τ1); o~L = norm(w·O^L);
  o~B = norm(w·O^B) (weights carried to the aligned base rows); n~B = agg(o~B, N^B).
- "base" (image-centric, "I"): n~B = b_k; w = softmax(b_k·O^Bᵀ/τ1); o~B = norm(w·O^B);
  o~L = norm(w·O^L); c~ = agg(o~L, C^L).
For ULIP into CLIP the same code runs with overlap = image, c = 3d, b = text. The passes are
concatenated into one pool that the training loop reshuffles every epoch; each pass is cached on
disk (key: fingerprints of the four memories, τ1, aggregation settings and the pass name), so
ablations over pass combinations and reruns reuse it.

Decoupled projector (`DecoupledProjector`, official `Ex_MCR_Head` names): `Head1` = f_l =
Linear(d_leaf, d_leaf), identity-initialised; `Head2` = f_m = `mlp1`, `mlp2` blocks of
[Linear(d, 2d)-BN-ReLU-Linear(2d, d_base)-BN] (MLP2, first block d_leaf -> d_base, the next ones
d_base -> d_base), Xavier-initialised, then L2-normalise. Leaf non-overlap: f_m(f_l(x)); leaf
overlap: f_m(x).

Loss: λ·L_intra + mean of the chosen InfoNCE terms (τ2 = 0.05), with â = f_m(f_l(c~)),
t̂ = f_m(o~L), L_intra = ½·mean ||f_l(c~) − o~L||₂ and the terms named as in the paper's
ablation: "A-T" (â, o~B), "T-T" (t̂, o~B), "A-V" (â, n~B), "T-V" (t̂, n~B); "dense" = all four.
Base-space targets o~B, n~B are used as-is (no projector), with the training noise.

Choices for the points the paper leaves open (all configurable in ExMCRConfig):
- `fl_normalize=False`: no L2 normalisation between f_l and f_m. The released inference code
  (`exmcr_model.py`) feeds Head1's raw output to Head2, so training does the same.
- `stop_grad=False`: f_l also receives the InfoNCE gradients of â (nothing in the paper stops
  them; "decoupled" names the two roles). `stop_grad=True` trains f_l by L_intra only.
- `bn="joint"`: â's and t̂'s inputs share one BatchNorm batch in f_m (as in our C-MCR), so the
  running statistics describe the mixture f_m normalised in training; "separate" runs two batches.
- `intra="l2"`: the plain (not squared) L2 distance printed in the paper; "squared" is MSE-like.
- Aggregated pseudo embeddings are re-normalised after each hop (`normalize_pseudo=True`, DESIGN §2)
  so the second hop queries with unit vectors; noise (variance 0.004, re-normalised, fresh every
  step) is added to all four members of a tuple, as in C-MCR.
- AdamW weight decay 0.01 (torch's default), no warm-up; the same seed initialises every leaf's
  projector, so a leaf's head does not depend on which other leaves are fitted with it.
- Ablation variants: `fl="mlp1"|"mlp2"` makes f_l one or two MLP2 blocks (d_leaf -> 2·d_leaf ->
  d_leaf, Xavier init, the paper's "n-layer MLP" counting f_m's blocks the same way);
  `fm_depth=0` makes f_m a single Linear(d_leaf, d_base), 1-5 stacks that many blocks.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pairfree import losses, train
from pairfree.devices import resolve_device
from pairfree.checkpoint import (CONFIG, WEIGHTS, dim_field, field, linear_shape, materialize, modalities_field, name_field,
                                 read_model, read_official, save_model)
from pairfree.memory import aggregate, as_tensor, load_cached
from pairfree.train import ConcatRows
from pairfree.config import ConfigError, option
from pairfree.projector import BN_MODES, MLP2, init_weights
from pairfree.space import Space, SpaceError, check_overlap, embedding_rows, other_modality

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")

#: modality-centric passes; the paper's ablation letters for CLAP -> CLIP in brackets
PASSES = ("overlap", "leaf", "base")  # T (text-centric), A (audio-centric), I (image-centric)
PASS_LETTERS = {"T": "overlap", "A": "leaf", "I": "base"}
#: dense alignment terms: (projected leaf input, base target)
OBJECTIVES = {"A-T": ("a", "ob"), "T-T": ("t", "ob"), "A-V": ("a", "nb"), "T-V": ("t", "nb")}
FL_KINDS = ("linear", "mlp1", "mlp2")
#: pool roles: c~ (leaf non-overlap), o~L (leaf overlap), o~B (base overlap), n~B (base non-overlap)
ROLES = ("c", "ol", "ob", "nb")
_POOL_VERSION = 1


def _csv(value: Any, known, field: str, aliases: Mapping[str, tuple[str, ...]] | None = None) -> str:
    """Canonical comma-separated list (a list/tuple or 'a,b' string), validated and de-duplicated."""
    items = [str(v).strip() for v in value] if isinstance(value, (list, tuple)) else str(value).split(",")
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        expanded = (aliases or {}).get(item, (item,))
        for e in expanded:
            if e not in known:
                raise ConfigError(f"ExMCRConfig.{field}: unknown entry {item!r}; choose from {sorted(known)}"
                                 + (f" or {sorted(aliases)}" if aliases else ""))
            if e not in out:
                out.append(e)
    if not out:
        raise ConfigError(f"ExMCRConfig.{field}: needs at least one entry, got {value!r}")
    order = list(known)
    return ",".join(sorted(out, key=order.index))


@dataclass
class ExMCRConfig(train.TrainConfig):
    """Paper defaults (DESIGN §4); the open points are documented in the module docstring."""

    tau1: float = option(0.01, gt=0, doc="memory-aggregation softmax temperature")
    noise_variance: float = option(0.004, ge=0, doc="per-dimension variance of the training noise")
    lam: float = option(0.1, ge=0, doc="weight of L_intra")
    temperature: float = option(0.05, gt=0, doc="tau2 of the InfoNCE terms")
    passes: str = option("overlap,leaf,base", doc="modality-centric pseudo data, comma-separated from "
                         f"{list(PASSES)} or the paper's letters T,A,I")
    objectives: str = option("dense", doc=f"comma-separated from {list(OBJECTIVES)}, or dense (all four)")
    fl: str = option("linear", choices=FL_KINDS, doc="f_l: linear (paper) or an MLP")
    fm_depth: int = option(2, ge=0, le=8, doc="f_m: number of MLP2 blocks (paper: 2); 0 = one Linear layer")
    hidden_mult: float = option(2.0, gt=0, le=64, doc="hidden width of every MLP2 block / its input width")
    intra: str = option("l2", choices=("l2", "squared"), doc="L_intra: l2 (as printed) or squared")
    fl_normalize: bool = option(False, doc="L2-normalise f_l's output before f_m")
    stop_grad: bool = option(False, doc="f_m does not back-propagate into f_l")
    bn: str = option("joint", choices=BN_MODES, doc="BatchNorm batch of a-hat's and t-hat's inputs in f_m")
    normalize_pseudo: bool = option(True, doc="re-normalise aggregated embeddings (between hops)")

    def __post_init__(self) -> None:
        for name in ("passes", "objectives"):  # YAML lists ([T, A]) are accepted as well as "T,A"
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                setattr(self, name, ",".join(map(str, value)))
        super().__post_init__()
        self.passes = _csv(self.passes, PASSES, "passes", {k: (v,) for k, v in PASS_LETTERS.items()})
        self.objectives = _csv(self.objectives, tuple(OBJECTIVES), "objectives", {"dense": tuple(OBJECTIVES)})

    @property
    def pass_list(self) -> list[str]:
        return self.passes.split(",")

    @property
    def objective_list(self) -> list[str]:
        return self.objectives.split(",")


# ---- projector ---------------------------------------------------------------------------------
class Blocks(nn.Module):
    """A stack of MLP2 blocks named `mlp1`, `mlp2`, ... (official `Projector` names); 0 blocks = `linear`."""

    def __init__(self, d_in: int, d_out: int, depth: int, hidden_mult: float):
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.linear = nn.Linear(d_in, d_out)
        for i in range(depth):
            d = d_in if i == 0 else d_out
            setattr(self, f"mlp{i + 1}", MLP2(d, d_out, int(round(hidden_mult * d))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return self.linear(x)
        for i in range(self.depth):
            x = getattr(self, f"mlp{i + 1}")(x)
        return x


class DecoupledProjector(nn.Module):
    """Ex-MCR's head for one leaf: `Head1` = f_l (intra-space), `Head2` = f_m (into the base space).

    `forward_fm` returns f_m's pre-normalisation output; `project_*` return unit vectors.
    """

    def __init__(self, d_leaf: int, d_base: int, fl: str = "linear", fm_depth: int = 2, hidden_mult: float = 2.0,
                 fl_normalize: bool = False):
        super().__init__()
        if fl == "linear":
            self.Head1: nn.Module = nn.Linear(d_leaf, d_leaf)
            init_weights(self.Head1, "eye")
            # upstream: eye_ weight, PyTorch-default bias; init_weights zeroes the bias so f_l starts as identity
        else:
            self.Head1 = Blocks(d_leaf, d_leaf, int(fl[-1]), hidden_mult)
            init_weights(self.Head1, "xavier")
        self.Head2 = Blocks(d_leaf, d_base, fm_depth, hidden_mult)
        init_weights(self.Head2, "xavier")
        self.fl_normalize = fl_normalize

    def fl(self, x: torch.Tensor) -> torch.Tensor:
        return self.Head1(x)

    def fm_input(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) if self.fl_normalize else h

    def project_other(self, x: torch.Tensor) -> torch.Tensor:
        """Leaf non-overlap modality: normalize(f_m(f_l(x)))."""
        return F.normalize(self.Head2(self.fm_input(self.Head1(x))), dim=-1)

    def project_overlap(self, x: torch.Tensor) -> torch.Tensor:
        """Leaf overlap modality: normalize(f_m(x))."""
        return F.normalize(self.Head2(x), dim=-1)


# ---- pseudo data ---------------------------------------------------------------------------------
@dataclass
class Roles:
    """The four memories of one leaf extension, named by role."""

    leaf: Space
    base: Space
    overlap: str
    leaf_other: str  # c: leaf non-overlap modality (audio / 3d)
    base_other: str  # b: base non-overlap modality (image / text)

    @classmethod
    def of(cls, base: Space, leaf: Space, overlap: str, leaf_name: str | None = None) -> "Roles":
        who = f"leaf {leaf_name or leaf.name!r}"
        try:
            check_overlap(base, leaf, overlap)
            leaf_other = other_modality(leaf, overlap)
            base_other = other_modality(base, overlap)
        except SpaceError as e:
            raise SpaceError(f"{who}: {e}") from e
        if leaf_other == base_other:
            raise SpaceError(f"{who}: its non-overlap modality {leaf_other!r} is also the base's non-overlap modality; "
                             "a leaf must bring a modality the base does not have")
        return cls(leaf, base, overlap, leaf_other, base_other)

    def memories(self) -> dict[str, np.ndarray]:
        return {"C": self.leaf[self.leaf_other], "OL": self.leaf[self.overlap],
                "OB": self.base[self.overlap], "NB": self.base[self.base_other]}


def _pool_key(roles: Roles, name: str, settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"v": _POOL_VERSION, "pass": name, **settings}, sort_keys=True).encode())
    for s, m in ((roles.leaf, roles.leaf_other), (roles.leaf, roles.overlap), (roles.base, roles.overlap),
                 (roles.base, roles.base_other)):
        h.update(f"{m}:{s.fingerprint(m)}".encode())
    return h.hexdigest()[:24]


def modality_centric_pass(roles: Roles, name: str, *, progress: bool = False, outs: dict | None = None,
                          reports: dict | None = None, **settings) -> dict[str, np.ndarray]:
    """One modality-centric pass: a tuple {c, ol, ob, nb} per query of the pass's modality.

    `settings`: `memory.aggregate` keywords (tau, method, k, normalize, device, dtype, ivf, backend).
    `outs`: arrays to write the computed roles into (memory-mapped files at scale). `reports`
    receives each hop's aggregation report, keyed by the hop."""
    M = roles.memories()
    outs = outs or {}

    def agg(q, keys, values, roles_out, what):
        report: dict = {}
        target = [outs[r] for r in roles_out] if all(r in outs for r in roles_out) else None
        if target is not None and not isinstance(values, list):
            target = target[0]
        res = aggregate(q, keys, values, report=report, out=target,
                        progress=f"{name}-centric {what}" if progress else False, **settings)
        if reports is not None:
            reports[f"{name}: {what}"] = report
        return res

    lo, bo, ov = roles.leaf_other, roles.base_other, roles.overlap
    if name == "overlap":
        return {"c": agg(M["OL"], M["C"], None, ["c"], f"{ov}->{lo}"), "ol": M["OL"], "ob": M["OB"],
                "nb": agg(M["OB"], M["NB"], None, ["nb"], f"{ov}->{bo}")}
    if name == "leaf":
        ol, ob = agg(M["C"], M["OL"], [M["OL"], M["OB"]], ["ol", "ob"], f"{lo}->{ov}")
        return {"c": M["C"], "ol": ol, "ob": ob, "nb": agg(ob, M["NB"], None, ["nb"], f"{ov}->{bo}")}
    if name == "base":
        ob, ol = agg(M["NB"], M["OB"], [M["OB"], M["OL"]], ["ob", "ol"], f"{bo}->{ov}")
        return {"c": agg(ol, M["C"], None, ["c"], f"{ov}->{lo}"), "ol": ol, "ob": ob, "nb": M["NB"]}
    raise ValueError(f"unknown modality-centric pass {name!r}; choose from {PASSES}")


# which roles a pass computes (the others are the memories themselves and are not cached)
_COMPUTED = {"overlap": ("c", "nb"), "leaf": ("ol", "ob", "nb"), "base": ("c", "ol", "ob")}


def cached_pass(cache_dir: str | Path | None, roles: Roles, name: str, *, progress: bool = False,
                reports: dict | None = None, **agg) -> dict[str, np.ndarray]:
    """`modality_centric_pass`, memoised on disk: one folder per (inputs, τ1, settings, pass).

    The computed roles are written block by block into memory-mapped files (float16 when the memories
    are float16) and come back memory-mapped, so a paper-scale pass never has to fit in RAM."""
    if cache_dir is None:
        return modality_centric_pass(roles, name, progress=progress, reports=reports, **agg)
    from pairfree.fileio import atomic_dir
    from pairfree.memory import cache_settings, storage_dtype

    M = roles.memories()
    n = {"overlap": M["OL"], "leaf": M["C"], "base": M["NB"]}[name].shape[0]
    settings = cache_settings(agg, n, max(a.shape[0] for a in M.values()))
    folder = Path(cache_dir) / f"exmcr-pool-{name}-{_pool_key(roles, name, settings)}"
    given = {"overlap": {"ol": M["OL"], "ob": M["OB"]}, "leaf": {"c": M["C"]}, "base": {"nb": M["NB"]}}[name]
    dims = {"c": M["C"].shape[1], "ol": M["OL"].shape[1], "ob": M["OB"].shape[1], "nb": M["NB"].shape[1]}
    dtype = storage_dtype(*M.values())
    cached = {r: load_cached(folder / f"{r}.npy", (n, dims[r]), dtype) for r in _COMPUTED[name]}
    if all(a is not None for a in cached.values()):
        if reports is not None:
            try:
                reports.update(json.loads((folder / "meta.json").read_text()).get("aggregation", {}))
            except (OSError, ValueError):
                pass
        return {**given, **cached}
    hops: dict = {}
    with atomic_dir(folder) as tmp:
        outs = {r: np.lib.format.open_memmap(tmp / f"{r}.npy", mode="w+", dtype=dtype, shape=(n, dims[r]))
                for r in _COMPUTED[name]}
        modality_centric_pass(roles, name, progress=progress, outs=outs, reports=hops, **agg)
        for a in outs.values():
            a.flush()
        del outs
        (tmp / "meta.json").write_text(json.dumps({"pass": name, **settings, "leaf": roles.leaf.name,
                                                   "base": roles.base.name, "overlap": roles.overlap,
                                                   "aggregation": hops}) + "\n")
    if reports is not None:
        reports.update(hops)
    return {**given, **{r: load_cached(folder / f"{r}.npy", (n, dims[r]), dtype) for r in _COMPUTED[name]}}


# ---- the model ---------------------------------------------------------------------------------
LeafSpec = "tuple[Space, str] | Space"


class ExMCR:
    """A unified space: a frozen base space plus one decoupled projector per leaf space."""

    method = "exmcr"

    def __init__(self, config: ExMCRConfig | None = None):
        self.config = config or ExMCRConfig()
        self.heads: nn.ModuleDict | None = None
        self.base: dict[str, Any] = {}  # {"name", "dim", "modalities"}
        self.leaves: dict[str, dict[str, Any]] = {}  # name -> {"dim", "overlap", "modality", "modalities"}
        self.history: dict[str, list[dict]] = {}
        self.timings: dict[str, float] = {}
        self.aggregation: dict[str, dict] = {}  # leaf -> hop -> aggregation report
        self.fitted_run_key: str | None = None
        self.training_data: dict[str, dict] = {}  # space -> modality -> {"rows", "fingerprint"}

    # ---- building ----------------------------------------------------------------------------
    def _head(self, leaf: dict[str, Any]) -> DecoupledProjector:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # same init for a leaf whatever other leaves exist
        return DecoupledProjector(leaf["dim"], self.base["dim"], cfg.fl, cfg.fm_depth, cfg.hidden_mult, cfg.fl_normalize)

    def _build(self, base: dict[str, Any], leaves: dict[str, dict[str, Any]]) -> nn.ModuleDict:
        for name in (base["name"], *leaves):
            if not _NAME.match(name):
                raise ValueError(f"space name {name!r} must use letters, digits, '_' or '-' only")
        if base["name"] in leaves:
            raise ValueError(f"leaf name {base['name']!r} is also the base space's name; names must differ")
        self.base, self.leaves = base, leaves
        self.heads = nn.ModuleDict({name: self._head(leaf) for name, leaf in leaves.items()})
        return self.heads

    @staticmethod
    def _leaf_roles(base: Space, leaves: Mapping[str, Any]) -> dict[str, Roles]:
        if not isinstance(base, Space):
            raise TypeError(f"base must be a pairfree.Space, got {type(base).__name__}")
        if not leaves:
            raise ValueError("ExMCR.fit needs at least one leaf: leaves={'clap': (clap_space, 'text')}")
        out = {}
        for name, spec in leaves.items():
            if isinstance(spec, Space):
                shared = [m for m in spec.modalities if m in base]
                if len(shared) != 1:
                    raise SpaceError(f"leaf {name!r}: cannot infer the overlap modality (shared with base "
                                     f"{base.name!r}: {shared}); pass (space, overlap)")
                spec = (spec, shared[0])
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], Space)):
                raise TypeError(f"leaf {name!r}: expected (Space, overlap_modality), got {spec!r}")
            if not _NAME.match(str(name)):
                raise ValueError(f"leaf name {name!r} must use letters, digits, '_' or '-' only")
            if name == base.name:
                raise ValueError(f"leaf name {name!r} is also the base space's name; names must differ")
            out[name] = Roles.of(base, spec[0], spec[1], name)
        return out

    # ---- training ------------------------------------------------------------------------------
    def pseudo_data(self, roles: Roles, cache_dir: str | Path | None = None, progress: bool = False,
                    reports: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
        """The enabled modality-centric passes for one leaf: pass name -> {c, ol, ob, nb}; `reports`
        receives each aggregation hop's report (method, and for "ivf" its measured accuracy)."""
        cfg = self.config
        return {p: cached_pass(cache_dir, roles, p, normalize=cfg.normalize_pseudo, progress=progress,
                               reports=reports, **cfg.aggregate_kwargs(cache_dir))
                for p in cfg.pass_list}

    def fit(self, base: Space, leaves: Mapping[str, Any], *, run_dir: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: bool = True, restart: bool = False,
            on_start: Callable[[], None] | None = None, monitor: Mapping[str, Callable[[Any], dict]] | None = None,
            select: str | None = None) -> "ExMCR":
        """Train one projector per leaf into the frozen base. leaves: {name: (Space, overlap)}.

        run_dir: per-leaf checkpoints under run_dir/<leaf>/ (resumed if present). cache_dir: the
        pseudo-data pool per pass (reused by any run with the same memories and aggregation settings).
        All leaves, the device and resumable checkpoints are validated before `on_start()` is called
        and before anything is computed or written; `restart=True` ignores earlier checkpoints.
        monitor: {leaf: monitor(model) -> {score: value}} run after every epoch of that leaf (e.g. a
        `pairfree.selection.Scorer` of base and leaf); select: keep each leaf's best epoch by that score.
        """
        roles = self._leaf_roles(base, leaves)
        resolve_device(self.config.device)
        keys = self.run_keys(base, leaves)
        train.start_run({None if run_dir is None else Path(run_dir) / n: k for n, k in keys.items()}, restart, on_start)
        self.fitted_run_key = combined_key(keys)
        self.training_data = {base.name: base.describe(), **{n: r.leaf.describe() for n, r in roles.items()}}
        self._build({"name": base.name, "dim": base.dim, "modalities": list(base.modalities)},
                    {n: {"dim": r.leaf.dim, "overlap": r.overlap, "modality": r.leaf_other,
                         "modalities": [r.overlap, r.leaf_other], "base_modality": r.base_other}
                     for n, r in roles.items()})
        self.history, self.timings, self.aggregation = {}, {}, {}
        for name, r in roles.items():
            self._fit_leaf(name, r, run_dir=None if run_dir is None else Path(run_dir) / name,
                           cache_dir=cache_dir, progress=progress, monitor=(monitor or {}).get(name), select=select)
        self.heads.cpu().eval()
        return self

    def _fit_leaf(self, name: str, roles: Roles, *, run_dir, cache_dir, progress: bool, monitor=None,
                  select: str | None = None) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        hops: dict = {}
        pools = self.pseudo_data(roles, cache_dir, progress, hops)
        self.aggregation[name] = hops
        # the pool is read in place (memory-mapped at scale): each batch gathers its rows from the passes
        data = {r: ConcatRows([p[r] for p in pools.values()]) for r in ROLES}
        self.timings[f"{name}/aggregation_s"] = time.perf_counter() - t0
        self.timings[f"{name}/pool_rows"] = int(data["c"].shape[0])
        head: DecoupledProjector = self.heads[name]
        step = make_step(head, cfg)
        settings = cfg.loop_settings()
        t0 = time.perf_counter()
        if select is not None and monitor is None:
            raise ValueError(f"select={select!r} needs a monitor for leaf {name!r}")
        self.history[name] = train.run(head, data, step, settings, ckpt_dir=run_dir, select=select,
                                       on_epoch=None if monitor is None else lambda: monitor(self),
                                       run_key=self._leaf_key(name, roles), desc=f"Ex-MCR {name}->{roles.base.name}",
                                       progress=progress)
        self.timings[f"{name}/train_s"] = time.perf_counter() - t0

    def run_keys(self, base: Space, leaves: Mapping[str, Any]) -> dict[str, str]:
        """{leaf: hash of everything that determines its head except the device}."""
        return {name: self._leaf_key(name, r) for name, r in self._leaf_roles(base, leaves).items()}

    def _leaf_key(self, name: str, roles: Roles) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.config) | {"device": ""}, sort_keys=True).encode())
        h.update(f"{name}|{roles.overlap}".encode())
        for s in (roles.base, roles.leaf):
            h.update(s.name.encode())
            for m in s.modalities:
                h.update(f"{m}:{s.fingerprint(m)}".encode())
        return h.hexdigest()

    # ---- inference ----------------------------------------------------------------------------
    def _check(self) -> None:
        if self.heads is None:
            raise ValueError("this ExMCR model is not fitted or loaded yet")

    @property
    def dim(self) -> int:
        self._check()
        return int(self.base["dim"])

    def embed(self, space: str, modality: str, X, batch_size: int = 65536) -> np.ndarray:
        """Embeddings of `modality` from pretrained space `space` in the unified (= base) space.

        Base modalities come back unchanged (only validated and L2-normalised, exactly as `Space`
        does); a leaf's non-overlap modality goes through f_m(f_l(·)), its overlap through f_m(·).
        """
        self._check()
        where = f"embed({space!r}, {modality!r})"
        if space == self.base["name"]:
            if modality not in self.base["modalities"]:
                raise ValueError(f"base space {space!r} has modalities {self.base['modalities']}, not {modality!r}")
            dim = self.base["dim"]
        elif space in self.leaves:
            if modality not in self.leaves[space]["modalities"]:
                raise ValueError(f"leaf space {space!r} has modalities {self.leaves[space]['modalities']}, not {modality!r}")
            dim = self.leaves[space]["dim"]
        else:
            raise ValueError(f"unknown space {space!r}; this model has base {self.base['name']!r} "
                             f"and leaves {list(self.leaves)}")
        Xn = embedding_rows(X, dim, where, f" from {space!r}'s {modality} encoder")
        if len(Xn) == 0:
            return np.zeros((0, self.base["dim"]), np.float32)
        if space == self.base["name"]:
            return np.array(Xn, dtype=np.float32, copy=True)
        head: DecoupledProjector = self.heads[space].eval()
        fn = head.project_other if modality == self.leaves[space]["modality"] else head.project_overlap
        w = next(head.parameters())
        out = []
        with torch.inference_mode():
            for s in range(0, len(Xn), batch_size):
                x = as_tensor(Xn[s : s + batch_size]).to(w.device, w.dtype)
                out.append(F.normalize(fn(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def to(self, device: str = "cpu", dtype: str | None = None) -> "ExMCR":
        """Run `embed` on `device` (and in `dtype`); outputs stay float32 numpy, base rows unchanged."""
        if self.heads is not None:
            self.heads.to(device=resolve_device(device), dtype=getattr(torch, dtype) if dtype else None)
        return self

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        self._check()
        meta = {"method": self.method, "config": asdict(self.config), "base": self.base, "leaves": self.leaves,
                "history": self.history, "timings": self.timings, "run_key": self.fitted_run_key,
                "training_data": self.training_data, "aggregation": self.aggregation}
        return save_model(path, self.heads, meta)

    @classmethod
    def load(cls, path: str | Path) -> "ExMCR":
        meta, state, folder = read_model(path, cls.method)
        where = str(folder / CONFIG)
        model = cls(ExMCRConfig.from_dict(field(meta, "config", dict, where), where))
        b = field(meta, "base", dict, where)
        base = {"name": name_field(b, "name", f"{where}: base"), "dim": dim_field(b, "dim", f"{where}: base"),
                "modalities": modalities_field(b, "modalities", f"{where}: base")}
        leaves = {}
        for name, leaf in field(meta, "leaves", dict, where).items():
            here = f"{where}: leaves[{name!r}]"
            name_field({"name": name}, "name", here)
            mods = modalities_field(leaf, "modalities", here)
            info = {"dim": dim_field(leaf, "dim", here), "overlap": field(leaf, "overlap", str, here),
                    "modality": field(leaf, "modality", str, here), "modalities": mods,
                    "base_modality": leaf.get("base_modality")}
            if info["overlap"] not in mods or info["modality"] not in mods:
                raise ValueError(f"{here}: 'overlap' and 'modality' must be among its modalities {mods}")
            leaves[name] = info
        model.heads = materialize(lambda: model._build(base, leaves), state, folder / WEIGHTS)
        model.history, model.timings = meta.get("history", {}), meta.get("timings", {})
        model.fitted_run_key, model.training_data = meta.get("run_key"), meta.get("training_data", {})
        model.aggregation = meta.get("aggregation", {})
        return model

    #: roles of the released heads (DESIGN §5): leaf name -> (overlap, leaf non-overlap modality)
    OFFICIAL_LEAVES = {"clap": ("text", "audio"), "ulip": ("image", "3d")}

    @classmethod
    def from_official(cls, path: str | Path | Mapping[str, str | Path], leaf: str | None = None, base: str = "clip",
                      base_modalities: tuple[str, ...] = ("image", "text"), overlap: str | None = None,
                      modality: str | None = None) -> "ExMCR":
        """Load released Ex-MCR heads (`ex_clap.pt`, `ex_ulip.pt`) for inference.

        `path` is one file (then `leaf` names it: "clap" or "ulip", or give overlap and modality for
        other leaves) or a mapping {leaf: path}. Keys may carry a `module.` prefix (DataParallel).
        """
        paths = dict(path) if isinstance(path, Mapping) else {leaf: path}
        if None in paths:
            raise ValueError("ExMCR.from_official: name the leaf of this file, e.g. leaf='clap' (ex_clap.pt) "
                             "or leaf='ulip' (ex_ulip.pt)")
        leaves, states, shape = {}, {}, None
        for name, p in paths.items():
            state = read_official(p)
            roots = sorted({k.split(".", 1)[0] for k in state})
            if roots != ["Head1", "Head2"]:
                raise ValueError(f"{p}: expected keys under Head1 (f_l) and Head2 (f_m), found prefixes {roots}")
            if "Head1.weight" not in state:
                raise ValueError(f"{p}: Head1 is not a single Linear layer (no Head1.weight)")
            depth = 0
            while f"Head2.mlp{depth + 1}.net1.0.weight" in state:
                depth += 1
            if depth == 0:
                raise ValueError(f"{p}: no Head2.mlp1.net1.0.weight; not the Ex-MCR projector layout")
            d_leaf = linear_shape(state, "Head1.weight", p)[1]
            d_base = linear_shape(state, f"Head2.mlp{depth}.net2.0.weight", p)[0]
            hidden_mult = linear_shape(state, "Head2.mlp1.net1.0.weight", p)[0] / d_leaf
            if shape is not None and shape != (depth, hidden_mult, d_base):
                raise ValueError(f"{p}: projector shape (depth, hidden_mult, d_base) = {(depth, hidden_mult, d_base)} "
                                 f"differs from the other files' {shape}")
            shape = (depth, hidden_mult, d_base)
            if overlap is not None and modality is not None and len(paths) == 1:
                roles = (overlap, modality)
            elif name in cls.OFFICIAL_LEAVES:
                roles = cls.OFFICIAL_LEAVES[name]
            else:
                raise ValueError(f"unknown official leaf {name!r}: known {list(cls.OFFICIAL_LEAVES)}; "
                                 "give overlap= and modality= for another leaf")
            if roles[0] not in base_modalities:
                raise ValueError(f"leaf {name!r}: overlap modality {roles[0]!r} is not a base modality {list(base_modalities)}")
            base_other = [m for m in base_modalities if m != roles[0]]
            leaves[name] = {"dim": d_leaf, "overlap": roles[0], "modality": roles[1],
                            "modalities": [roles[0], roles[1]], "base_modality": base_other[0] if base_other else None}
            states[name] = (p, state)
        depth, hidden_mult, d_base = shape
        model = cls(ExMCRConfig(fm_depth=depth, hidden_mult=hidden_mult))
        base_info = {"name": base, "dim": d_base, "modalities": list(base_modalities)}
        with torch.device("meta"):
            heads = model._build(base_info, leaves)
        for name, (p, state) in states.items():
            heads[name] = materialize(lambda h=heads[name]: h, state, p)
        return model


def combined_key(keys: Mapping[str, str]) -> str:
    """One key for a model made of several independently trained heads."""
    return hashlib.sha256(json.dumps(dict(sorted(keys.items()))).encode()).hexdigest()


# ---- the training step ----------------------------------------------------------------------------
def make_step(head: DecoupledProjector, cfg: ExMCRConfig):
    """The per-batch loss of one leaf (DESIGN §4.3), as `train.run` expects it."""
    objectives = cfg.objective_list
    need_a = any(OBJECTIVES[o][0] == "a" for o in objectives)
    need_t = any(OBJECTIVES[o][0] == "t" for o in objectives)
    joint = cfg.bn == "joint"

    def step(b: dict[str, torch.Tensor], gen: torch.Generator):
        if cfg.noise_variance > 0:
            b = {k: losses.add_noise(t, cfg.noise_variance, gen) for k, t in b.items()}
        h = head.fl(b["c"])  # f_l(c~)
        fm_in = {}
        if need_a:
            x = head.fm_input(h)
            fm_in["a"] = x.detach() if cfg.stop_grad else x
        if need_t:
            fm_in["t"] = b["ol"]
        names = list(fm_in)
        if joint and len(names) > 1:
            outs = head.Head2(torch.cat([fm_in[n] for n in names])).split([len(fm_in[n]) for n in names])
        else:
            outs = [head.Head2(fm_in[n]) for n in names]
        proj = {n: F.normalize(o, dim=-1) for n, o in zip(names, outs)}
        targets = {"ob": b["ob"], "nb": b["nb"]}
        logs: dict[str, float] = {}
        terms = []
        for o in objectives:
            src, tgt = OBJECTIVES[o]
            term = losses.info_nce(proj[src], targets[tgt], cfg.temperature)
            terms.append(term)
            logs[f"nce_{o}"] = float(term.detach())
        inter = torch.stack(terms).mean()
        intra = 0.5 * (losses.l2(h, b["ol"]) if cfg.intra == "l2" else losses.squared_l2(h, b["ol"]))
        logs.update(inter=float(inter.detach()), intra=float(intra.detach()))
        return cfg.lam * intra + inter, logs

    return step
