import os

import numpy as np
import pytest


def pytest_configure(config):
    # caches a test does not place itself go to pytest's cache folder, never to ~/.cache
    os.environ.setdefault("PAIRFREE_CACHE", str(config.cache.mkdir("pairfree-cache")))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
