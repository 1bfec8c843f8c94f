"""bfloat16 where the hardware has it: the capability read from torch, dtype "auto" resolved by it (and the
same result and cache entry as the dtype it picks), and a warning where bf16 is asked for in software."""

import warnings

import numpy as np
import pytest
import torch

from pairfree import devices
from pairfree.memory import aggregate, cached_aggregate, compute_dtype
from pf_testing import clustered, unit

AVX2 = {"cpu_name": "Some CPU", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's capabilities as torch reports them (x86 keys), the cached answer cleared around it."""
    def set_caps(**caps):
        devices._cpu_bf16.cache_clear()
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {**AVX2, **caps})

    yield set_caps
    devices._cpu_bf16.cache_clear()


@pytest.mark.parametrize("caps, native", [({}, False), ({"avx512_f": True}, False), ({"avx512_bf16": True}, True),
                                          ({"amx_bf16": True}, True)])
def test_bf16_is_native_on_avx512_bf16_or_amx_only(cpu, caps, native):
    cpu(**caps)
    assert devices.native_bf16("cpu") is native
    assert compute_dtype("auto") == (torch.bfloat16 if native else torch.float32)
    assert devices.cpu_features().startswith("Some CPU: AVX2")
    assert devices.cpu_features().endswith("no AVX512-BF16 or AMX") is not native


def test_this_cpu_is_read_as_torch_reports_it():
    devices._cpu_bf16.cache_clear()
    want = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert devices.native_bf16() is want
    assert devices.native_bf16("meta") is False


def test_cuda_bf16_is_asked_of_torch_without_emulation(monkeypatch):
    asked = {}

    def supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert devices.native_bf16("cuda") is True and asked == {"emulation": False}
    assert compute_dtype("auto", "cuda:0") == torch.bfloat16


def _world():
    rng = np.random.default_rng(0)
    centres = unit(rng, 20, 16)
    return clustered(rng, 300, 16, centres, 0.2), clustered(rng, 900, 16, centres, 0.2)


@pytest.mark.parametrize("native", [False, True])
def test_auto_computes_what_it_picks_and_shares_its_cache(cpu, tmp_path, native):
    """"auto" gives the picked dtype's result bit for bit, without a warning, and reads and writes the
    cache entry of that dtype."""
    cpu(avx512_bf16=native)
    q, k = _world()
    picked = "bfloat16" if native else "float32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = aggregate(q, k, dtype="auto")
        first = cached_aggregate(tmp_path, q, k, dtype="auto")
    np.testing.assert_array_equal(got, aggregate(q, k, dtype=picked))
    np.testing.assert_array_equal(first, got)
    assert len(list(tmp_path.rglob("*.npy"))) == 1
    cached_aggregate(tmp_path, q, k, dtype=picked)
    assert len(list(tmp_path.rglob("*.npy"))) == 1  # the same entry
    if not native:
        with pytest.warns(RuntimeWarning):
            assert np.abs(got - aggregate(q, k, dtype="bfloat16")).max() > 1e-4  # bf16 would have differed


def test_bf16_in_software_warns_naming_the_cpu(cpu):
    from pairfree.connect import CMCRConfig
    from pairfree.train import autocast_context

    cpu()
    q, k = _world()
    with pytest.warns(RuntimeWarning, match=r"aggregate: bfloat16 on Some CPU: AVX2, no AVX512-BF16 or AMX runs in "
                                            r"software.*'auto'"):
        aggregate(q, k, dtype="bfloat16")
    with pytest.warns(RuntimeWarning, match="training precision 'bf16': bfloat16 on Some CPU"):
        autocast_context("bf16", torch.device("cpu"))
    cpu(amx_bf16=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aggregate(q, k, dtype="bfloat16")
        autocast_context("bf16", torch.device("cpu"))
    assert CMCRConfig(aggregation_dtype="auto").aggregate_kwargs()["dtype"] == "auto"
