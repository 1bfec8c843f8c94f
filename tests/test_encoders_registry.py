"""The encoder registry: spec parsing, errors, custom kinds, lazy imports, optional-dependency messages."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pairfree.encoders import registry
from pairfree.encoders.base import Encoder
from pairfree.encoders.common import fixed_numpy_seed
from pairfree.encoders.registry import available_kinds, load_encoder, parse_spec, register_encoder
from pf_testing import assert_imports_nothing_heavy


class Fake(Encoder):
    modalities = ("text",)
    dim = 3

    def __init__(self, rest, device="cpu", dtype="float32", **options):
        super().__init__(device=device, dtype=dtype)
        self.rest, self.options = rest, options

    def preprocess(self, modality, item):
        return np.array([len(item), 1.0, 0.0], dtype=np.float32)

    def forward(self, modality, batch):
        return batch * 2


@pytest.fixture
def fake_kind():
    register_encoder("fake", Fake)
    yield "fake"
    registry._REGISTRY.pop("fake", None)


def test_builtin_kinds():
    assert set(available_kinds()) >= {"hf-clip", "open_clip", "hf-clap", "laion-clap", "ulip2"}


def test_parse_spec_keeps_colons_and_slashes_in_the_rest():
    assert parse_spec("hf-clip:openai/clip-vit-base-patch32") == ("hf-clip", "openai/clip-vit-base-patch32")
    assert parse_spec("open_clip:hf-hub:laion/x") == ("open_clip", "hf-hub:laion/x")
    assert parse_spec("laion-clap:C:/w/630k-fusion-best.pt") == ("laion-clap", "C:/w/630k-fusion-best.pt")


@pytest.mark.parametrize("spec", ["nope:model", "no-colon", "hf-clip:"])
def test_bad_specs_raise_value_error_listing_kinds(spec):
    with pytest.raises(ValueError) as e:
        load_encoder(spec)
    if spec != "hf-clip:":
        for kind in ("hf-clip", "open_clip", "hf-clap", "laion-clap", "ulip2"):
            assert kind in str(e.value)


def test_bad_dtype():
    with pytest.raises(ValueError, match="bfloat16"):
        load_encoder("hf-clip:x", dtype="float64")


def test_custom_kind_gets_rest_device_dtype_options_and_id(fake_kind):
    enc = load_encoder("fake:some/model", dtype="float16", knob=3)
    assert isinstance(enc, Fake)
    assert (enc.rest, enc.device, enc.dtype, enc.options) == ("some/model", "cpu", "float16", {"knob": 3})
    assert enc.id == "fake:some/model"
    z = enc.encode("text", ["abc", "a"])
    assert z.dtype == np.float32 and np.allclose(np.linalg.norm(z, axis=1), 1)


def test_register_validation(fake_kind):
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("fake", Fake)
    register_encoder("fake", Fake, overwrite=True)
    with pytest.raises(ValueError):
        register_encoder("a:b", Fake)
    with pytest.raises(TypeError):
        register_encoder("other", 42)


def test_missing_third_party_module_names_the_extra(fake_kind):
    def needs_missing(rest, **kw):
        import pairfree_not_installed_xyz  # noqa: F401

    register_encoder("fake", needs_missing, overwrite=True)
    registry._EXTRAS["fake"] = "clip"
    try:
        with pytest.raises(ImportError, match=r"pip install 'pairfree\[clip\]'"):
            load_encoder("fake:x")
    finally:
        registry._EXTRAS.pop("fake")


@pytest.mark.parametrize(
    "spec, module, extra",
    [("open_clip:ViT-B-32/openai", "open_clip", "clip"), ("laion-clap:/nowhere.pt", "laion_clap", "clap")],
)
def test_real_kinds_without_their_package(monkeypatch, spec, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ModuleNotFoundError
    with pytest.raises(ImportError, match=rf"pip install 'pairfree\[{extra}\]'"):
        load_encoder(spec)


def test_ulip2_routes_to_ulip2_encoder_with_options(monkeypatch):
    import pairfree.encoders.ulip2 as ulip2

    seen = {}

    class Stub(Fake):
        def __init__(self, path, device="cpu", dtype="float32", **options):
            super().__init__(path, device=device, dtype=dtype, **options)
            seen.update(path=path, device=device, dtype=dtype, **options)

    monkeypatch.setattr(ulip2, "ULIP2Encoder", Stub)
    enc = load_encoder("ulip2:/models/pointbert_ULIP-2.pt", dtype="bfloat16", n_points=1024)
    assert isinstance(enc, Stub) and enc.id == "ulip2:/models/pointbert_ULIP-2.pt"
    assert seen == {"path": "/models/pointbert_ULIP-2.pt", "device": "cpu", "dtype": "bfloat16", "n_points": 1024}


def test_registry_imports_nothing_heavy():
    assert_imports_nothing_heavy("import pairfree.encoders.registry as r; r.available_kinds(); r.parse_spec('hf-clip:x')",
                                 ("torch", "transformers", "open_clip", "laion_clap", "torchvision"))


def test_fixed_numpy_seed_is_reproducible_and_restores_the_global_rng():
    np.random.seed(123)
    expected_next = np.random.RandomState(123).random_sample()
    with fixed_numpy_seed(7):
        a = np.random.randint(0, 10**9)
    with fixed_numpy_seed(7):
        b = np.random.randint(0, 10**9)
    assert a == b
    assert np.random.random_sample() == expected_next
    with fixed_numpy_seed(None):  # leaves the global RNG running
        np.random.random_sample()
