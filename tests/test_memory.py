import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pairfree.memory import aggregate, aggregate_dense, cached_aggregate
from pf_testing import unit


@pytest.mark.parametrize("qc,mc", [(4096, 32768), (7, 13), (100, 1)])
def test_exact_matches_dense(rng, qc, mc):
    q, m = unit(rng, 300, 24), unit(rng, 700, 24)
    np.testing.assert_allclose(aggregate(q, m, query_chunk=qc, memory_chunk=mc), aggregate_dense(q, m), atol=2e-5)


def test_values_carried_across_aligned_rows(rng):
    q, keys, vals = unit(rng, 100, 16), unit(rng, 400, 16), unit(rng, 400, 10)
    a, b = aggregate(q, keys, [keys, vals], memory_chunk=64)
    np.testing.assert_allclose(a, aggregate_dense(q, keys), atol=2e-5)
    np.testing.assert_allclose(b, aggregate_dense(q, keys, vals), atol=2e-5)


def test_stable_at_tiny_temperature(rng):
    # scores / tau reach 1e4: a naive exp overflows; log-sum-exp must not
    q, m = unit(rng, 50, 8), unit(rng, 200, 8)
    out = aggregate(q, m, tau=1e-4, memory_chunk=17)
    assert np.isfinite(out).all()
    nearest = m[np.argmax(q @ m.T, axis=1)]
    np.testing.assert_allclose(out, nearest, atol=1e-4)


def test_topk_close_to_exact_with_small_tau(rng):
    q, m = unit(rng, 200, 32), unit(rng, 3000, 32)
    exact = aggregate(q, m)
    approx = aggregate(q, m, method="topk", k=256, memory_chunk=500)
    cos = (exact * approx).sum(1)
    assert cos.min() > 0.999


def test_memmap_and_torch_inputs(rng, tmp_path):
    q, m = unit(rng, 64, 8), unit(rng, 256, 8)
    np.save(tmp_path / "m.npy", m)
    mm = np.load(tmp_path / "m.npy", mmap_mode="r")
    ref = aggregate_dense(q, m)
    np.testing.assert_allclose(aggregate(torch.from_numpy(q), mm, resident_bytes=0, memory_chunk=50), ref, atol=2e-5)


def test_errors(rng):
    with pytest.raises(ValueError, match="dim 8 but keys have dim 4"):
        aggregate(unit(rng, 3, 8), unit(rng, 3, 4))
    with pytest.raises(ValueError, match="values\\[0\\] has 2 rows"):
        aggregate(unit(rng, 3, 8), unit(rng, 3, 8), [unit(rng, 2, 8)])


def test_cache_round_trip(rng, tmp_path):
    q, m = unit(rng, 30, 8), unit(rng, 90, 8)
    a = cached_aggregate(tmp_path, q, m, tau=0.01)
    assert len(list(tmp_path.glob("agg-*.npy"))) == 1
    b = cached_aggregate(tmp_path, q, m, tau=0.01)
    np.testing.assert_array_equal(a, b)
    cached_aggregate(tmp_path, q, m, tau=0.02)
    assert len(list(tmp_path.glob("agg-*.npy"))) == 2


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 90), d=st.integers(1, 12), mc=st.integers(1, 50),
       tau=st.sampled_from([0.01, 0.1, 1.0]), seed=st.integers(0, 2**16))
def test_property_matches_dense(n, m, d, mc, tau, seed):
    r = np.random.default_rng(seed)
    q, mem = unit(r, n, d), unit(r, m, d)
    np.testing.assert_allclose(aggregate(q, mem, tau=tau, memory_chunk=mc, query_chunk=7),
                               aggregate_dense(q, mem, tau=tau), atol=5e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_host_rows_converts_like_numpy_for_slices_and_index_arrays(rng, tmp_path, dtype):
    """Rows of a memory-mapped array of any dtype as float32: the values numpy's own conversion gives (float16
    and float64 go through torch, which converts them 8x faster), for a slice and for an index array."""
    from pairfree.memory import host_rows

    x = (rng.standard_normal((300, 24)) * (100 if dtype == np.int32 else 1)).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    for rows in (slice(17, 250), np.sort(rng.choice(300, 90, replace=False))):
        got = host_rows(mm, rows)
        assert got.dtype == np.float32 and got.shape == x[rows].shape
        np.testing.assert_array_equal(got, np.asarray(x[rows], dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_put_rows_writes_what_numpy_assignment_writes(rng, tmp_path, dtype):
    """Rows written into a memory-mapped pool (torch converts float32 to float16 ~10x faster than numpy)
    hold exactly numpy's values, for a slice and an unsorted index array, float16's overflow to inf and its
    subnormals included; other dtypes and non-numpy outputs are assigned as numpy would; nothing else moves."""
    from pairfree.memory import put_rows

    r = torch.from_numpy(rng.standard_normal((90, 24)).astype(np.float32))
    r[0, :3] = torch.tensor([7e4, -1e5, 3e-6])  # beyond float16's range, and a float16 subnormal
    if dtype == np.int32:
        r = (r * 100).round()
    for rows in (slice(17, 107), rng.choice(300, 90, replace=False)):
        want = np.full((300, 24), 5, dtype=dtype)
        with np.errstate(over="ignore"):
            want[rows] = r.numpy()
        out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=dtype, shape=(300, 24))
        out[:] = 5
        put_rows(out, rows, r)
        out.flush()
        np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)
    boxed = [None] * 3  # not an array: assigned as it is
    put_rows(boxed, slice(0, 1), r[:1])
    assert np.array_equal(boxed[0], r[0].numpy())
