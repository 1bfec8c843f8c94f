import os

import numpy as np
import pytest


def pytest_configure(config):
    # caches a test does not place itself go to pytest's cache folder, never to ~/.cache
    os.environ.setdefault("PAIRFREE_CACHE", str(config.cache.mkdir("pairfree-cache")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def searchable(tmp_path_factory, request):
    """(world, media dir, unified model, store specs, index) of the small toy world's test split
    (tests/search_fixtures.py); built once per session, shared by the search, service and browser tests."""
    pytest.importorskip("faiss", reason="the [search] extra (faiss-cpu) is not installed")
    import search_fixtures

    return search_fixtures.build(tmp_path_factory.mktemp("searchable"), request.config.cache.mkdir("pairfree-cache"))
