import numpy as np
import pytest
from scipy.linalg import orthogonal_procrustes
from sklearn.linear_model import Ridge

import pairfree as pf
from pairfree.baselines import RIDGE_ALPHAS, ProcrustesMap, RandomMap, RidgeMap
from pairfree.metrics import retrieval


def unit(rng, n, d):
    # local copy of conftest.unit: `tests` may be shadowed by laion_clap's top-level `tests` package
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def orthonormal(rng, rows, cols):
    """A (rows x cols) matrix with orthonormal columns (rows >= cols) or rows (rows < cols)."""
    q, _ = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    return q if rows >= cols else q.T


def spaces(rng, M, n=300, n_audio=50, cone=0.0):
    """CLIP-like X (text, image) and CLAP-like Y (text, audio) with X text = Y text @ M exactly.

    M has orthonormal rows, so unit Y rows map to unit X rows and Space's normalisation keeps
    the relation exact. `cone` adds a shared offset to Y's texts (a narrow cone, like real spaces).
    """
    ty = unit(rng, n, M.shape[0]).astype(np.float64) + cone * unit(rng, 1, M.shape[0])
    ty /= np.linalg.norm(ty, axis=1, keepdims=True)
    audio_y = unit(rng, n_audio, M.shape[0]).astype(np.float64)
    x = pf.Space("clip", {"text": ty @ M, "image": unit(rng, 20, M.shape[1])})
    y = pf.Space("clap", {"text": ty, "audio": audio_y})
    return x, y, audio_y


@pytest.mark.parametrize("dy, dx", [(12, 12), (8, 12)])
def test_ridge_recovers_a_known_linear_map(rng, dy, dx):
    M = orthonormal(rng, dy, dx)  # orthonormal rows: Y M stays unit, the relation survives normalisation
    x, y, audio_y = spaces(rng, M)
    model = RidgeMap().fit(x, y, "text", alpha=1e-10)
    np.testing.assert_allclose(model.W, M, atol=1e-5)
    z = model.embed("clap", "audio", audio_y)
    np.testing.assert_allclose(z, audio_y @ M, atol=1e-5)
    assert z.dtype == np.float32 and z.shape == (50, dx)
    # alpha=0 exactly: the least-squares solution
    np.testing.assert_allclose(RidgeMap().fit(x, y, "text", alpha=0).W, M, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.05, 3.0, 40.0])
def test_ridge_matches_sklearn(rng, alpha):
    # a general map plus noise: X rows are not a linear function of Y rows
    ty, tx = unit(rng, 200, 10), unit(rng, 200, 6)
    tx = tx + ty @ rng.standard_normal((10, 6))
    x = pf.Space("clip", {"text": tx, "image": unit(rng, 5, 6)})
    y = pf.Space("clap", {"text": ty, "audio": unit(rng, 5, 10)})
    X, Y = x["text"].astype(np.float64), y["text"].astype(np.float64)
    model = RidgeMap().fit(x, y, "text", alpha=alpha)
    ref = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky").fit(Y, X)
    np.testing.assert_allclose(model.W, ref.coef_.T, atol=1e-10)
    np.testing.assert_allclose(model.W, np.linalg.solve(Y.T @ Y + alpha * np.eye(10), Y.T @ X), atol=1e-10)
    # center=True is ridge with an (unpenalised) intercept
    c = RidgeMap().fit(x, y, "text", alpha=alpha, center=True)
    ref = Ridge(alpha=alpha, fit_intercept=True, solver="cholesky").fit(Y, X)
    np.testing.assert_allclose(c.W, ref.coef_.T, atol=1e-10)
    np.testing.assert_allclose(c.mu_x - c.mu_y @ c.W, ref.intercept_, atol=1e-10)
    a = y["audio"].astype(np.float64)
    expected = ref.predict(a)
    np.testing.assert_allclose(c.embed("clap", "audio", a), expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-6)


def test_ridge_auto_alpha_by_held_out_cosine(rng):
    ty = unit(rng, 400, 10)
    x = pf.Space("clip", {"text": ty @ rng.standard_normal((10, 6)) + 0.8 * unit(rng, 400, 6)})
    y = pf.Space("clap", {"text": ty})
    model = RidgeMap().fit(x, y, "text")
    grid = np.asarray(RIDGE_ALPHAS) * 360 / 10  # 10% held out, grid scaled by n_train / dim_Y
    np.testing.assert_allclose(sorted(model.val_scores_), grid)
    assert model.alpha_ == max(model.val_scores_, key=model.val_scores_.get)
    # the held-out score is recomputed directly for the chosen alpha
    val = np.sort(np.random.default_rng(0).permutation(400)[:40])
    tr = np.setdiff1d(np.arange(400), val)
    Y, X = y["text"].astype(np.float64), x["text"].astype(np.float64)
    W = np.linalg.solve(Y[tr].T @ Y[tr] + model.alpha_ * np.eye(10), Y[tr].T @ X[tr])
    z = Y[val] @ W
    cos = np.sum(z / np.linalg.norm(z, axis=1, keepdims=True) * X[val], axis=1).mean()
    assert model.val_scores_[model.alpha_] == pytest.approx(cos, abs=1e-9)
    # and the final W is the explicit-alpha fit on all rows
    np.testing.assert_allclose(model.W, RidgeMap().fit(x, y, "text", alpha=model.alpha_).W, atol=1e-12)
    custom = RidgeMap().fit(x, y, "text", alphas=[1e-3, 1e6])
    assert set(custom.val_scores_) == {1e-3, 1e6} and custom.alpha_ == 1e-3
    with pytest.raises(ValueError, match="too few to fit and validate"):
        RidgeMap().fit(pf.Space("a", {"t": unit(rng, 3, 4)}), pf.Space("b", {"t": unit(rng, 3, 4)}), "t")
    for bad in (-1.0, "best", None, True):
        with pytest.raises(ValueError, match="alpha: expected a non-negative number or 'auto'"):
            RidgeMap().fit(x, y, "text", alpha=bad)


@pytest.mark.parametrize("center", [False, True])
def test_procrustes_recovers_a_rotation(rng, center):
    R = orthonormal(rng, 16, 16)
    x, y, audio_y = spaces(rng, R, cone=1.5)
    model = ProcrustesMap().fit(x, y, "text", center=center)
    np.testing.assert_allclose(model.W, R, atol=1e-5)
    np.testing.assert_allclose(model.W.T @ model.W, np.eye(16), atol=1e-10)
    # the recovered rotation carries the unseen modality over: audio finds its rotated self
    mapped = model.embed("clap", "audio", audio_y)  # centred: (a - mu_Y) R + mu_X = a R, as mu_X = mu_Y R
    np.testing.assert_allclose(mapped, audio_y @ R, atol=1e-5)
    assert retrieval(model.embed("clap", "audio", audio_y), audio_y @ R, np.arange(50))["R@1"] == 1.0


def test_procrustes_matches_scipy_and_centres(rng):
    tx, ty = unit(rng, 100, 8), unit(rng, 100, 8)  # unrelated clouds: a non-trivial optimum
    x, y = pf.Space("clip", {"text": tx}), pf.Space("clap", {"text": ty})
    X, Y = tx.astype(np.float64), ty.astype(np.float64)
    np.testing.assert_allclose(ProcrustesMap().fit(x, y, "text", center=False).W,
                               orthogonal_procrustes(Y, X)[0], atol=1e-10)
    c = ProcrustesMap().fit(x, y, "text")  # default: centred
    assert c.center
    np.testing.assert_allclose(c.W, orthogonal_procrustes(Y - Y.mean(0), X - X.mean(0))[0], atol=1e-10)
    np.testing.assert_allclose(c.mu_y, Y.mean(0), atol=1e-12)
    z = (Y[:5] - Y.mean(0)) @ c.W + X.mean(0)
    np.testing.assert_allclose(c.embed("clap", "text", Y[:5]), z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("dy, dx", [(12, 8), (8, 12)])
def test_procrustes_semi_orthogonal_for_different_dims(rng, dy, dx):
    x = pf.Space("clip", {"text": unit(rng, 60, dx)})
    y = pf.Space("clap", {"text": unit(rng, 60, dy)})
    W = ProcrustesMap().fit(x, y, "text").W
    assert W.shape == (dy, dx)
    small = min(dx, dy)
    np.testing.assert_allclose(W.T @ W if dy > dx else W @ W.T, np.eye(small), atol=1e-10)
    # optimal among semi-orthogonal maps: beats random ones on the Procrustes objective
    X = x["text"].astype(np.float64) - x["text"].mean(0)
    Y = y["text"].astype(np.float64) - y["text"].mean(0)
    best = np.trace(W.T @ Y.T @ X)
    for _ in range(20):
        assert np.trace(orthonormal(rng, dy, dx).T @ Y.T @ X) < best
    # recovering a known semi-orthogonal map (dy < dx: an isometric embedding)
    if dy < dx:
        M = orthonormal(rng, dy, dx)
        xs, ys, _ = spaces(rng, M)
        np.testing.assert_allclose(ProcrustesMap().fit(xs, ys, "text").W, M, atol=1e-5)


def test_random_map_is_seeded(rng):
    x, y, audio_y = spaces(rng, orthonormal(rng, 10, 6))
    a, b = RandomMap().fit(x, y, "text"), RandomMap().fit(x, y)
    np.testing.assert_array_equal(a.W, b.W)
    assert not np.allclose(RandomMap().fit(x, y, seed=1).W, a.W)
    z = a.embed("clap", "audio", audio_y)
    assert z.shape == (50, 6) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(z, (audio_y @ a.W) / np.linalg.norm(audio_y @ a.W, axis=1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("make", [lambda x, y: RidgeMap().fit(x, y, "text", alpha=1.0),
                                  lambda x, y: ProcrustesMap().fit(x, y, "text"),
                                  lambda x, y: RandomMap().fit(x, y, "text")])
def test_embed_api_and_errors(rng, make):
    x, y, audio_y = spaces(rng, orthonormal(rng, 10, 6))
    model = make(x, y)
    assert model.fitted and list(model.spaces) == ["clip", "clap"]
    assert model.spaces["clap"] == {"dim": 10, "modalities": ["text", "audio"]}
    img = rng.standard_normal((7, 6)) * 5  # X-space modality: returned normalised, otherwise unchanged
    out = model.embed("clip", "image", img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, img / np.linalg.norm(img, axis=1, keepdims=True), atol=1e-6)
    z = model.embed("clap", "audio", audio_y * 3)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(z, model.embed("clap", "audio", audio_y), atol=1e-6)
    with pytest.raises(ValueError, match=r"unknown space 'ulip'.*\['clip', 'clap'\]"):
        model.embed("ulip", "3d", img)
    with pytest.raises(ValueError, match=r"space 'clap' has modalities \['text', 'audio'\], not 'image'"):
        model.embed("clap", "image", audio_y)
    with pytest.raises(ValueError, match=r"embed\('clap', 'audio'\): expected \(n, 10\) .*got shape \(50, 6\)"):
        model.embed("clap", "audio", audio_y[:, :6])
    with pytest.raises(ValueError, match=r"embed\('clip', 'image'\): expected \(n, 6\) .*got shape \(6,\)"):
        model.embed("clip", "image", img[0])
    with pytest.raises(ValueError, match=r"embed\('clap', 'audio'\).*row 1 is all zeros"):
        model.embed("clap", "audio", np.stack([audio_y[0], 0 * audio_y[0]]))


@pytest.mark.parametrize("cls", [RidgeMap, ProcrustesMap, RandomMap])
def test_unfitted_and_bad_fit_inputs(rng, cls):
    model = cls()
    assert not model.fitted
    with pytest.raises(ValueError, match=f"this {cls.__name__} is not fitted yet"):
        model.embed("clip", "text", unit(rng, 2, 4))
    x = pf.Space("clip", {"text": unit(rng, 30, 4), "image": unit(rng, 3, 4)})
    y = pf.Space("clap", {"text": unit(rng, 29, 5), "audio": unit(rng, 3, 5)})
    with pytest.raises(pf.SpaceError, match="overlap 'text' rows are not aligned"):
        cls().fit(x, y, "text")
    with pytest.raises(pf.SpaceError, match="overlap modality 'audio' is missing from space 'clip'"):
        cls().fit(x, y, "audio")
    with pytest.raises((ValueError, TypeError), match="different names|two pairfree.Space"):
        cls().fit(x, pf.Space("clip", {"text": unit(rng, 30, 5)}), "text")
    with pytest.raises(TypeError, match="expects two pairfree.Space objects"):
        cls().fit(x["text"], y, "text")
