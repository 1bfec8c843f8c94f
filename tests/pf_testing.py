from pathlib import Path

import numpy as np
import pytest

# shared helpers for the tests; the module has a unique name because some packages (laion_clap)
# install a top-level `tests` package into site-packages that would shadow this folder

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference(*parts: str) -> Path:
    """A file under ../shared/reference, or skip the test with the reason."""
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the official reference files live in ../shared/reference beside the repo)")
    return path


def assert_imports_nothing_heavy(statement: str, heavy: tuple[str, ...]) -> None:
    """Run `statement` in a fresh interpreter and fail if it imported any of `heavy`."""
    import subprocess
    import sys

    code = f"import sys; {statement}; heavy = [m for m in {heavy!r} if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def clustered(rng: np.random.Generator, n: int, d: int, centres: np.ndarray, spread: float = 0.35,
              offset: np.ndarray | None = None) -> np.ndarray:
    """Unit rows around random `centres` (a clustered memory like real embeddings), optionally shifted
    by a common `offset` (a modality gap between queries and memory)."""
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, d)) / np.sqrt(d) * 3
    if offset is not None:
        x = x + offset
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
