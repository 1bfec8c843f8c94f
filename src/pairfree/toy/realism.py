"""Statistics that show how the toy spaces compare with real ones. Nothing here looks at C-MCR.

All numbers are computed with numpy on held-out test items (or fitted on memories and evaluated on
test items), so a reader can see each space is competent but imperfect, has a modality gap, and
that two spaces sharing a modality are not related by a rotation.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pair_stats(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Matched vs random cosine, centroid gap, cone width and in-space retrieval for paired rows."""
    n = len(a)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    sim = a64 @ b64.T
    matched = float(np.mean(np.diag(sim)))
    random = float((sim.sum() - np.trace(sim)) / (n * n - n))
    ca, cb = a64.mean(0), b64.mean(0)
    within = [float((m.sum(0) @ m.sum(0) - n) / (n * n - n)) for m in (a64, b64)]
    top_ab, top_ba = sim.argmax(1), sim.argmax(0)
    idx = np.arange(n)
    return {
        "matched_cosine": matched,
        "random_pair_cosine": random,
        "centroid_cosine_distance": float(1.0 - ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb))),
        "centroid_gap_l2": float(np.linalg.norm(ca - cb)),
        "within_modality_cosine": within,  # cone effect: mean cosine between different items of one modality
        "r1_a_to_b": float(np.mean(top_ab == idx)),
        "r1_b_to_a": float(np.mean(top_ba == idx)),
        "r1_chance": 1.0 / n,
        "concept_r1_a_to_b": float(np.mean(labels[top_ab] == labels)),
        "concept_r1_b_to_a": float(np.mean(labels[top_ba] == labels)),
    }


def zero_shot_accuracy(x: np.ndarray, class_text: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy against template-averaged class prompts (CLIP protocol)."""
    protos = _unit(_unit(class_text.astype(np.float64)).mean(1))
    return float(np.mean((x @ protos.T).argmax(1) == labels))


def map_fits(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, float]:
    """How far two encodings of the same raw items are from a rotation, and from any linear map.

    Fitted on the (aligned) memory rows, evaluated on held-out test rows, after centring both sides
    with the fit means (so a translation is allowed); the Procrustes map also gets the best global scale. Residuals are relative to the variance of the
    centred target: 0 = exact, 1 = no better than predicting the mean.
    """
    x_fit, y_fit, x_test, y_test = (m.astype(np.float64) for m in (x_fit, y_fit, x_test, y_test))
    mx, my = x_fit.mean(0), y_fit.mean(0)
    xf, yf, xt, yt = x_fit - mx, y_fit - my, x_test - mx, y_test - my
    denom = float(np.sum(yt**2))
    u, sv, vt = np.linalg.svd(xf.T @ yf, full_matrices=False)  # semi-orthogonal map, dims may differ
    rot = u @ vt * (sv.sum() / np.sum(xf**2))  # with the best global scale: a similarity transform
    procrustes = float(np.sum((xt @ rot - yt) ** 2) / denom)
    w = np.linalg.solve(xf.T @ xf + 1e-8 * np.eye(xf.shape[1]), xf.T @ yf)  # least squares (normal equations)
    linear = float(np.sum((xt @ w - yt) ** 2) / denom)
    # nearest-neighbour agreement: does the rotated row land closest to its own counterpart?
    nn_hit = float(np.mean(((xt @ rot) @ yt.T).argmax(1) == np.arange(len(yt))))
    return {
        "procrustes_residual": procrustes,
        "linear_residual": linear,
        "linear_r2": 1.0 - linear,
        "procrustes_r1": nn_hit,
    }


def coverage(labels: np.ndarray, n_concepts: int) -> dict[str, Any]:
    counts = np.bincount(labels, minlength=n_concepts)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {
        "concepts_present": int(np.sum(counts > 0)),
        "concepts_missing": int(np.sum(counts == 0)),
        "concepts_under_5": int(np.sum(counts < 5)),
        "effective_concepts": float(np.exp(-np.sum(nz * np.log(nz)))),
        "min_count": int(counts.min()),
        "max_count": int(counts.max()),
    }
