"""Task kinds: one small function per kind, scoring a unified model on a dataset adapter's output.

- `retrieval`: both directions, R@1/5/10, mAP and median rank, several positives per query where
  the dataset has them (`pairfree.metrics.retrieval`);
- `zero_shot`: prompt templates averaged per class (L2-normalised, averaged, re-normalised: the CLIP
  / ULIP protocol), Acc@1/3/5, per-class accuracy, per-fold accuracy for datasets with folds;
- `class_vectors`: EShot's protocol: each item against the normalised mean embedding of each class
  in the other modality, both directions, Acc@1/5 (sample-weighted) and per-class mean;
- `localization`: a map per (image, audio) pair (`UnifiedModel.localize`), cIoU@0.5, mean cIoU
  and AUC (`pairfree.eval.metrics`);
- `counterfactual`: pairfree's definition of counterfactual audio-image recognition (the C-MCR
  paper's protocol could not be recovered: docs/datasets.md): every factual pair (image i, audio i)
  against K counterfactual pairs where one side is replaced by an item of another class; ROC AUC of
  factual vs counterfactual scores, and the two-alternative accuracy (factual > counterfactual),
  for swapped audio and for swapped images. Chance: 0.5.

Each returns (metrics dict, extras for plots).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pairfree import metrics as M
from pairfree.eval import metrics as EM
from pairfree.eval.data import ClassificationData, ClassVectorData, LocalizationData, RetrievalData
from pairfree.eval.embed import embed_items


def _drop(items_ok: np.ndarray, what: str, data) -> None:
    for i in np.flatnonzero(~items_ok):
        data.coverage.unreadable.append(f"{what}[{i}]")


def retrieval(um, data: RetrievalData, cache, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    (ma, a), (mb, b) = data.a, data.b
    za, oka = embed_items(um, ma, a, cache=cache, dataset=data.name, progress=progress)
    zb, okb = embed_items(um, mb, b, cache=cache, dataset=data.name, progress=progress)
    _drop(oka, ma, data)
    _drop(okb, mb, data)
    keep_b = np.flatnonzero(okb)
    new_b = -np.ones(len(b), np.int64)
    new_b[keep_b] = np.arange(len(keep_b))
    pos_ab, keep_a = [], []
    for i, p in enumerate(data.positives):
        q = [int(new_b[j]) for j in p if okb[j]]
        if oka[i] and q:
            keep_a.append(i)
            pos_ab.append(q)
    if not keep_a:
        raise ValueError(f"{data.name}: no readable {ma} item with a readable {mb} positive "
                         f"(unreadable: {data.coverage.unreadable[:3]})")
    za, zb = za[keep_a], zb[keep_b]
    pos_ba: list[list[int]] = [[] for _ in range(len(zb))]
    for qi, p in enumerate(pos_ab):
        for j in p:
            pos_ba[j].append(qi)
    keep_ba = [j for j, p in enumerate(pos_ba) if p]
    ks = (1, 5, 10)
    out = {f"{ma}_to_{mb}": M.retrieval(za, zb, pos_ab, ks),
           f"{mb}_to_{ma}": M.retrieval(zb[keep_ba], za, [pos_ba[j] for j in keep_ba], ks),
           "queries": {ma: len(za), mb: len(keep_ba)}, "gallery": {ma: len(za), mb: len(zb)}}
    extras = {"a_items": [a[i] for i in keep_a], "b_items": [b[j] for j in keep_b], "za": za, "zb": zb,
              "modalities": (ma, mb), "positives": pos_ab}
    return out, extras


def class_texts(um, classes: list[str], templates: list[str]) -> np.ndarray:
    """(n_classes, n_templates, d) unified embeddings of every template filled with every class name."""
    texts = [t.format(c) for c in classes for t in templates]
    z = um.encode("text", texts)
    return z.reshape(len(classes), len(templates), -1)


def zero_shot(um, data: ClassificationData, cache, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    z, ok = embed_items(um, data.modality, data.items, cache=cache, dataset=data.name, progress=progress)
    _drop(ok, data.modality, data)
    z, labels = z[ok], data.labels[ok]
    ct = class_texts(um, data.classes, data.templates)
    out: dict[str, Any] = dict(M.zero_shot(z, ct, labels, ks=(1, 3, 5)))
    proto = M.class_embeddings(ct)
    pred = np.argmax(np.asarray(z, np.float64) @ proto.T, axis=1)
    per_class = {c: float(np.mean(pred[labels == k] == k)) for k, c in enumerate(data.classes) if np.any(labels == k)}
    out["per_class_Acc@1"] = per_class
    out["mean_per_class_Acc@1"] = float(np.mean(list(per_class.values()))) if per_class else float("nan")
    if data.folds is not None:
        folds = data.folds[ok]
        out["per_fold_Acc@1"] = {str(int(f)): float(np.mean(pred[folds == f] == labels[folds == f]))
                                 for f in np.unique(folds)}
    out["items"] = int(len(z))
    return out, {"per_class": per_class, "classes": data.classes}


def class_vectors(um, data: ClassVectorData, cache, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    (ma, a), (mb, b) = data.a, data.b
    za, oka = embed_items(um, ma, a, cache=cache, dataset=data.name, progress=progress)
    zb, okb = embed_items(um, mb, b, cache=cache, dataset=data.name, progress=progress)
    _drop(oka, ma, data)
    _drop(okb, mb, data)
    za, la, zb, lb = za[oka], data.labels_a[oka], zb[okb], data.labels_b[okb]
    classes = [k for k in range(len(data.classes)) if np.any(la == k) and np.any(lb == k)]

    def vectors(z, labels):
        v = np.stack([z[labels == k].mean(0) for k in classes])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def accuracy(z, labels, protos) -> dict[str, float]:
        idx = {k: i for i, k in enumerate(classes)}
        keep = np.isin(labels, classes)
        y = np.array([idx[k] for k in labels[keep]])
        order = np.argsort(-(z[keep] @ protos.T), axis=1)
        res = {f"Acc@{k}": float(np.mean(np.any(order[:, :k] == y[:, None], axis=1))) for k in (1, 5)}
        res["mean_per_class_Acc@1"] = float(np.mean([np.mean(order[y == c, 0] == c) for c in range(len(classes))]))
        return res

    out = {f"{ma}_to_{mb}": accuracy(za, la, vectors(zb, lb)), f"{mb}_to_{ma}": accuracy(zb, lb, vectors(za, la)),
           "classes": len(classes), "items": {ma: int(len(za)), mb: int(len(zb))}}
    return out, {}


def localization(um, data: LocalizationData, cache, progress: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    from pairfree.progress import progress as progress_bar

    cious, maps = [], []
    with progress_bar(len(data.images), f"localize {data.name}", progress, unit="pair") as bar:
        for img, aud, gt in zip(data.images, data.audios, data.gt_maps):
            try:
                (heat,) = um.localize([img.source], [aud.source])
            except ValueError as e:
                if "patch embeddings" in str(e):
                    raise
                data.coverage.unreadable.append(f"{img.id}: {e}")
                bar.update(1)
                continue
            full = EM.resize_map(heat)
            cious.append(EM.ciou(EM.binarize(full), gt))
            maps.append((img, full, gt))
            bar.update(1)
    if not cious:
        raise ValueError(f"{data.name}: no pair could be scored")
    out = EM.localization_summary(np.asarray(cious))
    out["pairs"] = len(cious)
    return out, {"maps": maps, "cious": cious}


def counterfactual(um, data: RetrievalData, cache, progress: bool = False, k: int = 10, seed: int = 0
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    if data.labels is None:
        raise ValueError(f"{data.name}: counterfactual recognition needs a class per pair")
    (ma, a), (mb, b) = data.a, data.b
    za, oka = embed_items(um, ma, a, cache=cache, dataset=data.name, progress=progress)
    zb, okb = embed_items(um, mb, b, cache=cache, dataset=data.name, progress=progress)
    keep = np.flatnonzero(oka & okb)
    za, zb, labels = za[keep], zb[keep], np.asarray(data.labels)[keep]
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"pairs": int(len(keep)), "counterfactuals_per_pair": k}
    factual = np.sum(za * zb, axis=1)
    for swapped, (q, g) in ((mb, (za, zb)), (ma, (zb, za))):
        pos, neg, wins = [], [], []
        for i in range(len(q)):
            others = np.flatnonzero(labels != labels[i])
            if not len(others):
                continue
            j = rng.choice(others, size=min(k, len(others)), replace=False)
            s_cf = g[j] @ q[i]
            pos.append(factual[i])
            neg.extend(s_cf.tolist())
            wins.extend((factual[i] > s_cf).tolist())
        out[f"swap_{swapped}"] = {"ROC_AUC": EM.roc_auc(np.asarray(pos), np.asarray(neg)),
                                  "2AFC_accuracy": float(np.mean(wins))}
    return out, {}


KINDS = {"retrieval": retrieval, "zero_shot": zero_shot, "class_vectors": class_vectors,
         "localization": localization, "counterfactual": counterfactual}
