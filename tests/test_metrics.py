import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from pairfree import metrics
from pairfree.metrics import paired_retrieval, retrieval, zero_shot


def unit(rng, n, d):
    # local copy of conftest.unit: `tests` may be shadowed by laion_clap's top-level `tests` package
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(Q, G, pos_sets, ks):
    """Direct per-query loop: pessimistic ranks, sklearn AP."""
    Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    G = G / np.linalg.norm(G, axis=1, keepdims=True)
    firsts, aps = [], []
    for q, pos in zip(Q.astype(np.float64), pos_sets):
        s = G.astype(np.float64) @ q
        y = np.zeros(len(G), bool)
        y[list(pos)] = True
        firsts.append(1 + min(int(np.sum(~y & (s >= s[j]))) for j in pos))  # negatives >= best positive
        aps.append(average_precision_score(y, s))
    out = {f"R@{k}": float(np.mean(np.array(firsts) <= k)) for k in ks}
    out.update(mAP=float(np.mean(aps)), MedR=float(np.median(firsts)))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-12), k


@pytest.fixture(params=["count", "sort"])
def path(request, monkeypatch):
    """Run a test through both per-chunk implementations (counting and per-row sort)."""
    monkeypatch.setattr(metrics, "_SORT_ABOVE", 10**9 if request.param == "count" else 0)
    return request.param


def test_single_positive_matches_brute_force(rng, path):
    G = unit(rng, 120, 16)
    pos = rng.permutation(120)[:80]
    Q = G[pos] + 2.0 * unit(rng, 80, 16)  # noisy copies of the positives: mixed ranks
    ks = (1, 5, 10)
    got = retrieval(Q, G, pos, ks)
    assert_same(got, brute_force(Q, G, [[p] for p in pos], ks))
    assert 0 < got["R@1"] < got["R@10"] < 1 and got["MedR"] > 1


def test_multiple_positives_all_forms_match_sklearn(rng, path):
    n_q, n_g = 60, 90
    Q, G = unit(rng, n_q, 12), unit(rng, n_g, 12)
    sets = [rng.choice(n_g, size=rng.integers(1, 8), replace=False) for _ in range(n_q)]
    mask = np.zeros((n_q, n_g), bool)
    for i, s in enumerate(sets):
        mask[i, s] = True
    ks = (1, 3, 10)
    expected = brute_force(Q, G, sets, ks)
    assert_same(retrieval(Q, G, sets, ks), expected)
    assert_same(retrieval(Q, G, [list(map(int, s)) for s in sets], ks), expected)
    assert_same(retrieval(Q, G, mask, ks), expected)
    # duplicates within a query's list are ignored
    assert_same(retrieval(Q, G, [np.concatenate([s, s[:1]]) for s in sets], ks), expected)
    # 2-D int array: a fixed number of positives per query (e.g. 5 captions per image)
    fixed = np.stack([rng.choice(n_g, 5, replace=False) for _ in range(n_q)])
    assert_same(retrieval(Q, G, fixed, ks), brute_force(Q, G, fixed, ks))


def test_ties_are_pessimistic_and_match_sklearn(rng, path):
    # few distinct gallery vectors -> many exactly tied scores
    base = unit(rng, 5, 6)
    G = base[rng.integers(0, 5, 40)]
    Q = unit(rng, 30, 6)
    sets = [rng.choice(40, size=rng.integers(1, 6), replace=False) for _ in range(30)]
    assert_same(retrieval(Q, G, sets, (1, 5)), brute_force(Q, G, sets, (1, 5)))
    # all scores equal: the positive ranks last, not first
    flat = np.tile(unit(rng, 1, 6), (10, 1))
    r = retrieval(unit(rng, 3, 6), flat, [0, 4, 9], (1, 10))
    assert r["R@1"] == 0 and r["R@10"] == 1 and r["MedR"] == 10 and r["mAP"] == pytest.approx(0.1)


def test_chunked_equals_unchunked(rng):
    Q, G = unit(rng, 301, 32), unit(rng, 257, 32)
    sets = [rng.choice(257, size=rng.integers(1, 40), replace=False) for _ in range(301)]  # both paths
    full = retrieval(Q, G, sets, chunk_size=10**6)
    for c in (1, 7, 64, None):
        assert retrieval(Q, G, sets, chunk_size=c) == full


def test_perfect_retrieval(rng, path):
    Z = unit(rng, 50, 16)
    r = retrieval(Z, Z, np.arange(50))
    assert r == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "mAP": 1.0, "MedR": 1.0}
    rows = np.repeat(Z, 3, axis=0)  # 3 identical gallery copies per query, all positive: ties cost nothing
    r = retrieval(Z, rows, [np.arange(3 * i, 3 * i + 3) for i in range(50)], (1,))
    assert r == {"R@1": 1.0, "mAP": 1.0, "MedR": 1.0}


def test_inputs_are_normalised_to_cosine(rng):
    Q, G = unit(rng, 20, 8), unit(rng, 30, 8)
    pos = rng.integers(0, 30, 20)
    scale = rng.uniform(0.1, 10, (30, 1))
    assert retrieval(Q * 3.0, G * scale, pos) == retrieval(Q, G, pos)


def exact_unit(rng, n, d=5):
    """Unit rows with four entries of +-1/2: every dot product is exact, so ties are real ties."""
    x = np.zeros((n, d))
    for row in x:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_q=st.integers(1, 12),
    n_g=st.integers(1, 25),
    sort_above=st.sampled_from([0, 10**9]),
    chunk=st.integers(1, 13),
)
def test_property_matches_brute_force(seed, n_q, n_g, sort_above, chunk):
    rng = np.random.default_rng(seed)
    Q, G = exact_unit(rng, n_q), exact_unit(rng, n_g)  # cosines are multiples of 1/4: frequent exact ties
    mask = rng.random((n_q, n_g)) < 0.3
    mask[np.arange(n_q), rng.integers(0, n_g, n_q)] = True
    old = metrics._SORT_ABOVE
    metrics._SORT_ABOVE = sort_above
    try:
        got = retrieval(Q, G, mask, (1, 2, 5), chunk_size=chunk)
    finally:
        metrics._SORT_ABOVE = old
    assert_same(got, brute_force(Q, G, [np.flatnonzero(m) for m in mask], (1, 2, 5)))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(gallery=np.ones((5, 3))), r"queries have dim 4 but gallery has dim 3"),
        (dict(queries=np.zeros((0, 4))), r"queries: empty"),
        (dict(gallery=np.zeros((0, 4))), r"gallery: empty"),
        (dict(positives=np.array([0, 1, 5])), r"query 2 has gallery index 5, out of range for a gallery of 5"),
        (dict(positives=np.array([0, -1, 2])), r"query 1 has gallery index -1"),
        (dict(positives=np.array([0, 1])), r"positives: expected shape \(3,\)"),
        (dict(positives=[[0], [], [1]]), r"query 1 has no positive"),
        (dict(positives=[[0], [1]]), r"positives: got 2 entries for 3 queries"),
        (dict(positives=np.zeros((3, 4), bool)), r"boolean matrix must have shape .* \(3, 5\)"),
        (dict(positives=np.eye(3, 5, dtype=bool) & False), r"query 0 has no positive"),
        (dict(positives=np.array([0.0, 1.0, 2.0])), r"positives: expected integer gallery indices"),
        (dict(positives=[[0], [1.5], [2]]), r"positives\[1\]: expected integer"),
        (dict(ks=(0, 5)), r"ks: expected a non-empty sequence of positive integers"),
        (dict(ks=()), r"ks: expected"),
        (dict(chunk_size=0), r"chunk_size"),
        (dict(queries=np.ones(4)), r"queries: expected a 2-D array"),
    ],
)
def test_retrieval_errors_name_the_argument(kwargs, msg):
    args = dict(queries=np.ones((3, 4)), gallery=np.eye(5, 4) + 0.1, positives=np.array([0, 1, 2]))
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        retrieval(**args)


def test_paired_retrieval_index_and_label(rng):
    n = 40
    labels = rng.integers(0, 6, n)
    za, zb = unit(rng, n, 8), unit(rng, n, 8)
    r = paired_retrieval(za, zb, ks=(1, 5))
    assert r["a_to_b"] == retrieval(za, zb, np.arange(n), (1, 5))
    assert r["b_to_a"] == retrieval(zb, za, np.arange(n), (1, 5))
    same = labels[:, None] == labels[None, :]
    r = paired_retrieval(za, zb, labels, ks=(1, 5))  # labels given: "label" by default
    assert r == paired_retrieval(za, zb, labels, positives="label", ks=(1, 5))
    assert r["a_to_b"] == retrieval(za, zb, same, (1, 5))
    assert r["b_to_a"] == retrieval(zb, za, same, (1, 5))
    strings = np.array(["cat", "dog", "owl", "eel", "bee", "ant"])[labels]
    assert paired_retrieval(za, zb, strings, ks=(1, 5)) == r
    with pytest.raises(ValueError, match="za has 40 rows but zb has 39"):
        paired_retrieval(za, zb[:-1])
    with pytest.raises(ValueError, match="za has dim 8 but zb has dim 7"):
        paired_retrieval(za, zb[:, :7])
    with pytest.raises(ValueError, match="positives='label' needs labels"):
        paired_retrieval(za, zb, positives="label")
    with pytest.raises(ValueError, match="labels are only used with positives='label'"):
        paired_retrieval(za, zb, labels, positives="index")
    with pytest.raises(ValueError, match=r"labels: expected shape \(40,\)"):
        paired_retrieval(za, zb, labels[:-1])
    with pytest.raises(ValueError, match="expected 'index' or 'label'"):
        paired_retrieval(za, zb, positives="caption")


def test_zero_shot_matches_direct_computation(rng):
    n, c, t, d = 200, 7, 5, 16
    class_text = unit(rng, c * t, d).reshape(c, t, d)
    centres = class_text.mean(axis=1)
    labels = rng.integers(0, c, n)
    X = centres[labels] + 0.35 * rng.standard_normal((n, d))
    got = zero_shot(X, class_text, labels)
    # direct: average templates, re-normalise, cosine, top-k
    C = class_text.astype(np.float64).mean(axis=1)
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    order = np.argsort(-(Xn @ C.T), axis=1)
    expected = {f"Acc@{k}": float(np.mean([labels[i] in order[i, :k] for i in range(n)])) for k in (1, 3, 5)}
    assert got == expected
    assert 0 < got["Acc@1"] < got["Acc@3"] < 1
    # (n_classes, d) class vectors; chunking does not change anything
    assert zero_shot(X, C, labels) == expected
    assert zero_shot(X, class_text, labels, chunk_size=3) == expected
    # templates are normalised, averaged, then re-normalised: scaling templates changes nothing
    assert zero_shot(X, class_text * rng.uniform(0.5, 2, (c, t, 1)), labels) == expected
    assert zero_shot(X, class_text, labels, ks=(1, 7)) == {"Acc@1": expected["Acc@1"], "Acc@7": 1.0}


def test_zero_shot_ties_and_errors(rng):
    X = unit(rng, 4, 3)
    same = np.tile(unit(rng, 1, 3), (3, 1))  # three identical classes: pessimistic rank 3
    assert zero_shot(X, same, [0, 1, 2, 0], ks=(1, 2, 3)) == {"Acc@1": 0.0, "Acc@2": 0.0, "Acc@3": 1.0}
    ct = unit(rng, 6, 3).reshape(3, 2, 3)
    with pytest.raises(ValueError, match=r"labels: label 3 at row 1 is out of range for 3 classes"):
        zero_shot(X, ct, [0, 3, 1, 1])
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        zero_shot(X, ct, [0, 1])
    with pytest.raises(ValueError, match="embeddings have dim 3 but class_text has dim 2"):
        zero_shot(X, ct[:, :, :2], [0, 1, 2, 0])
    with pytest.raises(ValueError, match="class_text: expected shape"):
        zero_shot(X, ct[None], [0, 1, 2, 0])
    with pytest.raises(ValueError, match="class_text: empty"):
        zero_shot(X, ct[:, :0], [0, 1, 2, 0])
    with pytest.raises(ValueError, match="class 1 average to zero"):
        zero_shot(X, np.stack([ct[0], np.stack([ct[1, 0], -ct[1, 0]]), ct[2]]), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="embeddings: empty"):
        zero_shot(np.zeros((0, 3)), ct, [])
    with pytest.raises(ValueError, match="labels: expected integer"):
        zero_shot(X, ct, [0.0, 1.0, 2.0, 0.0])
