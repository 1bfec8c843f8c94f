"""Linear baselines the paired-data-free methods must beat.

Each maps space Y (e.g. CLAP) into the coordinates of space X (e.g. CLIP) with one matrix W
(dim_Y x dim_X), fitted on the overlap rows ONLY (the same texts encoded by both spaces; row i of
`x[overlap]` and `y[overlap]` is the same raw sample). It is then applied to every modality of Y,
including the one X never saw (audio). X is the target: its modalities are returned unchanged.

- `RidgeMap`: W = argmin ||Y W - X||^2 + alpha ||W||^2 (closed form, float64).
- `ProcrustesMap`: orthogonal (or, for different dims, semi-orthogonal) W from the SVD of Y^T X.
- `RandomMap`: a fixed seeded Gaussian W; the chance level.

All three expose the API of the learned models (`CMCR`, `ExMCR`): `.fit(x, y, overlap, ...)`
returning self, `.embed(space, modality, X)` -> L2-normalised float32 rows, `.spaces`
({name: {"dim", "modalities"}}, X first), `.overlap` and `.fitted`.

Centring (`center=True`): the means of the overlap rows, mu_X and mu_Y, are removed before fitting
and the map is applied as the affine `(y - mu_Y) W + mu_X`. A linear W alone cannot express a
constant offset between the spaces, and contrastive spaces have one (every modality sits in its
own narrow cone: the modality gap). Uncentred, the large rank-one term n mu_Y mu_X^T is part of
Y^T X and W must spend itself carrying mu_Y onto mu_X; centred, W is fitted on the variation
around the means and the offset is carried by the translation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pairfree.space import Space, check_overlap, embedding_rows

_ROWS = 65536  # Gram matrices are accumulated in chunks of rows (memory-mapped stores stay on disk)
_MAX_VAL = 50000  # at most this many held-out rows for alpha="auto"
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-4, 4))  # the grid searched by alpha="auto", scaled (see RidgeMap)


def _moments(y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Uncentred float64 (Y^T Y, Y^T X, sum of Y rows, sum of X rows, n), accumulated over chunks of rows."""
    yy = np.zeros((y.shape[1], y.shape[1]))
    yx = np.zeros((y.shape[1], x.shape[1]))
    sy, sx = np.zeros(y.shape[1]), np.zeros(x.shape[1])
    for s in range(0, len(y), _ROWS):
        yc = np.asarray(y[s : s + _ROWS], dtype=np.float64)
        xc = np.asarray(x[s : s + _ROWS], dtype=np.float64)
        yy += yc.T @ yc
        yx += yc.T @ xc
        sy += yc.sum(axis=0)
        sx += xc.sum(axis=0)
    return yy, yx, sy, sx, len(y)


def _centred(yy, yx, sy, sx, n, center: bool) -> tuple[np.ndarray, ...]:
    """(Y^T Y, Y^T X, mu_Y, mu_X) of the mean-removed rows when center, else unchanged with zero means."""
    if not center:
        return yy, yx, np.zeros_like(sy), np.zeros_like(sx)
    mu_y, mu_x = sy / n, sx / n
    return yy - n * np.outer(mu_y, mu_y), yx - n * np.outer(mu_y, mu_x), mu_y, mu_x


def _ridge_solutions(yy: np.ndarray, yx: np.ndarray, alphas) -> list[np.ndarray]:
    """(Y^T Y + alpha I)^-1 Y^T X for every alpha from one eigendecomposition (pseudo-inverse at alpha=0)."""
    evals, evecs = np.linalg.eigh(yy)
    proj = evecs.T @ yx
    cutoff = max(float(evals.max()), 1e-300) * 1e-12
    out = []
    for a in alphas:
        lam = evals + a
        inv = np.where(lam > cutoff, 1.0 / np.where(lam > cutoff, lam, 1.0), 0.0)
        out.append(evecs @ (proj * inv[:, None]))
    return out


def checked_rows(model, space: str, modality: str, X) -> np.ndarray:
    """The input check every baseline's `embed` shares: fitted, a known space and modality, valid rows."""
    if not model.fitted:
        raise ValueError(f"this {type(model).__name__} is not fitted yet; call .fit(x, y, overlap) first")
    if space not in model.spaces:
        raise ValueError(f"unknown space {space!r}; this {type(model).__name__} maps between {list(model.spaces)}")
    info = model.spaces[space]
    if modality not in info["modalities"]:
        raise ValueError(f"space {space!r} has modalities {info['modalities']}, not {modality!r}")
    return embedding_rows(X, info["dim"], f"embed({space!r}, {modality!r})", f" from {space!r}'s {modality} encoder")


class LinearMap:
    """Shared state and `embed` of the linear baselines; subclasses set W (and the means) in `fit`."""

    method = "linear"

    def __init__(self) -> None:
        self.W: np.ndarray | None = None  # (dim_Y, dim_X), float64
        self.mu_x: np.ndarray | None = None
        self.mu_y: np.ndarray | None = None
        self.spaces: dict[str, dict] = {}
        self.target: str | None = None  # X's name: its modalities pass through unchanged
        self.overlap: str | None = None

    @property
    def fitted(self) -> bool:
        return self.W is not None

    def _setup(self, x: Space, y: Space, overlap: str | None) -> None:
        if not isinstance(x, Space) or not isinstance(y, Space):
            raise TypeError(f"{type(self).__name__}.fit expects two pairfree.Space objects, "
                            f"got {type(x).__name__} and {type(y).__name__}")
        if overlap is not None:
            check_overlap(x, y, overlap)
        elif x.name == y.name:
            raise ValueError(f"the two spaces need different names, both are {x.name!r}")
        self.W = None  # a failed refit must not leave the previous W paired with new spaces
        self.spaces = {s.name: {"dim": s.dim, "modalities": list(s.modalities)} for s in (x, y)}
        self.target, self.overlap = x.name, overlap

    def embed(self, space: str, modality: str, X) -> np.ndarray:
        """Embeddings of `modality` from pretrained space `space` in X's coordinates (unit float32 rows)."""
        X = checked_rows(self, space, modality, X)
        if space == self.target:
            return np.array(X, dtype=np.float32)
        out = np.empty((X.shape[0], self.W.shape[1]), dtype=np.float32)
        for s in range(0, X.shape[0], _ROWS):
            z = (np.asarray(X[s : s + _ROWS], dtype=np.float64) - self.mu_y) @ self.W + self.mu_x
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            out[s : s + len(z)] = z / np.maximum(norms, 1e-12)
        return out

    def __repr__(self) -> str:
        state = f"{list(self.spaces)}, overlap={self.overlap!r}" if self.fitted else "not fitted"
        return f"{type(self).__name__}({state})"

    # ---- files: the same folder format as the learned models (safetensors + config.json)
    def save(self, path):
        import torch

        from pairfree.checkpoint import save_model

        if not self.fitted:
            raise ValueError(f"nothing to save: this {type(self).__name__} is not fitted yet")
        tensors = {"W": torch.from_numpy(np.ascontiguousarray(self.W)), "mu_x": torch.from_numpy(self.mu_x),
                   "mu_y": torch.from_numpy(self.mu_y)}
        meta = {"method": self.method, "spaces": self.spaces, "target": self.target, "overlap": self.overlap,
                "params": self._params()}
        return save_model(path, _Tensors(tensors), meta)

    def _params(self) -> dict:
        return {k: getattr(self, k) for k in ("alpha_", "center", "seed") if hasattr(self, k)}

    @classmethod
    def load(cls, path) -> "LinearMap":
        from pairfree.checkpoint import CONFIG, WEIGHTS, dim_field, field, modalities_field, name_field, read_model

        meta, state, folder = read_model(path, cls.method)
        where = str(folder / CONFIG)
        model = cls()
        for name, info in field(meta, "spaces", dict, where).items():
            here = f"{where}: spaces[{name!r}]"
            name_field({"name": name}, "name", here)
            model.spaces[name] = {"dim": dim_field(info, "dim", here), "modalities": modalities_field(info, "modalities", here)}
        model.target = field(meta, "target", str, where)
        if len(model.spaces) != 2 or model.target not in model.spaces:
            raise ValueError(f"{where}: field 'target' must name one of the two spaces {list(model.spaces)}")
        model.overlap = meta.get("overlap")
        source = next(n for n in model.spaces if n != model.target)
        want = {"W": (model.spaces[source]["dim"], model.spaces[model.target]["dim"]),
                "mu_x": (model.spaces[model.target]["dim"],), "mu_y": (model.spaces[source]["dim"],)}
        if set(state) != set(want) or any(tuple(state[k].shape) != v for k, v in want.items()):
            raise ValueError(f"{folder / WEIGHTS}: expected tensors {want}, found "
                             f"{ {k: tuple(v.shape) for k, v in state.items()} }")
        model.W, model.mu_x, model.mu_y = (state[k].double().numpy() for k in ("W", "mu_x", "mu_y"))
        for k, v in meta.get("params", {}).items():
            setattr(model, k, v)
        return model


class _Tensors:
    """The `state_dict()` interface `save_model` expects, for plain tensors."""

    def __init__(self, tensors):
        self._t = tensors

    def state_dict(self):
        return self._t


class RidgeMap(LinearMap):
    """Ridge regression from Y's overlap rows onto X's: W = (Y^T Y + alpha I)^-1 Y^T X.

    alpha: a number, or "auto" (default): hold out `val_fraction` of the overlap rows (at most
    50,000; a random split seeded by `seed`), fit on the rest for every alpha in `alphas` (default `RIDGE_ALPHAS` times
    n_train / dim_Y, the mean eigenvalue of Y^T Y, so the grid follows the data's scale), keep the
    alpha whose held-out predictions have the highest mean cosine with X's rows (cosine is how
    embeddings are used), then refit on all rows. The chosen value is `alpha_`, the scores
    `val_scores_`. One eigendecomposition of Y^T Y serves the whole grid.
    center: default False, the plain objective above (equal to sklearn `Ridge(fit_intercept=False)`);
    True fits an intercept (see the module docstring).
    """

    method = "ridge"

    def fit(self, x: Space, y: Space, overlap: str, alpha: float | str = "auto", center: bool = False,
            val_fraction: float = 0.1, alphas: Sequence[float] | None = None, seed: int = 0) -> "RidgeMap":
        self._setup(x, y, overlap)
        X, Y = x[overlap], y[overlap]
        full = _moments(Y, X)
        if isinstance(alpha, str) and alpha == "auto":
            alpha = self._select_alpha(X, Y, full, center, val_fraction, alphas, seed)
        elif isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not alpha >= 0:
            raise ValueError(f"alpha: expected a non-negative number or 'auto', got {alpha!r}")
        yy, yx, self.mu_y, self.mu_x = _centred(*full, center)
        if alpha > 0:
            self.W = np.linalg.solve(yy + float(alpha) * np.eye(len(yy)), yx)
        else:
            self.W = _ridge_solutions(yy, yx, [0.0])[0]
        self.alpha_, self.center = float(alpha), center
        return self

    def _select_alpha(self, X, Y, full, center, val_fraction, alphas, seed) -> float:
        """alpha="auto": the grid value with the best held-out mean cosine (class docstring)."""
        n = len(Y)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
        n_val = min(int(round(n * val_fraction)), _MAX_VAL)
        if n_val < 1 or n - n_val < 2:
            raise ValueError(f"alpha='auto' holds out {val_fraction:.0%} of the {n} overlap {self.overlap!r} rows, "
                             f"too few to fit and validate; pass a numeric alpha")
        val = np.sort(np.random.default_rng(seed).permutation(n)[:n_val])
        Yv, Xv = np.asarray(Y[val], dtype=np.float64), np.asarray(X[val], dtype=np.float64)
        held = _moments(Yv, Xv)
        train = tuple(f - h for f, h in zip(full, held))  # moments of the training rows
        yy, yx, mu_y, mu_x = _centred(*train, center)
        grid = (np.asarray(RIDGE_ALPHAS) * train[4] / Y.shape[1] if alphas is None
                else np.asarray(alphas, dtype=np.float64))
        if grid.ndim != 1 or grid.size == 0 or not (grid >= 0).all():
            raise ValueError(f"alphas: expected a non-empty list of non-negative numbers, got {alphas!r}")
        Xv /= np.linalg.norm(Xv, axis=1, keepdims=True)
        scores = []
        for W in _ridge_solutions(yy, yx, grid):
            z = (Yv - mu_y) @ W + mu_x
            z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
            scores.append(float(np.mean(np.sum(z * Xv, axis=1))))
        self.val_scores_ = dict(zip(grid.tolist(), scores))
        return float(grid[int(np.argmax(scores))])


class ProcrustesMap(LinearMap):
    """Orthogonal Procrustes: W = U V^T where U S V^T = Y^T X (thin SVD), maximising tr(W^T Y^T X).

    W maximises the agreement of Y W with X over all W with orthonormal rows or columns: when
    dim_Y == dim_X it is the rotation/reflection minimising ||Y W - X||; when the dims differ it is
    the semi-orthogonal solution from the same SVD (W^T W = I if dim_Y > dim_X, an isometric
    projection; W W^T = I if dim_Y < dim_X, an isometric embedding).
    center: default True (classical Procrustes analysis, translation then rotation): a rotation
    cannot express the constant offset between the two spaces' overlap clouds, and uncentred the
    mean direction of each narrow cone dominates Y^T X (module docstring). False: a pure rotation.
    """

    method = "procrustes"

    def fit(self, x: Space, y: Space, overlap: str, center: bool = True) -> "ProcrustesMap":
        self._setup(x, y, overlap)
        X, Y = x[overlap], y[overlap]
        _, yx, mu_y, mu_x = _centred(*_moments(Y, X), center)
        U, _, Vt = np.linalg.svd(yx, full_matrices=False)
        self.W, self.mu_y, self.mu_x, self.center = U @ Vt, mu_y, mu_x, center
        return self


class RandomMap(LinearMap):
    """Chance baseline: a fixed Gaussian projection W (dim_Y x dim_X, entries N(0, 1/dim_Y)) from `seed`.

    Uses no data; `overlap` is only checked when given.
    """

    method = "random"

    def fit(self, x: Space, y: Space, overlap: str | None = None, seed: int = 0) -> "RandomMap":
        self._setup(x, y, overlap)
        rng = np.random.default_rng(seed)
        self.W = rng.standard_normal((y.dim, x.dim)) / np.sqrt(y.dim)
        self.mu_y, self.mu_x, self.seed = np.zeros(y.dim), np.zeros(x.dim), seed
        return self


def modality_means(*spaces: Space) -> dict[str, np.ndarray]:
    """{"space/modality": mean row (float64)} over every modality of the spaces' (unpaired) embeddings."""
    out = {}
    for s in spaces:
        for m in s.modalities:
            a = s[m]
            total = np.zeros(a.shape[1])
            for start in range(0, len(a), _ROWS):
                total += np.asarray(a[start : start + _ROWS], dtype=np.float64).sum(axis=0)
            out[f"{s.name}/{m}"] = total / len(a)
    return out


class _Saved:
    """save/load for baselines whose state is a few named arrays plus JSON parameters."""

    method = "?"

    def __init__(self) -> None:
        # what every saved baseline records beside its arrays (written to config.json by `save`)
        self.spaces: dict[str, dict] = {}
        self.target: str | None = None
        self.overlap: str | None = None
        self.params: dict = {}

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def save(self, path):
        import torch

        from pairfree.checkpoint import save_model

        if not self.fitted:
            raise ValueError(f"nothing to save: this {type(self).__name__} is not fitted yet")
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self._arrays().items()}
        meta = {"method": self.method, "spaces": self.spaces, "target": self.target, "overlap": self.overlap,
                "params": self.params}
        return save_model(path, _Tensors(tensors), meta)

    @classmethod
    def load(cls, path):
        from pairfree.checkpoint import CONFIG, dim_field, field, modalities_field, name_field, read_model

        meta, state, folder = read_model(path, cls.method)
        where = str(folder / CONFIG)
        model = cls()
        for name, info in field(meta, "spaces", dict, where).items():
            here = f"{where}: spaces[{name!r}]"
            name_field({"name": name}, "name", here)
            model.spaces[name] = {"dim": dim_field(info, "dim", here), "modalities": modalities_field(info, "modalities", here)}
        model.target, model.overlap = field(meta, "target", str, where), meta.get("overlap")
        if len(model.spaces) != 2 or model.target not in model.spaces:
            raise ValueError(f"{where}: field 'target' must name one of the two spaces {list(model.spaces)}")
        model.params = dict(meta.get("params", {}))
        try:
            model._set_arrays({k: v.double().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()})
        except (KeyError, ValueError) as e:
            raise ValueError(f"{folder}: the saved arrays do not fit a {cls.__name__} ({e})") from None
        return model

    def _check_embed(self, space: str, modality: str, X) -> np.ndarray:
        return checked_rows(self, space, modality, X)


def _unit_rows(z: np.ndarray) -> np.ndarray:
    return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class CentredMap(_Saved):
    """A linear map between per-modality-centred spaces (C³'s "collapse"), no pairs but the overlap.

    Every modality of both spaces is centred by its own mean (estimated from its unpaired rows): the
    modality gap is a roughly constant offset per modality, and removing it puts audio, texts and
    images of one space around the same origin. Y's centred overlap rows are then mapped onto X's by
    orthogonal Procrustes (`kind="procrustes"`) or ridge (`kind="ridge"`, alpha chosen as `RidgeMap`
    does); X's modalities are only centred. `readd`: a modality of X whose mean is added back to every
    output, so that all modalities share that modality's cone (e.g. "image" for audio -> image
    retrieval in CLIP's coordinates); None (default) compares centred embeddings.
    """

    method = "centred"

    def __init__(self) -> None:
        super().__init__()
        self.W: np.ndarray | None = None
        self.means: dict[str, np.ndarray] = {}

    @property
    def fitted(self) -> bool:
        return self.W is not None

    def fit(self, x: Space, y: Space, overlap: str, kind: str = "procrustes", readd: str | None = None,
            alpha: float | str = "auto") -> "CentredMap":
        if kind not in ("procrustes", "ridge"):
            raise ValueError(f"CentredMap kind: expected 'procrustes' or 'ridge', got {kind!r}")
        if readd is not None and readd not in x.modalities:
            raise ValueError(f"CentredMap readd: {readd!r} is not a modality of the target space {x.name!r} "
                             f"({list(x.modalities)})")
        check_overlap(x, y, overlap)
        self.W = None
        # the overlap modality's mean is the mean of the rows the map is fitted on: W is the centred fit
        inner = (ProcrustesMap().fit(x, y, overlap, center=True) if kind == "procrustes"
                 else RidgeMap().fit(x, y, overlap, alpha=alpha, center=True))
        self.means = modality_means(x, y)
        self.W = inner.W
        self.spaces = {s.name: {"dim": s.dim, "modalities": list(s.modalities)} for s in (x, y)}
        self.target, self.overlap = x.name, overlap
        self.params = {"kind": kind, "readd": readd, **({"alpha_": inner.alpha_} if kind == "ridge" else {})}
        return self

    def embed(self, space: str, modality: str, X) -> np.ndarray:
        X = self._check_embed(space, modality, X)
        out = np.empty((X.shape[0], self.spaces[self.target]["dim"]), dtype=np.float32)
        mean = self.means[f"{space}/{modality}"]
        add = self.means[f"{self.target}/{self.params['readd']}"] if self.params.get("readd") else 0.0
        for s in range(0, X.shape[0], _ROWS):
            z = np.asarray(X[s : s + _ROWS], dtype=np.float64) - mean
            if space != self.target:
                z = z @ self.W
            out[s : s + len(z)] = _unit_rows(z + add)
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"W": self.W, **{f"mean.{k}": v for k, v in self.means.items()}}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        src = next(n for n in self.spaces if n != self.target)
        want = (self.spaces[src]["dim"], self.spaces[self.target]["dim"])
        if arrays["W"].shape != want:
            raise ValueError(f"W has shape {arrays['W'].shape}, expected {want}")
        self.W = arrays["W"]
        self.means = {k[5:]: v for k, v in arrays.items() if k.startswith("mean.")}
        for s, info in self.spaces.items():
            for m in info["modalities"]:
                if self.means.get(f"{s}/{m}", np.zeros(0)).shape != (info["dim"],):
                    raise ValueError(f"missing or misshapen mean of {s}/{m}")


class RelativeMap(_Saved):
    """Relative representations through the overlap (ASIF, Norelli et al. 2023; Moschella et al. 2023):
    training-free, no pairs but the overlap.

    The overlap rows are a coupled anchor set: anchor i is the same raw sample (a text) in both
    spaces. Any embedding is described by its similarities to the anchors of its own space: keep the
    `k` largest (ASIF's `non_zeros`), raise them to `power` (ASIF's `val_exps`; negatives clipped to
    0), L2-normalise. Two items from different spaces are compared through these anchor-indexed
    vectors, so audio (CLAP) and images (CLIP) meet without any map being fitted. The unified
    space has one dimension per anchor (`anchors` rows, a seeded subset of the overlap when it is
    larger). ASIF's defaults are k = 800, power = 8 with 1.6M anchors.
    """

    method = "relative"

    def __init__(self) -> None:
        super().__init__()
        self.anchors: dict[str, np.ndarray] = {}

    @property
    def fitted(self) -> bool:
        return bool(self.anchors)

    def fit(self, x: Space, y: Space, overlap: str, anchors: int = 8192, k: int = 800, power: float = 8.0,
            seed: int = 0) -> "RelativeMap":
        check_overlap(x, y, overlap)
        n = x.count(overlap)
        if not (isinstance(k, int) and k >= 1) or not power > 0:
            raise ValueError(f"RelativeMap: k must be an integer >= 1 and power > 0, got k={k!r}, power={power!r}")
        idx = np.arange(n) if n <= anchors else np.sort(np.random.default_rng(seed).choice(n, anchors, replace=False))
        self.anchors = {s.name: np.asarray(s[overlap][idx], dtype=np.float32) for s in (x, y)}
        self.spaces = {s.name: {"dim": s.dim, "modalities": list(s.modalities)} for s in (x, y)}
        self.target, self.overlap = x.name, overlap
        self.params = {"k": int(min(k, len(idx))), "power": float(power), "anchors": int(len(idx)), "seed": seed}
        return self

    @property
    def dim(self) -> int:
        return self.params["anchors"]

    def embed(self, space: str, modality: str, X) -> np.ndarray:
        X = self._check_embed(space, modality, X)
        A = self.anchors[space]
        k, power = self.params["k"], self.params["power"]
        out = np.zeros((X.shape[0], A.shape[0]), dtype=np.float32)
        for s in range(0, X.shape[0], 4096):
            sims = np.asarray(X[s : s + 4096], dtype=np.float32) @ A.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < A.shape[0] else np.broadcast_to(
                np.arange(A.shape[0]), sims.shape)
            vals = np.maximum(np.take_along_axis(sims, top, axis=1), 0.0) ** power
            block = out[s : s + len(sims)]
            np.put_along_axis(block, top, vals.astype(np.float32), axis=1)
            block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-30)
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {f"anchors.{k}": v for k, v in self.anchors.items()}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.anchors = {k[8:]: v.astype(np.float32) for k, v in arrays.items() if k.startswith("anchors.")}
        if set(self.anchors) != set(self.spaces) or len({len(a) for a in self.anchors.values()}) != 1:
            raise ValueError("one anchor array per space, all with the same rows, is expected")
