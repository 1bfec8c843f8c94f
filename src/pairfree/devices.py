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


def keep_freed_host_memory(threshold: int = 1 << 30) -> bool:
    """Ask glibc to serve host allocations up to `threshold` bytes from its heap and keep what is freed
    there for reuse, instead of mapping each large block afresh and unmapping it on free.

    Aggregation over millions of rows allocates and frees blocks of 50-300 MB per step (gathered rows,
    score blocks, GEMM packing buffers); by default glibc maps each one anew and the kernel zero-fills
    every page on first touch: a third of the time of a grouped aggregation step on the paper-scale
    world (README, "Paper scale"). Process-wide and lasting (resident memory stays at its high-water
    mark), so the command line and the benchmarks call it, not the library's functions. Returns False
    where the C library has no `mallopt` (not glibc) or refuses the setting."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(2 * threshold, 2**31 - 1)  # an int in C
    return bool(mallopt(m_mmap_threshold, threshold)) and bool(mallopt(m_trim_threshold, trim))
