"""Crash-safe file writing (temporary name, then rename) and safe paths read from our own files.

New files and folders get the permissions any new file gets under the user's umask (mkstemp and
mkdtemp would leave them 0600 / 0700). Names read from a manifest, a model config, an index or a
cache are joined with `child_path`, which refuses anything that would leave the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator


class UnsafePathError(ValueError):
    """A path read from a file would leave its folder, or a write would follow a symlink."""


def user_cache_dir(*parts: str) -> Path:
    """pairfree's cache folder, as huggingface_hub places its own: `$PAIRFREE_CACHE`, else
    `$XDG_CACHE_HOME/pairfree`, else `~/.cache/pairfree` (never the current working folder)."""
    root = os.environ.get("PAIRFREE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg, "pairfree") if xdg else os.path.join(os.path.expanduser("~"), ".cache", "pairfree")
    return Path(root, *parts)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def child_path(folder: str | Path, name: Any, where: str) -> Path:
    """`folder / name` for a file name read from one of pairfree's own files (`where` names that file
    and field). Refused before anything is touched: non-strings, empty names, absolute paths, drive
    letters, `..`, and names whose resolved location (symlinks followed) is outside `folder`."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{where}: expected a relative file name, got {name!r}")
    posix, win = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or win.is_absolute() or win.drive or ".." in posix.parts or ".." in win.parts:
        raise UnsafePathError(f"{where}: {name!r} must name a file inside {folder}, not an absolute or '..' path")
    folder = Path(folder)
    path = folder / name
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise UnsafePathError(f"{where}: {name!r} resolves to {path.resolve()}, outside {root}")
    return path


def refuse_symlink(path: str | Path, where: str = "") -> Path:
    """Raise when `path` is a symlink: pairfree writes only to its own files, never through links."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(f"{where or path}: {path} is a symbolic link; refusing to write through it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_npy(path: str | Path, array: Any) -> None:
    """`np.save` atomically (a file object, so numpy does not append `.npy` to the temporary name)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a whole output folder under a temporary name; swap it in only when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(Path(root) / d, 0o777 & ~mask)
            for f in files:
                os.chmod(Path(root) / f, 0o666 & ~mask)
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symbolic link; refusing to replace what it points to")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
