"""Model files: pairfree's own format (safetensors + JSON) and the official MCR `.pt` state dicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pairfree import __version__
from pairfree.fileio import atomic_dir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(path: str | Path, module: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Write a model folder atomically: weights and a JSON description that rebuilds it."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps({**meta, "pairfree_version": __version__}, indent=2) + "\n")
    return path


def read_model(path: str | Path, method: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(meta, state dict) of a saved model folder, with errors that name the file and the problem."""
    path = Path(path)
    if not (path / CONFIG).exists() and (path / "model" / CONFIG).exists():  # a run folder
        path = path / "model"
    cfg_file, w_file = path / CONFIG, path / WEIGHTS
    for f in (cfg_file, w_file):
        if not f.exists():
            raise FileNotFoundError(f"{path} is not a saved pairfree model: {f.name} is missing")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON ({e})") from e
    if meta.get("method") != method:
        raise ValueError(f"{cfg_file}: field 'method' is {meta.get('method')!r}, expected {method!r}")
    try:
        state = load_file(str(w_file))
    except Exception as e:
        raise ValueError(f"{w_file}: not a readable safetensors file ({e})") from e
    return meta, state


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> None:
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
    module.load_state_dict(state, strict=True)


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an official C-MCR / Ex-MCR `.pt` file, loaded without executing pickled code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"official checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable PyTorch state dict (weights_only=True refused it: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}
