"""`pairfree encode --backend ray`: Ray Data writes the same store as the local backend."""

import sys

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
pytest.importorskip("ray.data", reason="the [ray] extra (ray[data]) is not installed")

import pairfree.encode as E  # noqa: E402
from pairfree.store import EmbeddingStore  # noqa: E402
from test_encode import SPEC, TinyEncoder, _images, _same_store, _tiny_factory  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    # the test encoder lives in a test module Ray workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[TinyEncoder.__module__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[TinyEncoder.__module__])


# ~28 s of its own on 2 busy cores (Ray start ~8 s, two Ray Data runs with actor processes that
# import torch ~9 s each): over "a few seconds", so it runs with `make test-slow`
@pytest.mark.slow
def test_ray_store_identical_to_local(tmp_path, local_ray):
    from pairfree.encoders import registry

    _images(tmp_path / "imgs", 23, bad=(3, 17))
    common = dict(modality="image", batch_size=4, shard_size=6, dtype="float16", progress=False)
    local = E.encode([tmp_path / "imgs"], encoder=TinyEncoder(), out=tmp_path / "local", workers=0, **common)
    assert (local.encoded, local.errors) == (21, 2)
    # a registry spec over 2 encoder actors: only the actors load the model, the store opens with
    # the first batch; the kind is registered in this process only, its registry entry travels along
    registry.register_encoder("test-tiny", _tiny_factory, overwrite=True)
    try:
        remote = E.encode([tmp_path / "imgs"], encoder=SPEC, out=tmp_path / "ray", workers=2, backend="ray", **common)
    finally:
        registry._REGISTRY.pop("test-tiny", None)
    assert (remote.encoded, remote.errors) == (21, 2)
    _same_store(tmp_path / "ray", tmp_path / "local")
    assert EmbeddingStore.open(tmp_path / "ray").encoder == SPEC
    # an Encoder object, and a store started locally finished by Ray with the same writer: same
    # rows, ids and errors (the limited first run committed a partial last shard, so the shard
    # boundaries differ)
    E.encode([tmp_path / "imgs"], encoder=TinyEncoder(), out=tmp_path / "mixed", workers=0, limit=9, **common)
    res = E.encode([tmp_path / "imgs"], encoder=TinyEncoder(), out=tmp_path / "mixed", workers=1, backend="ray", **common)
    assert (res.skipped, res.encoded, res.errors) == (9, 13, 1)
    _same_store(tmp_path / "mixed", tmp_path / "local", layout=False)
    assert EmbeddingStore.open(tmp_path / "mixed").meta["backend"] == "ray"
