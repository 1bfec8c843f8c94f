"""`pairfree encode --backend ray`: Ray Data writes the same store as the local backend."""

import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra (ray[data]) is not installed")
pytest.importorskip("ray.data", reason="the [ray] extra (ray[data]) is not installed")

import pairfree.encode as E  # noqa: E402
from pairfree.store import EmbeddingStore  # noqa: E402
from test_encode import SPEC, TinyEncoder, _images, _same_store, _tiny_factory  # noqa: E402


def _register_tiny():
    """Runs in every Ray worker process: the registry kind the spec SPEC names."""
    from pairfree.encoders import registry

    registry.register_encoder("test-tiny", _tiny_factory, overwrite=True)


@pytest.fixture(scope="module")
def local_ray():
    # the test encoder lives in a test module Ray workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[TinyEncoder.__module__])
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"worker_process_setup_hook": _register_tiny})
    yield
    if started:
        ray.shutdown()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[TinyEncoder.__module__])


@pytest.mark.slow  # starts a local Ray cluster
def test_ray_store_identical_to_local(tmp_path, local_ray):
    _images(tmp_path / "imgs", 23, bad=(3, 17))
    common = dict(encoder=TinyEncoder(), modality="image", batch_size=4, shard_size=6, dtype="float16", progress=False)
    local = E.encode([tmp_path / "imgs"], out=tmp_path / "local", workers=0, **common)
    remote = E.encode([tmp_path / "imgs"], out=tmp_path / "ray", workers=2, backend="ray", **common)
    assert (local.encoded, local.errors) == (remote.encoded, remote.errors) == (21, 2)
    _same_store(tmp_path / "ray", tmp_path / "local")
    # a store started locally is finished by Ray with the same writer: same rows, ids and errors
    # (the limited first run committed a partial last shard, so the shard boundaries differ)
    E.encode([tmp_path / "imgs"], out=tmp_path / "mixed", workers=0, limit=9, **common)
    E.encode([tmp_path / "imgs"], out=tmp_path / "mixed", workers=1, backend="ray", **common)
    _same_store(tmp_path / "mixed", tmp_path / "local", layout=False)
    assert EmbeddingStore.open(tmp_path / "mixed").meta["backend"] == "ray"
    # a registry spec: only the Ray actors load the model, the store opens with the first batch
    spec = {**common, "encoder": SPEC}
    res = E.encode([tmp_path / "imgs"], out=tmp_path / "spec", workers=2, backend="ray", **spec)
    assert (res.encoded, res.errors) == (21, 2)
    _same_store(tmp_path / "spec", tmp_path / "local")
    assert EmbeddingStore.open(tmp_path / "spec").encoder == SPEC
