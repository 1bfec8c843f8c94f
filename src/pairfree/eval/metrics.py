"""Metrics the general `pairfree.metrics` module does not have: sound-source localization and the
verification score of counterfactual recognition.

Localization follows the standard protocol of that literature (Senocak et al., CVPR 2018, for
Flickr-SoundNet; Chen et al., "Localizing Visual Sounds the Hard Way", CVPR 2021, which defined
cIoU and AUC and introduced VGG-Sound Source; the evaluation code of both, and of EZ-VSL, Mo &
Morgado 2022): the map is resized to 224 x 224 over the whole frame, min-max normalised and
binarised at its median; the ground truth is the union of the boxes (VGGSS) or the consensus of
the annotators (Flickr-SoundNet: boxes summed, halved, clipped to 1);
cIoU = sum(pred * gt) / (sum(gt) + sum(pred * (gt == 0))) per sample; "cIoU@0.5" (what the papers
call cIoU, also AP50) is the fraction of samples with cIoU >= 0.5; AUC is the area under the
success rate over thresholds 0, 0.05, ..., 1.
"""

from __future__ import annotations

import numpy as np

SIZE = 224


def box_map(boxes: list[tuple[float, float, float, float]], consensus: int = 1, size: int = SIZE) -> np.ndarray:
    """Ground-truth map from boxes in normalised [0, 1] (x1, y1, x2, y2) coordinates.

    consensus=1: the union of the boxes (VGGSS); consensus=2: summed, divided by 2 and clipped to 1
    (Flickr-SoundNet's three annotators: a pixel two of them marked counts fully)."""
    m = np.zeros((size, size))
    for x1, y1, x2, y2 in boxes:
        xa, ya = int(size * max(0.0, x1)), int(size * max(0.0, y1))
        xb, yb = int(size * min(1.0, x2)), int(size * min(1.0, y2))
        t = np.zeros((size, size))
        t[ya:yb, xa:xb] = 1
        m += t
    if consensus > 1:
        m = np.minimum(m / consensus, 1.0)
    else:
        m = (m > 0).astype(np.float64)
    return m


def resize_map(heat: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Bilinear resize (align_corners=True, as F.interpolate in the protocol's code) of a patch-grid map."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(heat, np.float64))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=True)[0, 0].numpy()


def binarize(heat: np.ndarray) -> np.ndarray:
    """Min-max normalise, then 1 where the value is at least the median (the protocol's threshold)."""
    h = np.asarray(heat, np.float64)
    lo, hi = h.min(), h.max()
    if hi > lo:
        h = (h - lo) / (hi - lo)
    thr = np.sort(h.ravel())[int(h.size * 0.5)]
    return (h >= thr).astype(np.float64)


def ciou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Consensus IoU of a binary prediction against a (consensus) ground-truth map."""
    inter = float(np.sum(pred * gt))
    denom = float(np.sum(gt) + np.sum(pred * (gt == 0)))
    return inter / denom if denom > 0 else 0.0


def localization_summary(cious: np.ndarray) -> dict[str, float]:
    c = np.asarray(cious, np.float64)
    thresholds = np.arange(21) * 0.05
    success = np.array([np.mean(c >= t) for t in thresholds])
    auc = float(np.sum((success[1:] + success[:-1]) / 2 * np.diff(thresholds)))
    return {"cIoU@0.5": float(np.mean(c >= 0.5)), "cIoU_mean": float(np.mean(c)), "AUC": auc}


def roc_auc(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count one half): ROC AUC."""
    pos = np.asarray(positive_scores, np.float64)
    neg = np.asarray(negative_scores, np.float64)
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks over ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_pos = ranks[: len(pos)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
