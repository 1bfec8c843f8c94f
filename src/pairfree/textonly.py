"""A text-only projector with modality-mean offsets (TextME-style; Hong et al., ICML 2026, 2602.03098).

No pairs but the overlap, and no memory aggregation: every modality of both spaces is centred by its
own mean (estimated from its unpaired rows; TextME's "offsets"), one projector f (an MLP2 block,
Linear-BN-ReLU-Linear-BN) is trained on the centred overlap rows only, Y's onto X's with symmetric
InfoNCE, and at inference any modality of Y goes through f after removing its own mean, any modality
of X is only centred. The bet is the one C³ and TextME make: once each modality's mean gap is removed,
a map learnt on texts transfers to audio and images. The unified space is X's centred coordinates.

TextME projects into an LLM embedding space with τ = 0.07 and hard negatives; here the target is X
(as in Ex-MCR), the loss pairfree's InfoNCE at the same τ, the schedule the caller's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pairfree import losses, train
from pairfree.baselines import _Saved, modality_means
from pairfree.config import option
from pairfree.memory import as_tensor
from pairfree.projector import MLP2, init_weights
from pairfree.space import Space, check_overlap


@dataclass
class TextOffsetConfig(train.TrainConfig):
    temperature: float = option(0.07, gt=0, doc="InfoNCE temperature (TextME's 0.07)")
    hidden_mult: float = option(2.0, gt=0, le=64)
    noise_variance: float = option(0.0, ge=0, doc="training noise on the centred inputs (0: none, as TextME)")


class TextOffsetMap(_Saved):
    method = "textoffset"

    def __init__(self, config: TextOffsetConfig | None = None):
        super().__init__()
        self.config = config or TextOffsetConfig()
        self.head: torch.nn.Module | None = None
        self.means: dict[str, np.ndarray] = {}
        self.history: list[dict] = []

    @property
    def fitted(self) -> bool:
        return self.head is not None

    def _build(self, d_in: int, d_out: int) -> torch.nn.Module:
        torch.manual_seed(self.config.seed)
        head = MLP2(d_in, d_out, int(round(self.config.hidden_mult * d_in)))
        init_weights(head, "xavier")
        return head

    def fit(self, x: Space, y: Space, overlap: str, *, progress: bool = False) -> "TextOffsetMap":
        check_overlap(x, y, overlap)
        cfg = self.config
        self.means = modality_means(x, y)
        mx = torch.from_numpy(self.means[f"{x.name}/{overlap}"]).float()
        my = torch.from_numpy(self.means[f"{y.name}/{overlap}"]).float()
        self.head = self._build(y.dim, x.dim)
        self.spaces = {s.name: {"dim": s.dim, "modalities": list(s.modalities)} for s in (x, y)}
        self.target, self.overlap = x.name, overlap
        self.params = {"config": asdict(cfg)}
        head = self.head

        def step(b, gen):
            ty, tx = b["ty"] - my, b["tx"] - mx
            if cfg.noise_variance > 0:
                ty = ty + torch.randn(ty.shape, generator=gen) * cfg.noise_variance ** 0.5
            loss = losses.info_nce(F.normalize(head(ty), dim=-1), F.normalize(tx, dim=-1), cfg.temperature)
            return loss, {}

        key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode() + x.fingerprint(overlap).encode()
                             + y.fingerprint(overlap).encode()).hexdigest()
        self.history = train.run(head, {"tx": as_tensor(x[overlap]), "ty": as_tensor(y[overlap])}, step,
                                 cfg.loop_settings(), run_key=key, desc="text-only + offsets", progress=progress)
        head.cpu().eval()
        return self

    def embed(self, space: str, modality: str, X) -> np.ndarray:
        X = self._check_embed(space, modality, X)
        centred = torch.from_numpy(np.asarray(X, dtype=np.float32) - self.means[f"{space}/{modality}"].astype(np.float32))
        if space == self.target:
            return F.normalize(centred, dim=-1).numpy()
        with torch.inference_mode():
            return F.normalize(self.head.eval()(centred), dim=-1).numpy().astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {**{f"head.{k}": v.detach().double().numpy() for k, v in self.head.state_dict().items()},
                **{f"mean.{k}": v for k, v in self.means.items()}}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        cfg = self.params.get("config", {})
        self.config = TextOffsetConfig.from_dict(cfg, "config.json: params.config") if cfg else TextOffsetConfig()
        src = next(n for n in self.spaces if n != self.target)
        head = self._build(self.spaces[src]["dim"], self.spaces[self.target]["dim"])
        state = {k[5:]: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if k.startswith("head.")}
        ref = head.state_dict()
        head.load_state_dict({k: state[k].to(ref[k].dtype) for k in ref})
        self.head = head.eval()
        self.means = {k[5:]: v for k, v in arrays.items() if k.startswith("mean.")}
