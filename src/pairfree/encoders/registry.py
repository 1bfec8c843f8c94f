"""Encoder registry: a spec string "kind:rest" -> an `Encoder`, loading nothing heavy until asked.

Kinds (each factory imports its module, and so torch / transformers / open_clip / laion_clap, only
when called):

    hf-clip:<hub id or local dir>            transformers CLIPModel + CLIPProcessor     image, text
    open_clip:<model>/<pretrained tag|path>  open_clip.create_model_and_transforms      image, text
    hf-clap:<hub id or local dir>            transformers ClapModel + ClapProcessor     audio, text
    laion-clap:<path to .pt | checkpoint id> laion_clap.CLAP_Module (630k checkpoints)  audio, text
    ulip2:<path to pointbert_ULIP-2.pt>      pairfree.encoders.ulip2.ULIP2Encoder       3d, image, text
    toy:<toy media folder>/<space>          pairfree.toy.encoder.ToyEncoder             the toy world's spaces

`register_encoder(kind, factory)` adds a kind: `factory(rest, device=..., dtype=..., **options)`.

The helpers the encoder modules share (optional-dependency checks, dtypes, the torchvision shim)
live in `pairfree.encoders.common`, so that the registry imports the encoders and not the reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from pairfree.encoders.common import DTYPES

if TYPE_CHECKING:
    from pairfree.encoders.base import Encoder

__all__ = ["available_kinds", "load_encoder", "parse_spec", "register_encoder"]

Factory = Callable[..., "Encoder"]

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


def _toy(rest: str, **kw: Any) -> "Encoder":
    from pairfree.toy.encoder import ToyEncoder

    return ToyEncoder(rest, **kw)


_REGISTRY: dict[str, Factory] = {
    "hf-clip": _hf_clip,
    "open_clip": _open_clip,
    "hf-clap": _hf_clap,
    "laion-clap": _laion_clap,
    "ulip2": _ulip2,
    "toy": _toy,
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


def load_encoder(spec: str, device: str = "cpu", dtype: str = "float32", profile: str = "default",
                 **options: Any) -> "Encoder":
    """Load the encoder `spec` names ("hf-clip:openai/clip-vit-base-patch32", ...).

    `options` go to the kind's factory (e.g. `enable_fusion=` for laion-clap), on top of what the
    preprocessing `profile` sets for that kind (`pairfree.media.profiles`: "official" feeds ULIP-2
    the raw points and CLIP the PIL image processor, as the official releases do). A missing
    optional dependency raises ImportError naming the pairfree extra that installs it.
    """
    from pairfree.media.profiles import get_profile

    kind, rest = parse_spec(spec)
    options = {**get_profile(profile).encoder_options.get(kind, {}), **options}
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    from pairfree.devices import resolve_device

    resolve_device(device)
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
