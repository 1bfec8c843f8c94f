"""A sharded, crash-safe store of L2-normalised embeddings (one encoder, one modality).

Layout of a store folder:

    manifest.json        the commit record (format, encoder, modality, dim, dtype, count,
                         shards with row counts and sha256 checksums, errors, pairfree version)
    shard-00000.npy      (rows, dim) float16 or float32, L2-normalised rows
    ids-00000.txt        one id per line (the source path / key of each row of that shard)
    errors.jsonl         inputs that could not be read: {"id": ..., "reason": ...} per line
    embeddings.npy       optional: all rows as one float32 array (`EmbeddingStore.consolidate`)

A shard is committed by writing shard and ids under temporary names, renaming them, appending
its errors, then replacing manifest.json atomically. Only what the manifest lists exists:
shard / ids files it does not list and bytes of errors.jsonl past its recorded size are
leftovers of an interrupted write, removed when a writer re-opens the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pairfree.fileio import UnsafePathError, atomic_path, child_path, refuse_symlink, umask

FORMAT = "pairfree-embedding-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
CONSOLIDATED = "embeddings.npy"
DTYPES = ("float16", "float32")
_SHARD_FILE, _IDS_FILE = re.compile(r"shard-\d+\.npy"), re.compile(r"ids-\d+\.txt")
_GARBAGE = re.compile(r"^(shard-\d+\.npy|ids-\d+\.txt|embeddings\.npy|\..*\.tmp)$")
_TMP = re.compile(r"^\..*\.tmp$")
_HASH_CHUNK = 1 << 22


class StoreError(ValueError):
    """A store folder is missing, damaged or incompatible; the message names the file and field."""


def _inside(path: Path, name: Any, where: str, pattern: re.Pattern) -> Path:
    """A file named by the manifest: refused (StoreError) when it would leave the store folder or is
    not one of the store's own file names (so a crafted manifest cannot make a writer delete, say,
    a shard by calling it the stale consolidated file)."""
    try:
        child = child_path(path, name, where)
    except UnsafePathError as e:
        raise StoreError(str(e)) from None
    if not pattern.fullmatch(name):
        raise StoreError(f"{where}: {name!r} is not a store file name (expected {pattern.pattern})")
    return child


def _version() -> str:
    from pairfree import __version__

    return __version__


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_digest(path: Path, expected: str, field: str) -> None:
    digest = sha256_file(path)
    if digest != expected:
        raise StoreError(f"{path}: field {field!r} mismatch (manifest {expected[:16]}..., file {digest[:16]}...)")


def _publish(tmp: Path) -> None:
    """Make a temporary file (0600 from mkstemp) readable like any new file, and durable."""
    os.chmod(tmp, 0o666 & ~umask())
    _fsync(tmp)


def _write_manifest(path: Path, manifest: dict) -> None:
    with atomic_path(path / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        _publish(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _shard_name(i: int) -> tuple[str, str]:
    return f"shard-{i:05d}.npy", f"ids-{i:05d}.txt"


def _encode_ids(ids: Sequence[str]) -> bytes:
    return "".join(f"{i}\n" for i in ids).encode("utf-8", errors="surrogateescape")


def _decode_ids(data: bytes) -> list[str]:
    text = data.decode("utf-8", errors="surrogateescape")
    if not text:
        return []
    if not text.endswith("\n"):
        raise ValueError("the last line has no newline (truncated)")
    return text[:-1].split("\n")


def unit_rows(x: np.ndarray, where: str = "embeddings") -> np.ndarray:
    """float32 rows divided by their L2 norm; zero or non-finite rows raise StoreError."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise StoreError(f"{where}: NaN or inf in embeddings")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if (n < 1e-12).any():
        raise StoreError(f"{where}: row {int(np.argmax(n[:, 0] < 1e-12))} is all zeros")
    return x / n


# --------------------------------------------------------------------------------------- reading


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise StoreError(f"{path}: no such store folder")
    if not mpath.is_file():
        raise StoreError(f"{mpath}: missing; {path} is not an embedding store (or its first shard was never committed)")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StoreError(f"{mpath}: field 'format' must be {FORMAT!r}, got {m.get('format') if isinstance(m, dict) else m!r}")
    for key, typ in (("format_version", int), ("encoder", str), ("modality", str), ("dim", int), ("dtype", str),
                     ("count", int), ("shards", list), ("errors", dict)):
        if key not in m:
            raise StoreError(f"{mpath}: missing field {key!r}")
        if not isinstance(m[key], typ) or isinstance(m[key], bool):
            raise StoreError(f"{mpath}: field {key!r} must be {typ.__name__}, got {m[key]!r}")
    if m["format_version"] > FORMAT_VERSION:
        raise StoreError(f"{mpath}: field 'format_version' is {m['format_version']}; this pairfree reads up to {FORMAT_VERSION}")
    if m["dtype"] not in DTYPES:
        raise StoreError(f"{mpath}: field 'dtype' must be one of {DTYPES}, got {m['dtype']!r}")
    if m["dim"] <= 0:
        raise StoreError(f"{mpath}: field 'dim' must be positive, got {m['dim']}")
    for i, s in enumerate(m["shards"]):
        for key in ("file", "ids_file", "rows", "sha256", "ids_sha256"):
            if not isinstance(s, dict) or key not in s:
                raise StoreError(f"{mpath}: shards[{i}] has no field {key!r}")
        for key, pattern in (("file", _SHARD_FILE), ("ids_file", _IDS_FILE)):
            _inside(path, s[key], f"{mpath}: field 'shards[{i}].{key}'", pattern)
        for key in ("sha256", "ids_sha256"):
            if not isinstance(s[key], str):
                raise StoreError(f"{mpath}: field 'shards[{i}].{key}' must be a hex digest, got {s[key]!r}")
        if not isinstance(s["rows"], int) or isinstance(s["rows"], bool) or s["rows"] < 0:
            raise StoreError(f"{mpath}: field 'shards[{i}].rows' must be a non-negative integer, got {s['rows']!r}")
    c = m.get("consolidated")
    if c is not None:
        if not isinstance(c, dict) or not all(k in c for k in ("file", "rows", "sha256")):
            raise StoreError(f"{mpath}: field 'consolidated' must hold 'file', 'rows' and 'sha256', got {c!r}")
        _inside(path, c["file"], f"{mpath}: field 'consolidated.file'", re.compile(re.escape(CONSOLIDATED)))
    e = m["errors"]
    _inside(path, e.get("file", ERRORS), f"{mpath}: field 'errors.file'", re.compile(re.escape(ERRORS)))
    for key in ("count", "bytes"):
        if not isinstance(e.get(key, 0), int) or isinstance(e.get(key, 0), bool) or e.get(key, 0) < 0:
            raise StoreError(f"{mpath}: field 'errors.{key}' must be a non-negative integer, got {e.get(key)!r}")
    total = sum(int(s["rows"]) for s in m["shards"])
    if total != m["count"]:
        raise StoreError(f"{mpath}: field 'count' is {m['count']} but the shards hold {total} rows")
    return m


class EmbeddingStore:
    """Read access to a committed store. `EmbeddingStore.open(path)` validates it."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._ids: list[str] | None = None

    # -- opening
    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "EmbeddingStore":
        """Open and validate a store: manifest fields, every shard's shape / dtype / row count,
        ids line counts and, with `verify=True` (default), sha256 checksums of every file."""
        path = Path(path)
        m = _read_manifest(path)
        store = cls(path, m)
        for s in m["shards"]:
            store._check_shard(s, verify)
        c = m.get("consolidated")
        if c:
            store._check_array(path / c["file"], c, "consolidated", verify, np.dtype("float32"))
        return store

    def _check_array(self, fpath: Path, entry: dict, what: str, verify: bool, dtype: np.dtype) -> None:
        if not fpath.is_file():
            raise StoreError(f"{fpath}: missing ({what} listed in {MANIFEST})")
        if verify:
            _check_digest(fpath, entry["sha256"], "sha256")
        try:
            a = np.load(fpath, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise StoreError(f"{fpath}: not a readable .npy array ({e})") from e
        if a.ndim != 2 or a.shape[1] != self.dim:
            raise StoreError(f"{fpath}: field 'dim': manifest says {self.dim}, the array has shape {a.shape}")
        if a.shape[0] != int(entry["rows"]):
            raise StoreError(f"{fpath}: field 'rows': manifest says {entry['rows']}, the array has {a.shape[0]}")
        if a.dtype != dtype:
            raise StoreError(f"{fpath}: field 'dtype': manifest says {dtype}, the array is {a.dtype}")

    def _check_shard(self, s: dict, verify: bool) -> None:
        self._check_array(self.path / s["file"], s, "shard", verify, np.dtype(self.dtype))
        ipath = self.path / s["ids_file"]
        if not ipath.is_file():
            raise StoreError(f"{ipath}: missing (ids listed in {MANIFEST})")
        if verify:
            _check_digest(ipath, s["ids_sha256"], "ids_sha256")
        try:
            n = len(_decode_ids(ipath.read_bytes()))
        except ValueError as e:
            raise StoreError(f"{ipath}: {e}") from e
        if n != int(s["rows"]):
            raise StoreError(f"{ipath}: field 'rows': manifest says {s['rows']}, the file has {n} ids")

    # -- fields
    encoder = property(lambda self: self.manifest["encoder"])
    modality = property(lambda self: self.manifest["modality"])
    dim = property(lambda self: int(self.manifest["dim"]))
    dtype = property(lambda self: self.manifest["dtype"])
    count = property(lambda self: int(self.manifest["count"]))
    complete = property(lambda self: bool(self.manifest.get("complete", False)))
    meta = property(lambda self: self.manifest.get("meta", {}))
    profile = property(lambda self: self.manifest.get("profile", "default"))

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (f"EmbeddingStore({str(self.path)!r}, encoder={self.encoder!r}, modality={self.modality!r}, "
                f"dim={self.dim}, dtype={self.dtype}, count={self.count}, shards={len(self.manifest['shards'])})")

    @property
    def ids(self) -> list[str]:
        """The id of every row, in row order."""
        if self._ids is None:
            out: list[str] = []
            for s in self.manifest["shards"]:
                out.extend(_decode_ids((self.path / s["ids_file"]).read_bytes()))
            self._ids = out
        return self._ids

    def shard(self, i: int) -> np.ndarray:
        """Shard i, memory-mapped read-only."""
        return np.load(self.path / self.manifest["shards"][i]["file"], mmap_mode="r", allow_pickle=False)

    def array(self) -> np.ndarray:
        """All rows (count, dim), L2-normalised.

        Memory-mapped when the store is consolidated (float32 `embeddings.npy`) or has a single
        shard (in the stored dtype); otherwise the shards concatenated in memory in the stored
        dtype (call `consolidate()` once to get a single float32 memory map).
        """
        c = self.manifest.get("consolidated")
        if c:
            return np.load(self.path / c["file"], mmap_mode="r", allow_pickle=False)
        shards = self.manifest["shards"]
        if not shards:
            return np.zeros((0, self.dim), dtype=self.dtype)
        if len(shards) == 1:
            return self.shard(0)
        return np.concatenate([self.shard(i) for i in range(len(shards))])

    def errors(self) -> list[dict]:
        """Committed entries of errors.jsonl: {"id": ..., "reason": ...}."""
        e = self.manifest["errors"]
        p = self.path / e.get("file", ERRORS)
        if not e.get("count") or not p.is_file():
            return []
        with open(p, "rb") as f:
            data = f.read(int(e["bytes"]))
        return [json.loads(line) for line in data.decode("utf-8", errors="surrogateescape").splitlines() if line]

    def consolidate(self) -> Path:
        """Write all rows as one float32 `embeddings.npy` (re-normalised in float32, so a
        `pairfree.Space` memory-maps it without a copy), atomically, and record it in the manifest."""
        if self.manifest.get("consolidated"):
            return self.path / self.manifest["consolidated"]["file"]
        dest = self.path / CONSOLIDATED
        with atomic_path(dest) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.count, self.dim))
            row = 0
            for i, s in enumerate(self.manifest["shards"]):
                sh = self.shard(i)
                for start in range(0, len(sh), 65536):
                    chunk = unit_rows(sh[start : start + 65536], str(self.path / s["file"]))
                    out[row : row + len(chunk)] = chunk
                    row += len(chunk)
            out.flush()
            del out
            _publish(tmp)
            digest = sha256_file(tmp)
        m = dict(self.manifest)
        m["consolidated"] = {"file": CONSOLIDATED, "rows": self.count, "sha256": digest}
        _write_manifest(self.path, m)
        self.manifest = m
        return dest

    def to_space(self, name: str, consolidate: bool = False):
        """A single-modality `pairfree.Space` over this store's rows."""
        from pairfree.space import Space

        if consolidate:
            self.consolidate()
        return Space(name, {self.modality: self.array()})


# --------------------------------------------------------------------------------------- writing


def peek_manifest(path: str | Path) -> dict | None:
    """The manifest of an existing store, None when `path` does not exist or is an empty folder;
    StoreError when it is a non-empty folder that is not a store (or a damaged one)."""
    path = Path(path)
    if not path.exists():
        return None
    if not path.is_dir():
        raise StoreError(f"{path}: exists and is not a folder")
    if not (path / MANIFEST).exists():
        if any(not _TMP.match(p.name) for p in path.iterdir()):  # leftovers of a killed first commit are fine
            raise StoreError(f"{path}: not empty and has no {MANIFEST}; refusing to write a store into it")
        return None
    return _read_manifest(path)


def committed_ids(manifest: dict | None, path: str | Path) -> set[str]:
    """Ids already handled by a store: its rows and its committed errors."""
    if manifest is None:
        return set()
    store = EmbeddingStore(Path(path), manifest)
    done = set(store.ids)
    done.update(e["id"] for e in store.errors())
    return done


class StoreWriter:
    """Appends embeddings to a store in committed shards of `shard_size` rows.

    Opening an existing store resumes it: its header fields must match, uncommitted leftovers are
    removed, and `done` holds the ids already stored or recorded as errors.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        encoder: str,
        modality: str,
        dim: int,
        dtype: str = "float32",
        shard_size: int = 65536,
        meta: dict[str, Any] | None = None,
        retry_errors: bool = False,
        profile: str = "default",
    ):
        if dtype not in DTYPES:
            raise ValueError(f"store dtype must be one of {DTYPES}, got {dtype!r}")
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.path = Path(path)
        self.shard_size = int(shard_size)
        existing = peek_manifest(self.path)
        if existing is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "pairfree_version": _version(),
                "encoder": encoder, "modality": modality, "dim": int(dim), "dtype": dtype, "profile": profile,
                "count": 0, "shard_size": self.shard_size, "shards": [],
                "errors": {"file": ERRORS, "count": 0, "bytes": 0},
                "consolidated": None, "complete": False, "meta": dict(meta or {}),
            }
            self._cleanup()
            _write_manifest(self.path, self.manifest)
        else:
            mpath = self.path / MANIFEST
            for key, want in (("encoder", encoder), ("modality", modality), ("dim", int(dim)), ("dtype", dtype),
                              ("profile", profile)):
                if existing.get(key, "default" if key == "profile" else None) != want:
                    raise StoreError(
                        f"{mpath}: field {key!r} is {existing.get(key, 'default')!r}, this run writes {want!r}; "
                        f"resume with the same settings or choose another output folder"
                    )
            self.manifest = existing
            self.manifest["meta"] = {**existing.get("meta", {}), **(meta or {})}  # settings of the latest run
            if retry_errors:
                self.manifest["errors"] = {"file": ERRORS, "count": 0, "bytes": 0}
            self._cleanup()
            _write_manifest(self.path, self.manifest)
        store = EmbeddingStore(self.path, self.manifest)
        self.count_before = int(self.manifest["count"])
        self.errors_before = int(self.manifest["errors"]["count"])
        self._ids_seen = set(store.ids)
        self.done = self._ids_seen | {e["id"] for e in store.errors()}
        self._rows: list[np.ndarray] = []
        self._row_ids: list[str] = []
        self._buffered = 0
        self._errors: list[dict] = []

    # -- housekeeping
    def _cleanup(self) -> None:
        """Remove files the manifest does not list; cut errors.jsonl back to its committed size."""
        keep = {MANIFEST, ERRORS}
        for s in self.manifest["shards"]:
            keep.update((s["file"], s["ids_file"]))
        if self.manifest.get("consolidated"):
            keep.add(self.manifest["consolidated"]["file"])
        for p in self.path.iterdir():
            if p.name not in keep and _GARBAGE.match(p.name) and p.is_file():
                p.unlink()
        err = refuse_symlink(self.path / ERRORS)
        committed = int(self.manifest["errors"].get("bytes", 0))
        if err.exists() and err.stat().st_size != committed:
            with open(err, "r+b") as f:
                f.truncate(committed)

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    # -- adding
    def add(self, ids: Sequence[str], embeddings: np.ndarray) -> None:
        """Buffer rows; every full shard is committed as soon as it is complete."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.manifest["dim"] or len(embeddings) != len(ids):
            raise StoreError(
                f"{self.path}: expected ({len(ids)}, {self.manifest['dim']}) embeddings for {len(ids)} ids, "
                f"got shape {embeddings.shape}"
            )
        for i in ids:
            if not isinstance(i, str) or "\n" in i:
                raise StoreError(f"{self.path}: ids must be strings without newlines, got {i!r}")
            if i in self._ids_seen:
                raise StoreError(f"{self.path}: duplicate id {i!r}")
        if len(ids) == 0:
            return
        self._ids_seen.update(ids)
        self.done.update(ids)
        self._rows.append(unit_rows(embeddings, str(self.path)).astype(self.manifest["dtype"]))
        self._row_ids.extend(ids)
        self._buffered += len(ids)
        while self._buffered >= self.shard_size:
            self._commit(self.shard_size)

    def add_errors(self, entries: Iterable[tuple[str, str]]) -> None:
        """Record unreadable inputs; they are committed with the next shard (or `flush`)."""
        for i, reason in entries:
            self._errors.append({"id": i, "reason": str(reason)})
            self.done.add(i)

    def flush(self) -> None:
        """Commit buffered rows (a partial shard) and pending errors now."""
        if self._buffered or self._errors:
            self._commit(self._buffered)

    def finish(self, meta: dict[str, Any] | None = None) -> "EmbeddingStore":
        """Commit everything and mark the store complete (a store without a single row never is)."""
        if self.count + self._buffered == 0:
            self.flush()
            raise StoreError(f"{self.path}: no rows were added; the store is not marked complete")
        self._commit(self._buffered, complete=True, meta=meta)
        return EmbeddingStore(self.path, self.manifest)

    # -- the commit protocol
    def _commit(self, n: int, complete: bool = False, meta: dict[str, Any] | None = None) -> None:
        m = json.loads(json.dumps(self.manifest))  # deep copy: self.manifest changes only once committed
        stale = m.get("consolidated")
        if n:
            rows = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
            take, rest = rows[:n], rows[n:]
            ids, rest_ids = self._row_ids[:n], self._row_ids[n:]
            index = len(m["shards"])
            fname, iname = _shard_name(index)
            with atomic_path(self.path / fname) as tmp:
                with open(tmp, "wb") as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(take), allow_pickle=False)
                _publish(tmp)
                digest = sha256_file(tmp)
            with atomic_path(self.path / iname) as tmp:
                data = _encode_ids(ids)
                tmp.write_bytes(data)
                _publish(tmp)
                ids_digest = hashlib.sha256(data).hexdigest()
            m["shards"].append({"file": fname, "ids_file": iname, "rows": int(n), "sha256": digest, "ids_sha256": ids_digest})
            m["count"] = int(m["count"]) + int(n)
            m["consolidated"] = None
        if self._errors:
            data = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self._errors).encode("utf-8", errors="surrogateescape")
            with open(refuse_symlink(self.path / ERRORS), "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            m["errors"] = {"file": ERRORS, "count": int(m["errors"]["count"]) + len(self._errors),
                           "bytes": int(m["errors"]["bytes"]) + len(data)}
        if complete:
            m["complete"] = True
        elif n:
            m["complete"] = False
        if meta:
            m["meta"] = {**m.get("meta", {}), **meta}
        m["pairfree_version"] = _version()
        _write_manifest(self.path, m)  # the commit point
        self.manifest = m
        self._errors = []
        if n:
            self._rows = [rest] if len(rest) else []
            self._row_ids = rest_ids
            self._buffered = len(rest_ids)
            if stale and (self.path / stale["file"]).exists():
                (self.path / stale["file"]).unlink()
