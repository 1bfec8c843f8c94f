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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pairfree import losses, train
from pairfree.checkpoint import load_state_strict, read_model, read_official, save_model
from pairfree.memory import as_tensor, cached_aggregate
from pairfree.projector import PRESETS, init_weights, make_head
from pairfree.space import Space, check_overlap, other_modality

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class CMCRConfig(train.TrainConfig):
    """Paper defaults (DESIGN §3); `semantic_consistency=False, semantic_completion=False` is plain C-MCR."""

    tau1: float = 0.01  # memory-aggregation softmax temperature
    noise_variance: float = 0.004  # per-dimension variance of the semantic-completion noise
    lam: float = 0.1  # weight of the intra-MCR term
    temperature: float = 0.05  # InfoNCE temperature (open point, see module docstring)
    semantic_consistency: bool = True  # memory pseudo pairs (+ their inter and intra terms)
    semantic_completion: bool = True  # training-time noise
    projector: str = "mlp2"  # "mlp2" (CLAP-CLIP release) or "mlp1" (ULIP-CLIP release)
    hidden_mult: float = 2.0
    out_dim: int | None = None  # default: the larger input dimension
    init: str = "default"  # "default" | "xavier" | "eye"
    bn: str = "joint"  # "joint" | "separate": do a projector's two inputs share a BatchNorm batch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projector not in PRESETS:
            raise ValueError(f"CMCRConfig.projector must be one of {PRESETS}, got {self.projector!r}")
        if self.bn not in ("joint", "separate"):
            raise ValueError(f"CMCRConfig.bn must be 'joint' or 'separate', got {self.bn!r}")
        for name in ("tau1", "temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CMCRConfig.{name} must be > 0, got {getattr(self, name)}")


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

    # ---- building -------------------------------------------------------------------------
    def _build(self, spaces: dict[str, dict[str, Any]]) -> None:
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
            out[key] = cached_aggregate(
                cache_dir, space[overlap], space[mod], tau=cfg.tau1, method=cfg.aggregation,
                k=cfg.aggregation_k, device=cfg.device, progress=f"agg {space.name} {overlap}->{mod}" if progress else False,
            )
        return out

    def fit(self, x: Space, y: Space, overlap: str, *, run_dir: str | Path | None = None,
            cache_dir: str | Path | None = None, progress: bool = True) -> "CMCR":
        """Train the two projectors. run_dir: per-epoch checkpoints, resumed if present."""
        check_overlap(x, y, overlap)
        cfg = self.config
        mods = {s.name: other_modality(s, overlap) for s in (x, y)}
        self._build({s.name: {"dim": s.dim, "modalities": [overlap, mods[s.name]]} for s in (x, y)})
        self.overlap = overlap
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
        run_key = self._run_key(x, y, overlap)
        t0 = time.perf_counter()
        self.history = train.run(self.heads, data, step, settings, ckpt_dir=run_dir, run_key=run_key,
                                 desc=f"C-MCR {x.name}+{y.name}", progress=progress)
        self.timings["train_s"] = time.perf_counter() - t0
        self.heads.cpu().eval()
        return self

    def _run_key(self, x: Space, y: Space, overlap: str) -> str:
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
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != info["dim"]:
            raise ValueError(f"embed({space!r}, {modality!r}): expected (n, {info['dim']}) embeddings, got shape {X.shape}")
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        head = self.heads[space].eval()
        out = []
        with torch.inference_mode():
            for s in range(0, len(X), batch_size):
                out.append(F.normalize(head(torch.from_numpy(X[s : s + batch_size])), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.out_dim), np.float32)

    # ---- files ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        if self.heads is None:
            raise ValueError("nothing to save: this CMCR model is not fitted or loaded yet")
        meta = {"method": self.method, "config": asdict(self.config), "spaces": self.spaces,
                "overlap": self.overlap, "history": self.history, "timings": self.timings}
        return save_model(path, self.heads, meta)

    @classmethod
    def load(cls, path: str | Path) -> "CMCR":
        meta, state = read_model(path, cls.method)
        try:
            model = cls(CMCRConfig.from_dict(meta["config"], f"{path}/config.json"))
            spaces, overlap = meta["spaces"], meta["overlap"]
        except KeyError as e:
            raise ValueError(f"{path}/config.json: missing field {e}") from e
        model._build(spaces)
        load_state_strict(model.heads, state, Path(path) / "model.safetensors")
        model.heads.eval()
        model.overlap, model.history, model.timings = overlap, meta.get("history", []), meta.get("timings", {})
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
        hidden = state[first].shape[0]
        spaces = {}
        for head in ("Head_A", "Head_B"):
            name, mods = spec[head]
            spaces[name] = {"dim": int(state[f"{head}.{first.split('.', 1)[1]}"].shape[1]), "modalities": mods}
        out_dim = int(state[last].shape[0])
        d_a = spaces[spec["Head_A"][0]]["dim"]
        model = cls(CMCRConfig(projector=preset, out_dim=out_dim, hidden_mult=hidden / d_a))
        model._build(spaces)
        renamed = {f"{spec[k.split('.', 1)[0]][0]}.{k.split('.', 1)[1]}": v for k, v in state.items()}
        load_state_strict(model.heads, renamed, path)
        model.heads.eval()
        model.overlap = spec["overlap"]
        return model
