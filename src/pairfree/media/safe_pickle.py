"""Read pickled numpy data without executing pickle code.

Letting numpy unpickle a `.npy` (its allow_pickle switch) runs whatever callables the pickle names,
so a crafted file can run arbitrary code. This module reads the pickled payload with an `Unpickler` whose
`find_class` resolves only the callables numpy's own array pickling uses; everything else
(builtins.eval, os.system, subprocess.*, builtins.open, ...) is refused before it is resolved.
Containers and primitives (dict, list, tuple, str, bytes, int, float, bool, None) come from
pickle opcodes and never go through `find_class`.

Allowed names (each mapped to a checked wrapper, not handed out raw):
  - `numpy.core.multiarray._reconstruct` / `numpy._core.multiarray._reconstruct` (protocols 2-4),
  - `numpy.ndarray` (only as the type argument of `_reconstruct`; calling it is refused),
  - `numpy.dtype`,
  - `numpy.core.multiarray.scalar` / `numpy._core.multiarray.scalar` (numpy scalars in a pickle),
  - `numpy.core.numeric._frombuffer` / `numpy._core.numeric._frombuffer` (protocol 5 arrays),
  - `_codecs.encode` restricted to latin-1 (how Python 3 writes `bytes` at protocol 2).
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

from pairfree.media._common import MediaError, Source, label, open_binary

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.multiarray import scalar as _np_scalar
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.multiarray import scalar as _np_scalar
    from numpy.core.numeric import _frombuffer as _np_frombuffer


class UnsafePickleError(MediaError):
    """The pickle names a callable outside the allowed numpy reconstruction set."""


class _Guarded:
    """An allowed callable as seen by the pickle: callable with positional arguments, immutable.

    The BUILD opcode can target any object the pickle holds, including these; `__setstate__` and
    `__setattr__` refuse, so a pickle cannot change defaults or attributes of the allowed callables.
    """

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args):
        return self._fn(*args)

    def __setstate__(self, state):
        raise UnsafePickleError(f"the pickle tries to modify {self._name}")

    def __setattr__(self, key, value):
        raise UnsafePickleError(f"the pickle tries to modify {self._name}")

    def __repr__(self) -> str:
        return f"<allowed {self._name}>"


def _refuse_ndarray(*args):
    raise UnsafePickleError("the pickle calls numpy.ndarray directly; only numpy's reconstruction is allowed")


_NDARRAY = _Guarded(_refuse_ndarray, "numpy.ndarray")


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise UnsafePickleError(f"_reconstruct called with {subtype!r:.80}; only numpy.ndarray is allowed")
    if not isinstance(shape, tuple) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise UnsafePickleError(f"_reconstruct called with shape {shape!r:.80}")
    if any(s > 0 for s in shape):  # numpy always passes (0,); the real shape arrives with __setstate__
        raise UnsafePickleError(f"_reconstruct called with a non-empty shape {shape!r:.80}")
    if not isinstance(dtype, (bytes, str, np.dtype)):
        raise UnsafePickleError(f"_reconstruct called with dtype {dtype!r:.80}")
    return _np_reconstruct(np.ndarray, shape, dtype)


def _dtype(*args):
    if not args or not isinstance(args[0], (str, bytes)) or not all(isinstance(a, (str, bytes, bool, int)) for a in args):
        raise UnsafePickleError(f"numpy.dtype called with {args!r:.80}")
    return np.dtype(*args)


def _scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or not all(isinstance(a, (bytes, str, int, float, bool)) for a in args):
        raise UnsafePickleError("numpy scalar reconstruction called with unexpected arguments")
    return _np_scalar(dtype, *args)


def _frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray)):
        raise UnsafePickleError(f"_frombuffer called with a {type(buf).__name__} buffer")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("_frombuffer called with a non-numeric dtype")
    return _np_frombuffer(buf, dtype, shape, order)


def _codecs_encode(obj, encoding, *rest):
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "iso-8859-1") or rest not in ((), ("strict",)):
        raise UnsafePickleError("_codecs.encode is only allowed for latin-1 bytes")
    return obj.encode("latin1")


_RECONSTRUCT = _Guarded(_reconstruct, "numpy _reconstruct")
_SCALAR = _Guarded(_scalar, "numpy scalar")
_FROMBUFFER = _Guarded(_frombuffer, "numpy _frombuffer")
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Guarded(_dtype, "numpy.dtype"),
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _Guarded(_codecs_encode, "_codecs.encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only numpy's array-reconstruction callables."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load {module}.{name}: only numpy array reconstruction is allowed in a pickled record"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id in a pickled record")


_PLAIN = (str, bytes, int, float, bool, complex, type(None))


def _check(obj: Any, depth: int = 0) -> None:
    """Everything returned is data: containers, primitives and numpy arrays / scalars."""
    if depth > 100:
        raise UnsafePickleError("the pickled record nests deeper than 100 levels")
    if isinstance(obj, _PLAIN) or isinstance(obj, np.generic):
        return
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            for v in obj.flat:
                _check(v, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check(v, depth + 1)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
        return
    raise UnsafePickleError(f"the pickle produced an object of type {type(obj).__name__}")


def loads(data: bytes, *, where: str = "pickle", encoding: str = "latin1") -> Any:
    """Unpickle `data` allowing only numpy array reconstruction; returns arrays, containers, primitives.

    `encoding` applies to Python 2 pickles (their 8-bit strings), as in `np.load(encoding=...)`.
    """
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{where}: {e}") from None
    except MemoryError:
        raise MediaError(f"{where}: pickled payload is too large to load") from None
    except Exception as e:  # truncated / malformed pickle streams
        raise MediaError(f"{where}: malformed pickle data ({type(e).__name__}: {e})") from e
    try:
        _check(obj)
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{where}: {e}") from None
    return obj


def load_npy(src: Source, *, name: str | None = None) -> np.ndarray:
    """Read any `.npy` file: numeric arrays directly, object arrays through the restricted unpickler.

    The header is parsed with `numpy.lib.format` (read_magic + read_array_header_1_0/2_0); an
    object-dtype payload is unpickled with `RestrictedUnpickler` and must yield an array of the
    header's shape.
    """
    from numpy.lib import format as npformat

    where = label(src, name)
    with open_binary(src, name) as f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = npformat.read_array_header_2_0(f)
            else:  # (3, 0): utf-8 field names; read_array_header_2_0 does not accept it on every numpy
                shape, fortran, dtype = npformat._read_array_header(f, version)  # noqa: SLF001
        except (ValueError, OSError, SyntaxError) as e:
            raise MediaError(f"{where}: not a .npy file ({e})") from e
        if not dtype.hasobject:
            f.seek(0)
            try:
                return np.load(f, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise MediaError(f"{where}: cannot read the .npy array ({e})") from e
        payload = f.read()
    arr = loads(payload, where=where)
    if not isinstance(arr, np.ndarray):
        raise MediaError(f"{where}: the pickled payload is a {type(arr).__name__}, not an array")
    if arr.shape != tuple(shape):
        raise MediaError(f"{where}: the pickled array has shape {arr.shape}, the header says {tuple(shape)}")
    return arr
