"""What the encoder modules share about their optional dependencies and dtypes.

`require` (ImportError naming the extra to install), `torch_dtype` / `DTYPES`, `fixed_numpy_seed`
(reproducible upstream random crops) and `import_torchvision` / `import_torchaudio`, which make the
pure-Python parts of those packages importable when their compiled extension was built against
another torch. The registry imports the encoders; the encoders import this module, never the registry.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "fixed_numpy_seed", "import_torchaudio", "import_torchvision", "require", "torch_dtype"]

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def require(module: str, extra: str) -> Any:
    """Import `module`, or raise ImportError saying which pairfree extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ImportError(f"{module!r} is not installed: pip install 'pairfree[{extra}]'") from e


@contextlib.contextmanager
def loading(kind: str, source: str, local: bool) -> Iterator[None]:
    """Load a checkpoint from a local path or the Hub: offline it fails fast (`pairfree.remote`), and
    a file the library refuses becomes one ValueError naming it, instead of a deep traceback."""
    from pairfree.remote import OfflineError, hub_access

    ctx = contextlib.nullcontext() if local else hub_access(f"{kind} checkpoint", source)
    try:
        with ctx:
            yield
    except (OfflineError, ImportError):
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{kind} checkpoint {source}: cannot be loaded ({type(e).__name__}: {first})") from e


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {name!r}")
    return getattr(torch, name)


@contextlib.contextmanager
def fixed_numpy_seed(seed: int | None) -> Iterator[None]:
    """Run upstream code that crops with numpy's global RNG on a fixed seed, then restore the RNG.

    Why: laion_clap and transformers' ClapFeatureExtractor pick random crops of audio longer than
    10 s with `np.random`; a fixed seed per item makes embeddings reproducible and independent of
    batching and worker order. `None` leaves the global RNG alone (upstream's behaviour).
    """
    if seed is None:
        yield
        return
    import numpy as np

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _purge(package: str) -> None:
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


_TORCHVISION_FRAGMENT: Any = None  # keeps the op schemas below alive


def import_torchvision() -> Any:
    """Import torchvision, tolerating a compiled extension built for another torch.

    Why: the torchvision wheels on PyPI link against CUDA torch (libc10_cuda.so). Next to a CPU-only
    torch their `_C` extension fails to load, which torchvision itself tolerates, but its
    `_meta_registrations` then registers fake kernels for `torchvision::nms` / `qnms` and the import
    dies with "operator torchvision::nms does not exist". Declaring those two schemas lets the
    import finish; everything the encoders use (transforms, FrozenBatchNorm2d) is pure Python, and
    only the compiled detection ops (nms, roi_align, ...) stay unavailable.
    """
    global _TORCHVISION_FRAGMENT
    import torch

    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError as e:
        raise ImportError("'torchvision' is not installed: pip install 'pairfree[clip]'") from e
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _TORCHVISION_FRAGMENT is not None:
            raise
        log.warning("torchvision's compiled ops do not load with this torch (%s); using its Python parts only", e)
    _purge("torchvision")
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_FRAGMENT = lib
    return importlib.import_module("torchvision")


def import_torchaudio() -> Any:
    """Import torchaudio (None when absent), tolerating a compiled extension built for another torch.

    Why: laion_clap computes the fusion model's mel spectrograms with
    `torchaudio.transforms.MelSpectrogram` (pure Python), but the PyPI torchaudio wheels link against
    CUDA torch, and next to a CPU-only torch `import torchaudio` raises OSError while loading
    `_torchaudio.so`. Standing in a `torchaudio._extension` that reports no extension lets the
    pure-Python transforms import and run.
    """
    try:
        return importlib.import_module("torchaudio")
    except ModuleNotFoundError:
        return None
    except OSError as e:
        log.warning("torchaudio's compiled extension does not load with this torch (%s); using its Python parts", e)
    import types

    _purge("torchaudio")

    def fail_if_no_align(func: Callable) -> Callable:
        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("torchaudio's compiled extension did not load; alignment is unavailable")

        return unavailable

    stub = types.ModuleType("torchaudio._extension")
    stub.__dict__.update(
        _IS_TORCHAUDIO_EXT_AVAILABLE=False,
        _IS_ALIGN_AVAILABLE=False,
        fail_if_no_align=fail_if_no_align,
        _load_lib=lambda lib: False,
        _check_cuda_version=lambda: None,
    )
    sys.modules["torchaudio._extension"] = stub
    return importlib.import_module("torchaudio")
