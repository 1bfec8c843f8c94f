"""Model files: pairfree's own format (safetensors + JSON) and the official MCR `.pt` state dicts.

Loading never trusts a file: the JSON header is checked field by field (types, names, dimensions
within `MAX_DIM`), the module it describes is built on the `meta` device (nothing allocated) and
compared with the tensors actually in the file before any weight is assigned, and non-finite
weights are refused. Official `.pt` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from pairfree import __version__
from pairfree.fileio import atomic_dir
from pairfree.projector import MAX_DIM

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def save_model(path: str | Path, module: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write a model folder atomically: weights and a JSON description that rebuilds it."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps({**meta, "pairfree_version": __version__}, indent=2) + "\n")
    return path


def model_folder(path: str | Path) -> Path:
    """The folder holding config.json: `path` itself, or `path/model` for a run folder."""
    path = Path(path)
    if not (path / CONFIG).exists() and (path / "model" / CONFIG).exists():
        return path / "model"
    return path


def read_model(path: str | Path, method: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """(meta, state dict, folder) of a saved model folder, with errors that name the file and field."""
    path = model_folder(path)
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    for f in (cfg_file, w_file):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not a saved pairfree model: {f.name} is missing")
    meta = read_meta(cfg_file)
    if meta.get("method") != method:
        raise ValueError(f"{cfg_file}: field 'method' is {meta.get('method')!r}, expected {method!r}")
    try:
        state = load_file(str(w_file))
    except Exception as e:
        raise ValueError(f"{w_file}: not a readable safetensors file ({e})") from e
    check_finite(state, w_file)
    return meta, state, path


def read_meta(cfg_file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object, got {type(meta).__name__}")
    return meta


def field(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    """obj[key] of type `typ` (bools are not integers here), else ValueError naming where and key."""
    if not isinstance(obj, dict) or key not in obj:
        raise ValueError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and bool not in (typ if isinstance(typ, tuple) else (typ,))):
        names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
        raise ValueError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return value


def dim_field(obj: Any, key: str, where: str) -> int:
    value = field(obj, key, int, where)
    if not 1 <= value <= MAX_DIM:
        raise ValueError(f"{where}: field {key!r} must be an embedding dimension in [1, {MAX_DIM}], got {value}")
    return value


def name_field(obj: Any, key: str, where: str) -> str:
    value = field(obj, key, str, where)
    if not _NAME.match(value):
        raise ValueError(f"{where}: field {key!r} must use letters, digits, '_' or '-', got {value!r}")
    return value


def modalities_field(obj: Any, key: str, where: str) -> list[str]:
    value = field(obj, key, list, where)
    if not value or not all(isinstance(m, str) and _NAME.match(m) for m in value):
        raise ValueError(f"{where}: field {key!r} must be a non-empty list of modality names, got {value!r}")
    return list(value)


def check_finite(state: dict[str, torch.Tensor], source: str | Path) -> None:
    """Refuse NaN / inf weights: they would only surface later as NaN embeddings."""
    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{source}: tensor {k!r} holds NaN or infinite values")


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                      assign: bool = False) -> None:
    """load_state_dict(strict=True) with a message listing missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(state[k].shape)}"
              for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            parts.append(f"unexpected keys {extra[:6]}{' ...' if len(extra) > 6 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:6]))
        raise ValueError(f"{source}: checkpoint does not match the model: " + ", ".join(parts))
    state = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype and v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)


def materialize(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor],
                source: str | Path) -> torch.nn.Module:
    """The module `build()` makes, with `state` as its weights, built on the meta device first so a
    header that declares huge dimensions costs nothing before it is compared with the file.
    (`build` may also return a module already on the meta device.)"""
    with torch.device("meta"):
        module = build()
    load_state_strict(module, state, source, assign=True)
    for p in module.parameters():
        p.requires_grad_(True)
    return module.eval()


def linear_shape(state: dict[str, torch.Tensor], key: str, path: str | Path) -> tuple[int, int]:
    """(out, in) of a Linear weight in an official file; a clear error when it is absent or not 2-D."""
    if key not in state:
        raise ValueError(f"{path}: tensor {key!r} is missing; not the official layout")
    if state[key].ndim != 2:
        raise ValueError(f"{path}: tensor {key!r} must be a 2-D Linear weight, got shape {tuple(state[key].shape)}")
    return int(state[key].shape[0]), int(state[key].shape[1])


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an official C-MCR / Ex-MCR `.pt` file, loaded without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable PyTorch state dict (weights_only=True refused it: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    check_finite(state, path)
    return state
