"""Compute devices: a name the user gave, checked against what this machine and torch build have."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> "torch.device":
    """A torch device that exists here, or ValueError saying why not (bad name, CPU-only build, no GPU)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {name!r}: not a torch device; use cpu, cuda, cuda:N or mps ({e})") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(f"device {name!r}: this torch build ({torch.__version__}) has no CUDA support; "
                             "install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is visible to this process; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: Apple MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: pairfree runs on cpu, cuda or mps, not {dev.type}")
    return dev
