"""Compute devices: a name the user gave, checked against what this machine and torch build have, and
whether they compute bfloat16 in hardware (where not, it is several times slower than float32)."""

from __future__ import annotations

import functools
import platform
import warnings

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


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> tuple[bool, str]:
    """(bf16 GEMMs in hardware, a description of the CPU's relevant features) for this process's CPU."""
    try:
        caps = torch.cpu.get_capabilities()
    except (AttributeError, RuntimeError):  # older torch: oneDNN's check below
        caps = {}
    name = str(caps.get("cpu_name") or platform.processor() or platform.machine())
    if "avx512_bf16" in caps:  # x86
        native = bool(caps["avx512_bf16"] or caps.get("amx_bf16"))
        have = [f for f, key in (("AVX2", "avx2"), ("AVX-512", "avx512_f"), ("AVX512-BF16", "avx512_bf16"),
                                 ("AMX-BF16", "amx_bf16")) if caps.get(key)]
        return native, f"{name}: {', '.join(have) or 'no AVX2'}" + ("" if native else ", no AVX512-BF16 or AMX")
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return native, f"{name}: bf16 {'in hardware' if native else 'not in hardware'} (oneDNN)"


def native_bf16(device: "torch.device | str" = "cpu") -> bool:
    """Whether bfloat16 GEMMs run in hardware on `device`, which is when they beat float32.

    Where they do not, torch computes them in software: on 2 cores of an AVX2-only AMD EPYC bf16 GEMMs
    ran at 14-15 GFLOP/s against float32's 100-119 (benchmarks/paper_scale.py's sweep of shapes), where
    an EPYC with AVX512-BF16 ran bf16 at ~400 against ~150. CUDA: Ampere or newer; other devices: no."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation flag
            return bool(torch.cuda.is_bf16_supported())
    return dev.type == "cpu" and _cpu_bf16()[0]


def cpu_features() -> str:
    """This CPU's name and the features that decide bf16's speed (for reports and benchmark records)."""
    return _cpu_bf16()[1]


def warn_if_slow_bf16(dtype: torch.dtype, device: "torch.device | str", what: str) -> None:
    """A warning where bfloat16 was asked for on a device that computes it in software."""
    dev = torch.device(device)
    if dtype == torch.bfloat16 and not native_bf16(dev):
        where = cpu_features() if dev.type == "cpu" else dev.type
        warnings.warn(f"{what}: bfloat16 on {where} runs in software, several times slower than float32 "
                      "(use float32, or 'auto', which picks bfloat16 only where the hardware has it)",
                      RuntimeWarning, stacklevel=3)
