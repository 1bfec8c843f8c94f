"""C-MCR: connect two pretrained spaces that share one modality into a new space, without paired data.

Spaces X = (A, B) and Y = (B, C) share the overlap B (e.g. the same texts encoded by CLIP and CLAP).
Each overlap row i gives (t^X_i, t^Y_i); memory aggregation adds pseudo partners v_i = agg(t^X_i, A)
and a_i = agg(t^Y_i, C) (semantic consistency); Gaussian noise on all four during training
(semantic completion); projectors f_X, f_Y are trained with InfoNCE on (t^X, t^Y) and (v, a) plus
λ·intra-space L2 terms that close each space's modality gap.

Choices for the points the paper leaves open (all configurable, see CMCRConfig):
- InfoNCE temperature 0.05 (the Ex-MCR value from the same authors; C-MCR's is unpublished).
- The two inputs of a projector share one BatchNorm batch (`bn="joint"`), so BN's running statistics
  at inference describe the same mixture of modalities it normalised during training.
- Aggregated pseudo embeddings are re-normalised before noise (DESIGN §2).
- AdamW weight decay 0.01 (torch's default), no warm-up.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pairfree import losses, train
from pairfree.devices import resolve_device
from pairfree.checkpoint import (CONFIG, WEIGHTS, dim_field, field, linear_shape, materialize, modalities_field, name_field,
                                 read_model, read_official, save_model)
from pairfree.memory import as_tensor, cached_aggregate
from pairfree.config import option
from pairfree.projector import BN_MODES, INIT_MODES, MAX_DIM, PRESETS, init_weights, make_head
from pairfree.space import Space, check_overlap, embedding_rows, other_modality

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class CMCRConfig(train.TrainConfig):
    """Paper defaults (DESIGN §3); `semantic_consistency=False, semantic_completion=False` is plain C-MCR."""

    tau1: float = option(0.01, gt=0, doc="memory-aggregation softmax temperature")
    noise_variance: float = option(0.004, ge=0, doc="per-dimension variance of the semantic-completion noise")
    lam: float = option(0.1, ge=0, doc="weight of the intra-MCR term")
    temperature: float = option(0.05, gt=0, doc="InfoNCE temperature (open point, see the module docstring)")
    semantic_consistency: bool = option(True, doc="memory pseudo pairs (+ their inter and intra terms)")
    semantic_completion: bool = option(True, doc="training-time noise")
    projector: str = option("mlp2", choices=PRESETS, doc="mlp2 (CLAP-CLIP release) or mlp1 (ULIP-CLIP release)")
    hidden_mult: float = option(2.0, gt=0, le=64)
    out_dim: int | None = option(None, ge=1, le=MAX_DIM, doc="default: the larger input dimension")
    init: str = option("default", choices=INIT_MODES)
    bn: str = option("joint", choices=BN_MODES, doc="do a projector's two inputs share a BatchNorm batch")


def project(head: nn.Module, parts: list[torch.Tensor], joint: bool) -> list[torch.Tensor]:
    """Apply one head to several inputs, through one BatchNorm batch or separately; L2-normalise."""
    if joint and len(parts) > 1:
        out = head(torch.cat(parts)).split([len(p) for p in parts])
    else:
        out = [head(p) for p in parts]
    return [F.normalize(o, dim=-1) for o in out]


class CMCR:
    """A connected space: one projector per input space into a new, shared space."""

    method = "cmcr"

    def __init__(self, config: CMCRConfig | None = None):
        self.config = config or CMCRConfig()
        self.heads: nn.ModuleDict | None = None
        self.spaces: dict[str, dict[str, Any]] = {}  # name -> {"dim", "modalities"}
        self.overlap: str | None = None
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self.aggregation: dict[str, dict] = {}  # hop -> aggregation report (method; measured accuracy of "ivf")
        self.fitted_run_key: str | None = None  # run_key of the data and config it was trained on
        self.training_data: dict[str, dict] = {}  # space -> modality -> {"rows", "fingerprint"}

    # ---- building -------------------------------------------------------------------------
    def _build(self, spaces: dict[str, dict[str, Any]]) -> nn.ModuleDict:
        cfg = self.config
        for name in spaces:
            if not _NAME.match(name):
                raise ValueError(f"space name {name!r} must use letters, digits, '_' or '-' only")
        out_dim = cfg.out_dim or max(s["dim"] for s in spaces.values())
        torch.manual_seed(cfg.seed)
        heads = nn.ModuleDict()
        for name, s in spaces.items():
            heads[name] = make_head(cfg.projector, s["dim"], out_dim, cfg.hidden_mult)
            init_weights(heads[name], cfg.init)
        self.heads, self.spaces = heads, spaces
        return heads

    @property
    def out_dim(self) -> int:
        return self.config.out_dim or max(s["dim"] for s in self.spaces.values())

    # ---- training ---------------------------------------------------------------------------
    def pseudo_pairs(self, x: Space, y: Space, overlap: str, cache_dir: str | Path | None = None,
                     progress: bool = True) -> dict[str, np.ndarray]:
        """Semantic consistency: memory-aggregated partners of every overlap row in both spaces."""
        cfg = self.config
        out = {}
        for key, space in (("v", x), ("a", y)):
            mod = other_modality(space, overlap)
            report: dict = {}
            out[key] = cached_aggregate(
                cache_dir, space[overlap], space[mod], **cfg.aggregate_kwargs(cache_dir), report=report,
                progress=f"agg {space.name} {overlap}->{mod}" if progress else False,
            )
            self.aggregation[f"{space.name}: {overlap}->{mod}"] = report
        return out

    def fit(self, x: Space, y: Space, overlap: str, *, run_dir: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: bool = True, restart: bool = False,
            on_start: Callable[[], None] | None = None, monitor: Callable[[Any], dict] | None = None,
            select: str | None = None) -> "CMCR":
        """Train the two projectors.

        run_dir: per-epoch checkpoints, resumed if present (`restart=True` starts over). Inputs,
        device and a resumable checkpoint are all validated before `on_start()` is called and
        before anything is written. monitor(model) -> {score: value} runs after every epoch (e.g. a
        `pairfree.selection.Scorer`); select: keep the epoch with the highest such score.
        """
        check_overlap(x, y, overlap)
        if select is not None and monitor is None:
            raise ValueError(f"select={select!r} needs a monitor (e.g. pairfree.selection.Scorer)")
        cfg = self.config
        resolve_device(cfg.device)
        mods = {s.name: other_modality(s, overlap) for s in (x, y)}
        run_key = self.run_key(x, y, overlap)
        train.start_run({None if run_dir is None else Path(run_dir): run_key}, restart, on_start)
        self._build({s.name: {"dim": s.dim, "modalities": [overlap, mods[s.name]]} for s in (x, y)})
        self.overlap, self.fitted_run_key = overlap, run_key
        self.training_data = {s.name: s.describe() for s in (x, y)}
        data = {"tx": as_tensor(x[overlap]), "ty": as_tensor(y[overlap])}
        t0 = time.perf_counter()
        if cfg.semantic_consistency:
            pp = self.pseudo_pairs(x, y, overlap, cache_dir, progress)
            data.update(v=as_tensor(pp["v"]), a=as_tensor(pp["a"]))
        self.timings["aggregation_s"] = time.perf_counter() - t0
        fx, fy = self.heads[x.name], self.heads[y.name]
        joint = cfg.bn == "joint"

        def step(b: dict[str, torch.Tensor], gen: torch.Generator):
            if cfg.semantic_completion:
                b = {k: losses.add_noise(t, cfg.noise_variance, gen) for k, t in b.items()}
            if not cfg.semantic_consistency:
                zx, = project(fx, [b["tx"]], joint)
                zy, = project(fy, [b["ty"]], joint)
                loss = losses.info_nce(zx, zy, cfg.temperature)
                return loss, {"inter_text": float(loss.detach())}
            ztx, zv = project(fx, [b["tx"], b["v"]], joint)
            zty, za = project(fy, [b["ty"], b["a"]], joint)
            inter_t = losses.info_nce(ztx, zty, cfg.temperature)
            inter_p = losses.info_nce(zv, za, cfg.temperature)
            intra = losses.squared_l2(ztx, zv) + losses.squared_l2(zty, za)
            loss = inter_t + inter_p + cfg.lam * intra
            return loss, {"inter_text": float(inter_t.detach()), "inter_pseudo": float(inter_p.detach()), "intra": float(intra.detach())}

        settings = cfg.loop_settings()
        t0 = time.perf_counter()
        self.history = train.run(self.heads, data, step, settings, ckpt_dir=run_dir, run_key=run_key,
                                 desc=f"C-MCR {x.name}+{y.name}", progress=progress,
                                 on_epoch=None if monitor is None else lambda: monitor(self), select=select)
        self.timings["train_s"] = time.perf_counter() - t0
        self.heads.cpu().eval()
        return self

    def run_key(self, x: Space, y: Space, overlap: str) -> str:
        """Hash of everything that determines the trained model except the device: config, data, overlap."""
        h = hashlib.sha256(json.dumps(asdict(self.config) | {"device": ""}, sort_keys=True).encode())
        for s in (x, y):
            h.update(s.name.encode())
            for m in s.modalities:
                h.update(f"{m}:{s.fingerprint(m)}".encode())
        h.update(overlap.encode())
        return h.hexdigest()

    # ---- inference ---------------------------------------------------------------------------
    def embed(self, space: str, modality: str, X, batch_size: int = 65536) -> np.ndarray:
        """Embeddings of `modality` from pretrained space `space` in the unified space (unit rows)."""
        if self.heads is None:
            raise ValueError("this CMCR model is not fitted or loaded yet")
        if space not in self.spaces:
            raise ValueError(f"unknown space {space!r}; this model connects {list(self.spaces)}")
        info = self.spaces[space]
        if modality not in info["modalities"]:
            raise ValueError(f"space {space!r} has modalities {info['modalities']}, not {modality!r}")
        X = embedding_rows(X, info["dim"], f"embed({space!r}, {modality!r})", f" from {space!r}'s {modality} encoder")
        head = self.heads[space].eval()
        w = next(head.parameters())
        out = []
        with torch.inference_mode():
            for s in range(0, len(X), batch_size):
                x = as_tensor(X[s : s + batch_size]).to(w.device, w.dtype)
                out.append(F.normalize(head(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.out_dim), np.float32)

    def to(self, device: str = "cpu", dtype: str | None = None) -> "CMCR":
        """Run `embed` on `device` (and in `dtype`, e.g. "float16"); outputs stay float32 numpy."""
        if self.heads is not None:
            self.heads.to(device=resolve_device(device), dtype=getattr(torch, dtype) if dtype else None)
        return self

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        if self.heads is None:
            raise ValueError("nothing to save: this CMCR model is not fitted or loaded yet")
        meta = {"method": self.method, "config": asdict(self.config), "spaces": self.spaces,
                "overlap": self.overlap, "history": self.history, "timings": self.timings,
                "run_key": self.fitted_run_key, "training_data": self.training_data, "aggregation": self.aggregation}
        return save_model(path, self.heads, meta)

    @classmethod
    def load(cls, path: str | Path) -> "CMCR":
        meta, state, folder = read_model(path, cls.method)
        where = str(folder / CONFIG)
        model = cls(CMCRConfig.from_dict(field(meta, "config", dict, where), where))
        infos = field(meta, "spaces", dict, where)
        if len(infos) != 2:
            raise ValueError(f"{where}: field 'spaces' must describe the two connected spaces, got {list(infos)}")
        spaces = {}
        for name, info in infos.items():
            here = f"{where}: spaces[{name!r}]"
            name_field({"name": name}, "name", here)
            spaces[name] = {"dim": dim_field(info, "dim", here), "modalities": modalities_field(info, "modalities", here)}
        overlap = field(meta, "overlap", str, where)
        model.heads = materialize(lambda: model._build(spaces), state, folder / WEIGHTS)
        model.overlap, model.history, model.timings = overlap, meta.get("history", []), meta.get("timings", {})
        model.fitted_run_key, model.training_data = meta.get("run_key"), meta.get("training_data", {})
        model.aggregation = meta.get("aggregation", {})
        return model

    # Official releases: which head projects which space (reference/README.md, DESIGN §5).
    OFFICIAL_LAYOUTS = {
        "ulip_clip": {"overlap": "image", "Head_A": ("clip", ["image", "text"]), "Head_B": ("ulip", ["3d", "image"])},
        "clap_clip": {"overlap": "text", "Head_A": ("clap", ["audio", "text"]), "Head_B": ("clip", ["image", "text"])},
    }

    @classmethod
    def from_official(cls, path: str | Path, layout: str | None = None) -> "CMCR":
        """Load a released C-MCR projector (`ulip_clip.pt`, `clap_clip.pt`) for inference."""
        state = read_official(path)
        heads = sorted({k.split(".", 1)[0] for k in state})
        if heads != ["Head_A", "Head_B"]:
            raise ValueError(f"{path}: expected keys under Head_A and Head_B, found prefixes {heads}")
        # training-time names wrapped the MLP in `mlp1.` (upstream change_pt_key notebook)
        state = {k.replace(".mlp1.", "."): v for k, v in state.items()}
        preset = "mlp1" if "Head_A.net.0.weight" in state else "mlp2" if "Head_A.net1.0.weight" in state else None
        if preset is None:
            raise ValueError(f"{path}: neither the mlp1 (Head_A.net.0) nor the mlp2 (Head_A.net1.0) layout")
        layout = layout or ("ulip_clip" if preset == "mlp1" else "clap_clip")
        if layout not in cls.OFFICIAL_LAYOUTS:
            raise ValueError(f"unknown official layout {layout!r}; known: {list(cls.OFFICIAL_LAYOUTS)}")
        spec = cls.OFFICIAL_LAYOUTS[layout]
        first = "Head_A.net.0.weight" if preset == "mlp1" else "Head_A.net1.0.weight"
        last = "Head_A.net.0.weight" if preset == "mlp1" else "Head_A.net2.0.weight"
        hidden = linear_shape(state, first, path)[0]
        spaces = {}
        for head in ("Head_A", "Head_B"):
            name, mods = spec[head]
            spaces[name] = {"dim": linear_shape(state, f"{head}.{first.split('.', 1)[1]}", path)[1], "modalities": mods}
        out_dim = linear_shape(state, last, path)[0]
        d_a = spaces[spec["Head_A"][0]]["dim"]
        model = cls(CMCRConfig(projector=preset, out_dim=out_dim, hidden_mult=hidden / d_a))
        renamed = {f"{spec[k.split('.', 1)[0]][0]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        model.heads = materialize(lambda: model._build(spaces), renamed, path)
        model.overlap = spec["overlap"]
        return model
