"""Plots of evaluation results: localization heatmaps over the images, per-class accuracy, a sheet of
retrieval examples. matplotlib (`pairfree[plot]`); each is skipped when it is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pairfree.fileio import atomic_path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def _image(item) -> np.ndarray | None:
    from pairfree import media

    try:
        return np.asarray(media.load("image", item.source).resize((224, 224)))
    except Exception:
        return None


def localization_sheet(maps: list, cious: list[float], path: Path, n: int = 8) -> None:
    """The first n pairs: image, heatmap over it, ground-truth outline, cIoU in the title."""
    plt = _plt()
    if plt is None or not maps:
        return
    n = min(n, len(maps))
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.7), squeeze=False)
    for ax, (item, heat, gt), c in zip(axes[0], maps[:n], cious[:n]):
        img = _image(item)
        if img is not None:
            ax.imshow(img)
        ax.imshow(heat, cmap="jet", alpha=0.45, extent=(0, 224, 224, 0))
        ax.contour(gt, levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(f"cIoU {c:.2f}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    _save(fig, plt, path)


def per_class_accuracy(per_class: dict[str, float], title: str, path: Path) -> None:
    plt = _plt()
    if plt is None or not per_class:
        return
    names = sorted(per_class, key=per_class.get)
    fig, ax = plt.subplots(figsize=(7, max(3, 0.16 * len(names))))
    ax.barh(range(len(names)), [per_class[k] for k in names], color="#2855d8")
    ax.set_yticks(range(len(names)), names, fontsize=6 if len(names) > 40 else 8)
    ax.set_xlabel("top-1 accuracy")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, plt, path)


def retrieval_sheet(extras: dict[str, Any], title: str, path: Path, n: int = 5, k: int = 5) -> None:
    """n queries (rows): the query, then its top k results; correct ones framed in green. Images are
    drawn, other modalities shown by their id or text."""
    plt = _plt()
    if plt is None or len(extras.get("za", [])) == 0:
        return
    za, zb = extras["za"], extras["zb"]
    a_items, b_items, (ma, mb) = extras["a_items"], extras["b_items"], extras["modalities"]
    positives = extras["positives"]
    rows = np.linspace(0, len(za) - 1, min(n, len(za))).astype(int)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.9 * (k + 1), 2.0 * len(rows)), squeeze=False)
    for r, qi in enumerate(rows):
        top = np.argsort(-(zb @ za[qi]))[:k]
        cells = [(a_items[qi], ma, None)] + [(b_items[j], mb, j in positives[qi]) for j in top]
        for c, (item, mod, hit) in enumerate(cells):
            ax = axes[r][c]
            img = _image(item) if mod == "image" else None
            if img is not None:
                ax.imshow(img)
            else:
                text = str(item.source) if mod == "text" else Path(str(item.source)).name
                ax.text(0.5, 0.5, text[:60], ha="center", va="center", wrap=True, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            if hit is not None:
                for spine in ax.spines.values():
                    spine.set_edgecolor("#1a9c3e" if hit else "#cccccc")
                    spine.set_linewidth(3 if hit else 1)
            ax.set_title("query" if c == 0 else f"#{c}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, plt, path)
