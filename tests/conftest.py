import os

import numpy as np
import pytest


def pytest_configure(config):
    # caches a test does not place itself go to pytest's cache folder, never to ~/.cache
    os.environ.setdefault("PAIRFREE_CACHE", str(config.cache.mkdir("pairfree-cache")))
    _import_anyio_now()


def _import_anyio_now() -> None:
    """Resolve anyio's lazily imported names here, in the main thread. anyio (4.16+) imports its submodules
    on first use, which under the test server is a request thread (starlette's FileResponse: anyio.open_file);
    anyio is a pytest plugin, so pytest rewrites those modules as they load, and Python 3.11's AST
    constructor is not thread-safe: a parse racing another one raised "AST constructor recursion depth
    mismatch" inside a request and the browser test timed out waiting for an image."""
    try:
        import anyio
    except ImportError:
        return
    for name in dir(anyio):
        getattr(anyio, name, None)


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
