"""Encoder registry: a spec string "kind:rest" -> an `Encoder`, loading nothing heavy until asked.

Kinds (each factory imports its module, and so torch / transformers / open_clip / laion_clap, only
when called):

    hf-clip:<hub id or local dir>            transformers CLIPModel + CLIPProcessor     image, text
    open_clip:<model>/<pretrained tag|path>  open_clip.create_model_and_transforms      image, text
    hf-clap:<hub id or local dir>            transformers ClapModel + ClapProcessor     audio, text
    laion-clap:<path to .pt | checkpoint id> laion_clap.CLAP_Module (630k checkpoints)  audio, text
    ulip2:<path to pointbert_ULIP-2.pt>      pairfree.encoders.ulip2.ULIP2Encoder       3d, image, text

`register_encoder(kind, factory)` adds a kind: `factory(rest, device=..., dtype=..., **options)`.

This module also holds what the encoder modules share about their optional dependencies:
`require` (ImportError naming the extra to install) and `import_torchvision` /
`import_torchaudio`, which make the pure-Python parts of those packages importable when their
compiled extension was built against another torch (see their docstrings).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import torch

    from pairfree.encoders.base import Encoder

__all__ = [
    "DTYPES",
    "available_kinds",
    "fixed_numpy_seed",
    "import_torchaudio",
    "import_torchvision",
    "load_encoder",
    "parse_spec",
    "register_encoder",
    "require",
    "torch_dtype",
]

log = logging.getLogger(__name__)

Factory = Callable[..., "Encoder"]
DTYPES = ("float32", "float16", "bfloat16")

# kind -> extra that installs its dependencies (for the ImportError message)
_EXTRAS = {"hf-clip": "clip", "open_clip": "clip", "hf-clap": "clap", "laion-clap": "clap", "ulip2": "ulip"}


# ------------------------------------------------------------------------------------ registry


def _hf_clip(rest: str, **kw: Any) -> "Encoder":
    from pairfree.encoders.hf_clip import HFCLIPEncoder

    return HFCLIPEncoder(rest, **kw)


def _open_clip(rest: str, **kw: Any) -> "Encoder":
    from pairfree.encoders.open_clip import OpenCLIPEncoder

    return OpenCLIPEncoder(rest, **kw)


def _hf_clap(rest: str, **kw: Any) -> "Encoder":
    from pairfree.encoders.hf_clap import HFCLAPEncoder

    return HFCLAPEncoder(rest, **kw)


def _laion_clap(rest: str, **kw: Any) -> "Encoder":
    from pairfree.encoders.laion_clap import LaionCLAPEncoder

    return LaionCLAPEncoder(rest, **kw)


def _ulip2(rest: str, **kw: Any) -> "Encoder":
    from pairfree.encoders.ulip2 import ULIP2Encoder

    return ULIP2Encoder(rest, **kw)


_REGISTRY: dict[str, Factory] = {
    "hf-clip": _hf_clip,
    "open_clip": _open_clip,
    "hf-clap": _hf_clap,
    "laion-clap": _laion_clap,
    "ulip2": _ulip2,
}


def register_encoder(kind: str, factory: Factory, *, overwrite: bool = False) -> None:
    """Make `load_encoder("<kind>:<rest>")` call `factory(rest, device=..., dtype=..., **options)`."""
    if not kind or ":" in kind:
        raise ValueError(f"encoder kind must be a non-empty name without ':', got {kind!r}")
    if not callable(factory):
        raise TypeError(f"factory for encoder kind {kind!r} must be callable, got {type(factory).__name__}")
    if kind in _REGISTRY and not overwrite:
        raise ValueError(f"encoder kind {kind!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[kind] = factory


def available_kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str]:
    """'kind:rest' -> (kind, rest); the rest may itself hold ':' (hub ids, Windows paths, hf-hub:...)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"encoder spec must look like 'kind:model', got {spec!r}; kinds: {list(_REGISTRY)}")
    kind, rest = spec.split(":", 1)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown encoder kind {kind!r} in {spec!r}; kinds: {list(_REGISTRY)}")
    if not rest:
        raise ValueError(f"encoder spec {spec!r} names no model after '{kind}:'")
    return kind, rest


def load_encoder(spec: str, device: str = "cpu", dtype: str = "float32", **options: Any) -> "Encoder":
    """Load the encoder `spec` names ("hf-clip:openai/clip-vit-base-patch32", ...).

    `options` go to the kind's factory (e.g. `enable_fusion=` for laion-clap). A missing optional
    dependency raises ImportError naming the pairfree extra that installs it.
    """
    kind, rest = parse_spec(spec)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    try:
        encoder = _REGISTRY[kind](rest, device=device, dtype=dtype, **options)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing.split(".")[0] == "pairfree":
            raise
        extra = _EXTRAS.get(kind)
        hint = f"pip install 'pairfree[{extra}]'" if extra else "install the package it names"
        raise ImportError(f"encoder kind {kind!r} needs the package {missing!r}: {hint}") from e
    encoder.id = spec
    return encoder


# ------------------------------------------------------------------------------------ shared helpers


def require(module: str, extra: str) -> Any:
    """Import `module`, or raise ImportError saying which pairfree extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ImportError(f"{module!r} is not installed: pip install 'pairfree[{extra}]'") from e


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
