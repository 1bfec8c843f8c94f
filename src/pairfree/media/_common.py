"""Shared pieces of the media loaders: the error type and "path or in-memory bytes" sources."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import BinaryIO, Iterator, Union

#: what every loader accepts: a path, the raw bytes of a file, or a binary file object
Source = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class MediaError(ValueError):
    """A media file could not be read; the message names the file and the reason."""


def label(src: Source, name: str | None = None) -> str:
    """How a source is named in messages: the given name, the path, or the file object's name."""
    if name:
        return str(name)
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    n = getattr(src, "name", None)
    if isinstance(n, str) and n:
        return n
    return "<in-memory data>"


def suffix(src: Source, name: str | None = None) -> str:
    """Lower-case extension (".jpg") of the source's name; "" when it has none."""
    return Path(label(src, name)).suffix.lower()


@contextlib.contextmanager
def open_binary(src: Source, name: str | None = None) -> Iterator[BinaryIO]:
    """A readable, seekable binary file for any Source; MediaError when a path does not exist."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        f = io.BytesIO(bytes(src))
        f.name = label(src, name)  # type: ignore[attr-defined]
        yield f
        return
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise MediaError(f"{label(src, name)}: no such file")
        with open(path, "rb") as f:
            yield f
        return
    if hasattr(src, "read"):
        if not (hasattr(src, "seekable") and src.seekable()):
            src = io.BytesIO(src.read())
        yield src  # type: ignore[misc]
        return
    raise TypeError(f"expected a path, bytes or a binary file object, got {type(src).__name__}")


def read_bytes(src: Source, name: str | None = None) -> bytes:
    with open_binary(src, name) as f:
        return f.read()


def missing_extra(package: str, what: str) -> ImportError:
    return ImportError(f"{what} needs the optional dependency {package!r}: pip install 'pairfree[media]'")
