"""Aggregation at scale: every kernel and method against the dense reference, low precision within its
measured tolerance, the calibrated IVF approximation within its reported bound, and the Ray path equal
to the local one."""

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from pairfree import memory
from pairfree.ivf import IVFSettings
from pairfree.memory import aggregate, aggregate_dense, cached_aggregate
from pf_testing import clustered, unit


@pytest.fixture
def world(rng):
    """A clustered memory (400 clusters) with aligned values, and queries across a modality gap."""
    d = 32
    centres = unit(rng, 400, d)
    gap = 0.6 * unit(rng, 1, d)[0]
    return {"q": clustered(rng, 1500, d, centres, offset=gap), "k": clustered(rng, 6000, d, centres),
            "v": unit(rng, 6000, 20)}


@pytest.mark.parametrize("kernel", ["sdpa", "chunked"])
@pytest.mark.parametrize("memory_chunk", [None, 777])
def test_exact_kernels_match_dense_with_values_of_other_widths(world, kernel, memory_chunk):
    q, k, v = world["q"][:300], world["k"], world["v"]
    a, b = aggregate(q, k, [k, v], kernel=kernel, memory_chunk=memory_chunk, query_chunk=128)
    np.testing.assert_allclose(a, aggregate_dense(q, k), atol=1e-5)
    np.testing.assert_allclose(b, aggregate_dense(q, k, v), atol=1e-5)


def test_sdpa_merges_memory_chunks_exactly_through_log_sum_exp(world):
    """A memory streamed in chunks (larger than the resident budget) gives the one-chunk result."""
    q, k = world["q"][:200], world["k"]
    whole = aggregate(q, k, kernel="sdpa")
    streamed = aggregate(q, k, kernel="sdpa", memory_chunk=500, resident_bytes=0)
    np.testing.assert_allclose(streamed, whole, atol=2e-6)


@pytest.mark.parametrize("kernel", ["sdpa", "chunked"])
def test_bf16_within_its_measured_tolerance(world, kernel):
    """bf16 inputs, fp32 accumulation: at d = 32 and an effective neighbourhood of ~2 rows (a harsh
    case: rounding the inputs moves a logit by ~0.03) the mean cosine to exact stays >= 0.9999 and the
    worst >= 0.998; benchmarks/aggregate.py measures d = 512. Both kernels land within 1e-5 of each
    other: the chunked kernel's in-GEMM shift removes the error of rounding the logits themselves."""
    q, k = world["q"], world["k"]
    exact = aggregate_dense(q, k)
    approx = aggregate(q, k, kernel=kernel, dtype="bfloat16", memory_chunk=1000)
    cos = (exact * approx).sum(1)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.998, (cos.mean(), cos.min())
    other = aggregate(q, k, kernel="sdpa" if kernel == "chunked" else "chunked", dtype="bfloat16", memory_chunk=1000)
    assert abs((exact * other).sum(1).mean() - cos.mean()) < 1e-5


@pytest.mark.skipif(memory._flash_cpu() is None, reason="this torch has no CPU flash-attention kernel")
@pytest.mark.parametrize(("dtype", "two_values", "kernel"), [
    ("float32", False, "sdpa"), ("float32", True, "chunked"), ("bfloat16", False, "chunked"),
    ("float16", False, "sdpa"), ("float16", True, "sdpa")])
def test_auto_picks_the_faster_cpu_kernel(world, dtype, two_values, kernel):
    """On a CPU (README, Performance): the flash kernel for fp32 with the keys as the only value, the
    shifted chunked kernel for bf16 and for several fp32 values, and the flash kernel for every float16
    job (there the chunked kernel runs at 2.8 GFLOP/s, the flash kernel at ~100: torch's CPU fp16 arithmetic is slow)."""
    q, k, v = world["q"][:200], world["k"], world["v"]
    report: dict = {}
    out = aggregate(q, k, [k, v] if two_values else k, dtype=dtype, report=report)
    assert report["kernel"] == kernel
    first = out[0] if two_values else out
    assert (first * aggregate_dense(q, k)).sum(1).mean() >= 0.9999


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("tau", [0.01, 1e-3])
def test_chunked_kernel_raises_a_shift_the_first_block_set_too_low(world, monkeypatch, dtype, tau):
    """The memory sorted from least to most similar to the queries: every later block holds rows above
    the shift the first block set (at τ = 1e-3 far enough to overflow exp), so queries are rescaled
    again and again; the result still equals the dense reference (fp32: 1e-5 at τ = 0.01, and no
    further from it than the fused kernel; bf16: the fused kernel's mean cosine to 1e-5, and its worst to 1e-3)."""
    q = world["q"][:256]
    k = world["k"][np.argsort(world["k"] @ q.mean(0))]
    rescaled = []
    real = memory._shifted_block

    def spy(q_, k_, vs, shift, tot, accs):
        before = shift.clone()
        real(q_, k_, vs, shift, tot, accs)
        rescaled.append(int((shift != before).sum()))

    monkeypatch.setattr(memory, "CPU_SCORE_BLOCK", (64, 200))
    monkeypatch.setattr(memory, "_shifted_block", spy)
    out = aggregate(q, k, tau=tau, kernel="chunked", dtype=dtype)
    assert sum(rescaled) > len(q)
    exact = aggregate_dense(q, k, tau=tau)
    fused = aggregate(q, k, tau=tau, kernel="sdpa", dtype=dtype)
    if dtype == "float32":  # fp32 logits of ~1/τ carry ~1e-7/τ: the fused kernel is off by as much
        np.testing.assert_allclose(out, exact, atol=1e-5 * 0.01 / tau)
        assert np.abs(out - exact).max() <= 1.5 * np.abs(fused - exact).max() + 1e-6
    else:
        assert abs((exact * out).sum(1).mean() - (exact * fused).sum(1).mean()) < 1e-5
        assert (exact * out).sum(1).min() >= (exact * fused).sum(1).min() - 1e-3  # bf16 at τ = 1e-3: ~0.94 both


def test_topk_rescored_in_fp32(world):
    q, k = world["q"][:300], world["k"]
    exact = aggregate_dense(q, k)
    for dtype in ("float32", "bfloat16"):
        cos = (aggregate(q, k, method="topk", k=512, dtype=dtype) * exact).sum(1)
        assert cos.min() > 0.999


def test_out_arrays_float16_and_shape_checked(world, tmp_path):
    q, k = world["q"][:100], world["k"]
    out = np.lib.format.open_memmap(tmp_path / "o.npy", mode="w+", dtype=np.float16, shape=(100, 32))
    res = aggregate(q, k, out=out)
    assert res is out
    np.testing.assert_allclose(out.astype(np.float32), aggregate_dense(q, k), atol=2e-3)
    with pytest.raises(ValueError, match="out must be 1 array"):
        aggregate(q, k, out=np.zeros((99, 32), np.float32))


def test_auto_is_exact_below_the_threshold_and_ivf_above(world, monkeypatch):
    q, k = world["q"][:50], world["k"]
    rep = {}
    aggregate(q, k, method="auto", report=rep)
    assert rep["method"] == "exact"
    monkeypatch.setattr(memory, "AUTO_EXACT_PAIRS", 10)
    rep = {}
    aggregate(q, k, method="auto", report=rep, ivf=IVFSettings(lists=40))
    assert rep["method"] == "ivf"


def test_ivf_with_every_list_probed_is_exact(world):
    q, k, v = world["q"][:300], world["k"], world["v"]
    rep = {}
    a, b = aggregate(q, k, [k, v], method="ivf", ivf=IVFSettings(lists=30, probes=30), report=rep)
    np.testing.assert_allclose(a, aggregate_dense(q, k), atol=1e-5)
    np.testing.assert_allclose(b, aggregate_dense(q, k, v), atol=1e-5)
    assert rep["dropped_mass"]["max"] < 1e-6 and rep["work_fraction"] == pytest.approx(1.0)


def test_ivf_bf16_within_the_bf16_tolerance_and_calibrated_with_it(world):
    """bf16 list GEMMs (the shift folded into the score GEMM, fp32 sums): with every list probed, the
    tolerance of the exact bf16 kernels in the same harsh case, and their accuracy to 2e-5 for values
    of another width too (whose bf16 rounding costs more: mean 0.99989 for every kernel here)."""
    q, k, v = world["q"], world["k"], world["v"]
    rep = {}
    a, b = aggregate(q, k, [k, v], method="ivf", dtype="bfloat16", ivf=IVFSettings(lists=30, probes=30), report=rep)
    fused = aggregate(q, k, [k, v], kernel="chunked", dtype="bfloat16", memory_chunk=1000)
    for got, ref, val in ((a, fused[0], k), (b, fused[1], v)):
        exact = aggregate_dense(q, k, val)
        cos = (got * exact).sum(1)
        assert abs(cos.mean() - (ref * exact).sum(1).mean()) < 2e-5 and cos.min() >= 0.995, (cos.mean(), cos.min())
    cos = (a * aggregate_dense(q, k)).sum(1)
    assert cos.mean() >= 0.9999 and cos.min() >= 0.998, (cos.mean(), cos.min())
    assert rep["dtype"] == "bfloat16"
    # calibrated in bf16: the reported cosine to exact is what bf16 delivers
    rep = {}
    out = aggregate(q, k, method="ivf", dtype="bfloat16", ivf=IVFSettings(lists=40, min_cosine=0.99, exact_above=1,
                                                                          sample=600), report=rep)
    cos = (out * aggregate_dense(q, k)).sum(1)
    assert cos.mean() >= 0.99 and abs(cos.mean() - rep["cosine_to_exact"]["mean"]) < 3e-3
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        aggregate(q, k, method="ivf", dtype="float16", ivf=IVFSettings(lists=30, probes=30))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ivf_redoes_queries_whose_shifted_weights_overflow(world, monkeypatch, dtype):
    """At τ = 1e-3 a row 0.09 above its query's nearest centroid score overflows exp() after the shift:
    those queries are redone with a running max, and every query still equals the dense reference."""
    from pairfree.ivf import ProbedMemory

    q, k = world["q"][:300], world["k"]
    redone = []
    online = ProbedMemory._aggregate_online
    monkeypatch.setattr(ProbedMemory, "_aggregate_online",
                        lambda self, qq, lists, tau: redone.append(len(qq)) or online(self, qq, lists, tau))
    out = aggregate(q, k, method="ivf", tau=1e-3, dtype=dtype, ivf=IVFSettings(lists=30, probes=30))
    assert sum(redone) > 0  # the case is exercised
    exact = aggregate_dense(q, k, tau=1e-3)
    if dtype == "float32":  # as close as the exact fp32 kernels get (fp32 logits x 1000: 3.2e-5 here)
        np.testing.assert_allclose(out, aggregate(q, k, tau=1e-3, kernel="chunked"), atol=2e-6)
        np.testing.assert_allclose(out, exact, atol=5e-5)
    else:
        assert (out * exact).sum(1).mean() >= 0.999


def test_ivf_calibration_meets_its_bound_and_reports_the_truth(rng):
    """On a clearly clustered memory (50 clusters) the calibrated probes skip most of the work, the
    dropped mass on queries it was not calibrated on stays near the bound, and the reported cosine to
    exact is what all queries get."""
    centres = unit(rng, 50, 32)
    q = clustered(rng, 1500, 32, centres, 0.2, offset=0.6 * unit(rng, 1, 32)[0])
    k = clustered(rng, 6000, 32, centres, 0.2)
    rep = {}
    approx = aggregate(q, k, method="ivf", ivf=IVFSettings(lists=60, max_dropped=0.01, sample=1000), report=rep)
    exact = aggregate_dense(q, k)
    cos = (approx * exact).sum(1)
    assert rep["probes"] < 15 and rep["work_fraction"] < 0.25  # it does skip work
    assert rep["dropped_mass"]["mean"] <= 0.01
    assert cos.mean() >= 0.999
    assert abs(cos.mean() - rep["cosine_to_exact"]["mean"]) < 2e-3  # the report tells the truth
    # a tighter bound scans more and gets closer
    rep2 = {}
    tight = aggregate(q, k, method="ivf", ivf=IVFSettings(lists=60, max_dropped=1e-9, sample=1000), report=rep2)
    assert rep2["probes"] > rep["probes"] and (tight * exact).sum(1).mean() >= cos.mean()


def test_ivf_runs_exact_when_the_mass_is_spread(world, monkeypatch):
    """On a memory whose softmax mass spreads over most lists, scanning lists would cost more than the
    fused exact kernel: it runs exact (and says why), and `min_cosine` trades accuracy explicitly. Where
    exact takes hours (above AUTO_EXACT_PAIRS, lowered here to this size) it also warns, naming the way out."""
    q, k = world["q"][:600], world["k"]
    rep = {}
    settings = IVFSettings(lists=40, exact_above=0.2, sample=600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # at this size, no warning: exact takes a moment
        out = aggregate(q, k, method="ivf", ivf=settings, report=rep)
    assert rep["ran"] == "exact" and "scan" in rep["why"]
    np.testing.assert_allclose(out, aggregate_dense(q, k), atol=1e-5)
    # the accuracy stated is the run's (exact); what the probes would have given is kept apart
    assert rep["cosine_to_exact"]["min"] == 1.0 and rep["dropped_mass"]["max"] == 0.0
    assert rep["probes_measured"]["cosine_to_exact"]["mean"] < 1 and rep["probes_measured"]["dropped_mass"]["p99"] > 0
    monkeypatch.setattr(memory, "AUTO_EXACT_PAIRS", len(q) * len(k) - 1)
    with pytest.warns(RuntimeWarning, match=r"probes scan \d+% .*600 x .* run exact; .*min_cosine=0.999 with "
                                            r"select='groups' \(--aggregation-min-cosine 0.999"):
        aggregate(q, k, method="ivf", ivf=settings)
    rep = {}
    cheap = aggregate(q, k, method="ivf", ivf=IVFSettings(lists=40, min_cosine=0.99, exact_above=1, sample=600),
                      report=rep)
    cos = (cheap * aggregate_dense(q, k)).sum(1)
    # the target holds on the queries that did not calibrate (the margin of `_lower_bound`)
    assert "ran" not in rep and rep["probes"] < 40 and rep["cosine_to_exact"]["mean"] >= 0.99 and cos.mean() >= 0.99


def test_ivf_partition_and_report_are_cached(world, tmp_path):
    q, k = world["q"][:400], world["k"]
    settings = IVFSettings(lists=40, cache_dir=str(tmp_path))
    rep = {}
    a = cached_aggregate(tmp_path, q, k, method="ivf", ivf=settings, report=rep)
    assert len(list(tmp_path.glob("ivf-partition-*.npz"))) == 1 and rep["method"] == "ivf"
    rep2 = {}
    b = cached_aggregate(tmp_path, q, k, method="ivf", ivf=settings, report=rep2)
    np.testing.assert_array_equal(a, b)
    assert rep2["cached"] and rep2["probes"] == rep["probes"]
    # another bound is another result: its own entry
    cached_aggregate(tmp_path, q, k, method="ivf", ivf=IVFSettings(lists=40, max_dropped=0.2, cache_dir=str(tmp_path)))
    assert len(list(tmp_path.glob("agg-*-0.npy"))) == 2


def test_ivf_takes_torch_tensors_of_any_float_dtype(world, tmp_path):
    """Tensors (bfloat16 here; on a GPU, CUDA tensors) take the same path as the numpy arrays they hold:
    the partition's training sample, the calibration sample and the query blocks come to the host."""
    import torch

    q, k, v = (torch.from_numpy(world[n][:m]).bfloat16() for n, m in (("q", 400), ("k", 6000), ("v", 6000)))
    settings = IVFSettings(lists=40, min_cosine=0.99, exact_above=1, cache_dir=str(tmp_path))
    rep_t, rep_n = {}, {}
    a = cached_aggregate(tmp_path, q, k, [k, v], method="ivf", ivf=settings, report=rep_t)
    b = aggregate(q.float().numpy(), k.float().numpy(), [k.float().numpy(), v.float().numpy()], method="ivf",
                  ivf=IVFSettings(lists=40, min_cosine=0.99, exact_above=1), report=rep_n)
    assert rep_t["probes"] == rep_n["probes"] < 40
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(x, dtype=np.float32), y, atol=1e-6)


def test_float16_memories_give_float16_cached_results(world, tmp_path):
    q, k = world["q"][:100].astype(np.float16), world["k"].astype(np.float16)
    out = cached_aggregate(tmp_path, q, k)
    assert out.dtype == np.float16 and isinstance(out, np.memmap)
    np.testing.assert_allclose(out.astype(np.float32), aggregate_dense(q.astype(np.float32), k.astype(np.float32)),
                               atol=3e-3)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


def test_ray_shards_equal_the_local_path(world, local_ray, tmp_path):
    """Query shards as tasks on a local 2-CPU Ray, the memory put once: exact and ivf (fp32 and bf16)
    results equal the local ones (<= 1e-6), and the cached entry they write is the one the local path reads."""
    centres = unit(np.random.default_rng(5), 50, 32)
    q = clustered(np.random.default_rng(6), 1500, 32, centres, 0.2)
    k = clustered(np.random.default_rng(7), 6000, 32, centres, 0.2)
    v = world["v"]
    for kwargs in ({}, {"method": "ivf", "ivf": IVFSettings(lists=40)},
                   {"method": "ivf", "ivf": IVFSettings(lists=40), "dtype": "bfloat16"}):
        local = aggregate(q, k, [k, v], **kwargs)
        rep = {}
        remote = aggregate(q, k, [k, v], backend="ray", report=rep, **kwargs)
        assert rep["backend"] == "ray" and rep["shards"] == 2 and "ran" not in rep
        for a, b in zip(local, remote):
            np.testing.assert_allclose(b, a, atol=1e-6)
    rep = {}  # calibrated probes that would scan more than exact_above: exact shards, reported as the local path
    remote = aggregate(q, k, backend="ray", report=rep, method="ivf", ivf=IVFSettings(lists=40, exact_above=0.01))
    assert rep["ran"] == "exact" and "scan" in rep["why"] and rep["cosine_to_exact"]["min"] == 1.0
    assert rep["probes_measured"]["cosine_to_exact"]["mean"] < 1
    np.testing.assert_allclose(remote, aggregate(q, k), atol=1e-6)
    first = cached_aggregate(tmp_path, q, k, backend="ray")
    rep = {}
    again = cached_aggregate(tmp_path, q, k, report=rep)  # local, same settings: a cache hit
    assert rep.get("cached") and len(list(tmp_path.glob("agg-*.npy"))) == 1
    np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ray_groups_equal_the_local_path(world, local_ray, dtype):
    """select="groups" on Ray: the driver groups all queries and calibrates, tasks run whole batches of groups
    against the memory put once (bf16 as its bits). Rows, work and measured cosines are the local run's, and the
    results equal those of a local run with the tasks' one thread bit for bit. Against the local run on two
    threads they differ in fp32 by the summation order of MKL's threaded GEMMs over a group's few queries (up
    to 7e-6 here, as much as a local run on one thread differs from one on two); bf16 matches it exactly.
    With `redo`, each query's error estimate comes back from its task and the queries of largest estimate are
    redone exactly as query shards. Where calibration falls back to exact, that runs as query shards too."""
    import torch

    centres = unit(np.random.default_rng(5), 50, 32)
    q = clustered(np.random.default_rng(6), 3000, 32, centres, 0.2)
    k = clustered(np.random.default_rng(7), 6000, 32, centres, 0.2)
    v = world["v"]
    settings = IVFSettings(lists=40, select="groups", group_size=16, min_cosine=0.99, sample=600, redo=0.02)
    rep_local, rep_ray = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rep_one = {}
    try:
        one_thread = aggregate(q, k, [k, v], method="ivf", ivf=settings, dtype=dtype, report=rep_one)
    finally:
        torch.set_num_threads(threads)
    local = aggregate(q, k, [k, v], method="ivf", ivf=settings, dtype=dtype, report=rep_local)
    remote = aggregate(q, k, [k, v], method="ivf", ivf=settings, dtype=dtype, backend="ray", report=rep_ray)
    assert rep_ray["backend"] == "ray" and rep_ray["shards"] == 2 and rep_local["groups"] > 2 * 64
    for key in ("rows", "groups", "work_fraction", "cosine_to_exact"):
        assert rep_ray[key] == rep_local[key], key
    # each query's error estimate comes back from the tasks: the same queries are redone (as query shards)
    assert rep_ray["redo"]["queries"] == 60 and rep_ray["error_estimate"] == rep_one["error_estimate"]
    # calibration's kept selections are built by one-thread tasks: its trials are the one-thread run's
    assert rep_ray["calibration_trials"] == rep_one["calibration_trials"]
    for a, b in zip(rep_ray["calibration_trials"], rep_local["calibration_trials"], strict=True):
        assert a["rows"] == b["rows"] and a["mean"] == pytest.approx(b["mean"], abs=2e-6)
    assert {"calibration_reference", "check_reference"} <= set(rep_ray["seconds"])
    assert 0 < rep_ray["seconds_in_ray_tasks"] < sum(rep_ray["seconds"][k] for k in ("grouping", "choose_rows",
                                                                                   "check_reference", "aggregation"))
    assert rep_local["rows"] < 6000 and "ran" not in rep_ray
    for a, b, c in zip(local, remote, one_thread):
        np.testing.assert_array_equal(b, c)
        np.testing.assert_allclose(b, a, atol=1e-6 if dtype == "bfloat16" else 2e-5)
    fallback = IVFSettings(lists=40, select="groups", group_size=16, min_cosine=0.99, exact_above=0.01)
    rep = {}
    remote = aggregate(q, k, v, method="ivf", ivf=fallback, dtype=dtype, backend="ray", report=rep)
    assert rep["ran"] == "exact" and rep["shards"] == 2
    np.testing.assert_allclose(remote, aggregate(q, k, v, dtype=dtype), atol=1e-6)


@pytest.mark.parametrize("size", [64, 1])
def test_ray_grouping_equals_the_local_one(local_ray, size):
    """Grouping with `runner=RayGroups` (nearest centroids and moves as tasks of whole blocks, the cells' splits
    as tasks of whole cells, the sums on the driver) on float16 queries: the groups and their means equal a
    local grouping on the tasks' one thread bit for bit, and a two-thread one within float rounding. Size 1
    splits every cell into more than 64 parts (k-means in two stages)."""
    import torch

    from pairfree.distributed import RayGroups
    from pairfree.grouped import query_groups

    rng = np.random.default_rng(11)
    centres = unit(rng, 40, 32)
    q = clustered(rng, 5000, 32, centres, 0.2).astype(np.float16)
    cent = torch.from_numpy(unit(rng, 30, 32))
    kw = dict(block=512, dtype=torch.bfloat16, regroup=0.3)
    runner = RayGroups(max_queries=1024)
    remote = query_groups(q, cent, size, runner=runner, **kw)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = query_groups(q, cent, size, **kw)
    finally:
        torch.set_num_threads(threads)
    local = query_groups(q, cent, size, **kw)
    assert len(remote) == len(one_thread) == len(local) >= len(q) / max(size, 100)
    for a, b, c in zip(remote, one_thread, local):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(remote.means.numpy(), one_thread.means.numpy())
    np.testing.assert_allclose(remote.means.numpy(), local.means.numpy(), atol=1e-6)


def test_ray_references_equal_the_local_exact_ones(rng, local_ray):
    """Calibration's exact references as Ray query shards (`RayGroups.reference`): against a float16 memory map
    in fp32 (the check's) and against the memory's bf16 copy in bf16 (calibration's), with the keys among the
    values, equal to the local exact aggregates (<= 1e-6); each memory is put once however often it is used,
    and one used with keep=False is released after."""
    import torch

    from pairfree.distributed import RayGroups

    k = clustered(rng, 5000, 32, unit(rng, 30, 32), 0.2).astype(np.float16)
    v = rng.standard_normal((5000, 8)).astype(np.float16)
    q = clustered(rng, 301, 32, unit(rng, 30, 32), 0.2)
    runner = RayGroups()
    got = runner.reference(q, k, [k, v], tau=0.05, dtype=torch.float32)
    want = aggregate(q, k, [k, v], tau=0.05, normalize=False)
    kb, vb = torch.from_numpy(k).to(torch.bfloat16), torch.from_numpy(v).to(torch.bfloat16)
    got_bf16 = runner.reference(q, kb, [kb, vb], tau=0.05, dtype=torch.bfloat16)
    want_bf16 = aggregate(q, kb, [kb, vb], tau=0.05, normalize=False, dtype=torch.bfloat16)
    runner.reference(q[:5], kb, [kb, vb], tau=0.05, dtype=torch.bfloat16)
    assert len(runner._refs) == 4
    runner.reference(q[:5], k[:100], [k[:100]], tau=0.05, dtype=torch.float32, keep=False)  # released after
    assert len(runner._refs) == 4
    for a, b in zip(got + got_bf16, want + want_bf16):
        assert a.shape == b.shape and a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), b, atol=1e-6)


@pytest.mark.parametrize("tail", ["sampled", "mean"])
def test_ray_kept_selections_equal_the_local_ones(local_ray, tail):
    """Calibration's kept selections built as Ray tasks (`RayGroups.kept`: whole batches of the sample's
    groups, float16 queries, bf16 memory put once) and joined on the driver: every group's sample queries,
    rows, tails and block sums equal a local `KeptSelections` on the tasks' one thread bit for bit, so every
    trial reads the same cosines; three shards, one of a single group."""
    import torch

    from pairfree.distributed import RayGroups
    from pairfree.grouped import GroupedMemory, KeptSelections, _members, _sample_cosines, query_groups

    rng = np.random.default_rng(12)
    centres = unit(rng, 40, 32)
    q = clustered(rng, 4000, 32, centres, 0.2).astype(np.float16)
    k = clustered(rng, 3000, 32, centres, 0.2)
    v = unit(rng, 3000, 8)
    gm = GroupedMemory(k, [k, v], torch.device("cpu"), torch.bfloat16, seed=3)
    groups = query_groups(q, torch.from_numpy(unit(rng, 12, 32)), 10)
    sample = np.sort(rng.choice(len(q), 300, replace=False))
    subset, inside = _members(groups, sample)
    assert len(subset) > 129
    subset, inside = subset[:129], inside[:129]  # batches of 64, 64 and 1 group
    runner = RayGroups(shards=3)
    remote = runner.kept(gm, q, subset, inside, 640, 0.02, tail)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = KeptSelections(gm, q, subset, inside, 640, 0.02, tail)
    finally:
        torch.set_num_threads(threads)
    assert len(remote.ids) == len(local.ids) == 129 and remote.rows == local.rows and remote.block == local.block

    def flat(x):
        if isinstance(x, (list, tuple)):
            return [y for z in x for y in flat(z)]
        bf16 = isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16
        return [] if x is None else [np.asarray(x.float() if bf16 else x)]

    for name in KeptSelections.STATE:
        a, b = flat(getattr(remote, name)), flat(getattr(local, name))
        assert len(a) == len(b) > 0, name
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y, err_msg=name)
    picked = np.sort(np.concatenate(inside))
    exact = [torch.from_numpy(e) for e in aggregate(q[picked], k, [k, v], tau=0.02, normalize=False)]
    for rows in (320, 330, 640):  # on the kept blocks' grid, off it (computed directly), all kept
        got, want = (_sample_cosines(gm, q, groups, picked, exact, rows, 0.02, tail, kept) for kept in (remote, local))
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert got.mean() > 0.9


def test_exmcr_passes_on_ray_groups_write_the_local_pools(rng, local_ray, tmp_path, monkeypatch):
    """The three Ex-MCR passes of a leaf with `aggregation_select="groups"` on Ray (clustered spaces of
    2000-4000 rows in groups of ~16, so each hop holds 184-299 groups in two shards and reaches cosine 0.99
    without falling back to exact; 300 queries calibrate): every hop ran as groups on Ray, the cached pools
    equal those of a local run on the tasks' one thread bit for bit, and are the entries a local run then
    reads. fp32: bf16 on Ray is `test_ray_groups_equal_the_local_path`'s, and where bf16 runs in software
    (AVX2) its calibration made this test 110 s."""
    import dataclasses

    import torch

    import pairfree as pf
    from pairfree.extend import ExMCR, ExMCRConfig, Roles

    centres = unit(rng, 40, 32)
    t = clustered(rng, 3000, 32, centres, 0.2)
    t2 = t[:, :24] + 0.05 * rng.standard_normal((3000, 24)).astype(np.float32)
    clip = pf.Space("clip", {"image": clustered(rng, 4000, 32, centres, 0.2), "text": t})
    clap = pf.Space("clap", {"text": t2 / np.linalg.norm(t2, axis=1, keepdims=True),
                             "audio": clustered(rng, 2000, 24, unit(rng, 40, 24), 0.2)})
    aggregate_kwargs = ExMCRConfig.aggregate_kwargs

    def small_groups(self, cache_dir=None):
        kw = aggregate_kwargs(self, cache_dir)
        return {**kw, "ivf": dataclasses.replace(kw["ivf"], group_size=16, sample=600)}

    monkeypatch.setattr(ExMCRConfig, "aggregate_kwargs", small_groups)
    common = dict(aggregation="ivf", aggregation_select="groups", aggregation_min_cosine=0.99,
                  aggregation_dtype="float32")
    roles = Roles.of(clip, clap, "text", "clap")
    reports = {}
    remote = ExMCR(ExMCRConfig(**common, aggregation_backend="ray")).pseudo_data(roles, tmp_path / "ray",
                                                                                   reports=reports)
    assert len(reports) == 6 and all(r["backend"] == "ray" and r["select"] == "groups" and r["shards"] == 2
                                     and "ran" not in r for r in reports.values()), reports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tasks' one thread: MKL's threaded GEMMs sum in another order
    try:
        local = ExMCR(ExMCRConfig(**common)).pseudo_data(roles, tmp_path / "local")
    finally:
        torch.set_num_threads(threads)
    for p, roles_out in remote.items():
        for r, a in roles_out.items():
            np.testing.assert_array_equal(np.asarray(a), np.asarray(local[p][r]), err_msg=f"{p} {r}")
    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "ray").glob("*/*.npy")}
    again = ExMCR(ExMCRConfig(**common)).pseudo_data(roles, tmp_path / "ray")  # local: the Ray run's entries
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "ray").glob("*/*.npy")} == before
    np.testing.assert_array_equal(np.asarray(again["leaf"]["ol"]), np.asarray(remote["leaf"]["ol"]))


@given(sizes=st.lists(st.integers(1, 40), max_size=400), shards=st.integers(1, 9), batch=st.integers(1, 70))
@hypothesis_settings(max_examples=60, deadline=None)
def test_group_shards_are_whole_batches_balanced_by_queries(sizes, shards, batch):
    """Every group in exactly one shard, in order; every cut on a batch boundary; no shard holds more than its
    share of the queries plus one batch."""
    from pairfree.distributed import group_shards

    sizes = np.array(sizes, dtype=np.int64)
    cuts = group_shards(sizes, shards, batch)
    assert [a for a, _ in cuts[1:]] == [b for _, b in cuts[:-1]]
    if len(sizes):
        assert cuts[0][0] == 0 and cuts[-1][1] == len(sizes) and len(cuts) <= shards
    else:
        assert cuts == []
    assert all(a % batch == 0 and a < b for a, b in cuts)
    for a, b in cuts:
        heaviest = max(sizes[s : s + batch].sum() for s in range(a, b, batch))
        assert sizes[a:b].sum() <= sizes.sum() / shards + heaviest


def test_oracle_rows_match_a_direct_computation(world):
    """The rows a perfect selector needs, against sorting every query's weights by hand; the common cut
    and the Lagrangian allotment are feasible and no larger than what a uniform rule needs."""
    import torch

    from pairfree.ivf import oracle_rows

    q, k, v = world["q"][:40], world["k"], world["v"]
    t = torch.from_numpy
    res = oracle_rows(t(q), t(k), [t(k), t(v)], 0.05, targets=(0.99, 0.999), max_rows=4000, block=7)
    s = q.astype(np.float64) @ k.T.astype(np.float64) / 0.05
    w = np.exp(s - s.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    curves = []
    for i in range(len(q)):
        order = np.argsort(-w[i])[:4000]
        cos = []
        for val in (k, v):
            cum = np.cumsum(w[i, order, None] * val[order].astype(np.float64), axis=0)
            e = w[i] @ val.astype(np.float64)
            cos.append(cum @ e / (np.linalg.norm(cum, axis=1) * np.linalg.norm(e)))
        curves.append(np.minimum(*cos))
    curves = np.array(curves)
    for target in (0.99, 0.999):
        direct = np.array([np.argmax(c >= target) + 1 if (c >= target).any() else 4001 for c in curves])
        got = np.array(res[str(target)]["per_query"]["rows"])
        assert np.mean(got == direct) >= 0.95 and np.all(np.abs(got - direct) <= 0.02 * direct + 1)
        assert 1 < direct.mean() < 4000  # the target is neither trivial nor out of reach here
        common = res[str(target)]["common"]
        assert curves[:, common - 1].mean() >= target - 1e-6 > curves[:, common - 2].mean()
        lagr = res[str(target)]["mean_target"]
        assert lagr <= direct.mean() * 1.05 and lagr <= common * 1.05
