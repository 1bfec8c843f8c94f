"""Supervised upper bound: the same projector heads trained on TRUE pairs of the connected modalities.

pairfree's methods never see such pairs; this model shows how much of the attainable alignment the
paired-data-free methods recover on a world where the pairs exist (the toy world).
"""

from __future__ import annotations

import numpy as np

from pairfree import losses, train
from pairfree.connect import CMCR, CMCRConfig, project
from pairfree.memory import as_tensor
from pairfree.space import normalized


class SupervisedMap(CMCR):
    method = "supervised"

    def fit_paired(self, x: tuple[str, str, np.ndarray], y: tuple[str, str, np.ndarray],
                   progress: bool = True) -> "SupervisedMap":
        """x, y: (space name, modality, embeddings) with row i of each a true pair."""
        (xn, xm, X), (yn, ym, Y) = x, y
        X, Y = normalized(X, f"{xn}/{xm}"), normalized(Y, f"{yn}/{ym}")
        if len(X) != len(Y):
            raise ValueError(f"paired training needs equal row counts, got {len(X)} and {len(Y)}")
        cfg = self.config
        self._build({xn: {"dim": X.shape[1], "modalities": [xm]}, yn: {"dim": Y.shape[1], "modalities": [ym]}})
        fx, fy = self.heads[xn], self.heads[yn]

        def step(b, gen):
            if cfg.semantic_completion:
                b = {k: losses.add_noise(t, cfg.noise_variance, gen) for k, t in b.items()}
            zx, = project(fx, [b["x"]], False)
            zy, = project(fy, [b["y"]], False)
            loss = losses.info_nce(zx, zy, cfg.temperature)
            return loss, {}

        settings = cfg.loop_settings()
        data = {"x": as_tensor(X), "y": as_tensor(Y)}
        self.history = train.run(self.heads, data, step, settings, desc="supervised", progress=progress)
        self.heads.cpu().eval()
        return self


def supervised_upper_bound(x, y, config: CMCRConfig | None = None, progress: bool = True) -> SupervisedMap:
    return SupervisedMap(config or CMCRConfig()).fit_paired(x, y, progress=progress)
