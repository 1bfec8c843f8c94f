"""Model selection without paired data: label-free validation scores of a connected space.

With no audio-image pairs there is no validation set for the quantity users care about. What a
user does have: the overlap rows (the same texts in both spaces), the unpaired memories, and the
memory aggregation. Held out from training, they give three scores, each a retrieval mAP in the
unified space (both directions, averaged):

- "overlap": held-out overlap rows, X's against Y's (e.g. CLIP texts vs CLAP texts). Cheap, but it
  only sees the modality that was trained on; a model that ignores the other modalities can ace it.
- "pseudo": the held-out overlap rows' pseudo pairs (C-MCR's semantic consistency: v = agg(t^X, X's
  other modality), a = agg(t^Y, Y's other modality)), v's against a's, embedded as those modalities.
- "anchored": real held-out rows of Y's other modality (audio) against their pseudo partners in X's
  other modality, reached through the overlap (audio -> CLAP texts, the weights carried to the
  aligned CLIP texts -> images: Ex-MCR's audio-centric tuple). One side is real data, so it measures
  how real audio lands, not only aggregates.

`split_holdout` removes the held-out rows from the spaces before training; `Scorer` computes the
scores of any fitted model (`.embed`) and is the `monitor` of `CMCR.fit` / `ExMCR.fit`, which log it
every epoch and, with `select=`, keep the epoch with the best score. The selection study (`pairfree
tune`, docs/methods.md) measures how well each score tracks the true held-out cross-modal mAP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairfree.memory import aggregate
from pairfree.metrics import paired_retrieval
from pairfree.space import Space, check_overlap, other_modality

SCORES = ("overlap", "pseudo", "anchored")


@dataclass
class Holdout:
    """Rows held out of training: overlap rows (aligned across X and Y) and rows of Y's other modality."""

    x_overlap: np.ndarray
    y_overlap: np.ndarray
    y_other: np.ndarray


def split_holdout(x: Space, y: Space, overlap: str, fraction: float = 0.05, max_rows: int = 2000,
                  seed: int = 0) -> tuple[Space, Space, Holdout]:
    """(x without the held-out overlap rows, y without them and without held-out rows of its other
    modality, the held-out rows). Rows are chosen at random (seeded); the training spaces are copies."""
    check_overlap(x, y, overlap)
    if not 0 < fraction < 1:
        raise ValueError(f"split_holdout: fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    y_other = other_modality(y, overlap)

    def pick(n: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(max_rows, int(round(fraction * n))))
        held = np.zeros(n, bool)
        held[rng.choice(n, k, replace=False)] = True
        return np.flatnonzero(held), np.flatnonzero(~held)

    ho, keep_o = pick(x.count(overlap))
    ha, keep_a = pick(y.count(y_other))
    x_train = Space(x.name, {m: (x[m][keep_o] if m == overlap else x[m]) for m in x.modalities})
    y_train = Space(y.name, {m: (y[m][keep_o] if m == overlap else y[m][keep_a] if m == y_other else y[m])
                             for m in y.modalities})
    return x_train, y_train, Holdout(np.asarray(x[overlap][ho]), np.asarray(y[overlap][ho]),
                                     np.asarray(y[y_other][ha]))


class Scorer:
    """Label-free scores of models connecting X and Y (see the module docstring).

    x, y: the training spaces (their memories build the pseudo partners); holdout: from split_holdout.
    Pseudo partners are computed once, with the papers' τ1."""

    def __init__(self, x: Space, y: Space, overlap: str, holdout: Holdout, tau: float = 0.01):
        self.x_name, self.y_name, self.overlap = x.name, y.name, overlap
        self.x_other, self.y_other = other_modality(x, overlap), other_modality(y, overlap)
        self.holdout = holdout
        xo, yo = x[self.x_other], y[self.y_other]
        self.v = aggregate(holdout.x_overlap, xo, tau=tau)  # pseudo X-other of held-out texts
        self.a = aggregate(holdout.y_overlap, yo, tau=tau)  # pseudo Y-other of held-out texts
        # anchored: real held-out Y-other rows -> Y's overlap rows (weights) -> X's aligned overlap rows -> X-other
        _, carried = aggregate(holdout.y_other, y[overlap], [y[overlap], x[overlap]], tau=tau)
        self.anchor_partner = aggregate(carried, xo, tau=tau)

    @staticmethod
    def _map(a: np.ndarray, b: np.ndarray) -> float:
        r = paired_retrieval(a, b, positives="index", ks=(1,))
        return 0.5 * (r["a_to_b"]["mAP"] + r["b_to_a"]["mAP"])

    def __call__(self, model) -> dict[str, float]:
        e = model.embed
        h = self.holdout
        return {
            "overlap": self._map(e(self.x_name, self.overlap, h.x_overlap), e(self.y_name, self.overlap, h.y_overlap)),
            "pseudo": self._map(e(self.x_name, self.x_other, self.v), e(self.y_name, self.y_other, self.a)),
            "anchored": self._map(e(self.y_name, self.y_other, h.y_other),
                                  e(self.x_name, self.x_other, self.anchor_partner)),
        }
