"""A pretrained space: unpaired, L2-normalised embeddings of each of its modalities."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, Union

import numpy as np

ArrayLike = Union[np.ndarray, "torch.Tensor", str, Path]  # noqa: F821

_CHECK_ROWS = 65536  # validate / normalise in chunks so memory-mapped arrays are never loaded whole
_NORM_TOL = 1e-3


class SpaceError(ValueError):
    """Invalid embeddings handed to pairfree; the message names the space, modality and problem."""


def as_array(x: ArrayLike, where: str) -> np.ndarray:
    """numpy view of x without copying where possible, from anything pairfree reads embeddings from.

    Accepted: numpy arrays, torch tensors, nested lists of numbers, and paths: a `.npy` file
    (memory-mapped, never unpickled), a `.npz` file holding one array (or `file.npz:key`), or a
    folder written by `pairfree encode` (an embedding store, memory-mapped when it has one shard
    or is consolidated).
    """
    if isinstance(x, (str, Path)):
        return _read_path(Path(x), where)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    if isinstance(x, (list, tuple)):
        try:
            x = np.asarray(x, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise SpaceError(f"{where}: a list of embeddings must hold numbers of equal length ({e})") from None
    if not isinstance(x, np.ndarray):
        raise SpaceError(f"{where}: expected a numpy array, torch tensor, list or a path (.npy, .npz, store folder), "
                         f"got {type(x).__name__}")
    return x


def _read_path(path: Path, where: str) -> np.ndarray:
    key = None
    if not path.exists() and ".npz:" in str(path):
        file, key = str(path).rsplit(":", 1)
        path = Path(file)
    if not path.exists():
        raise SpaceError(f"{where}: file {path} does not exist")
    if path.is_dir():
        from pairfree.store import EmbeddingStore, StoreError

        try:
            return EmbeddingStore.open(path, verify=False).array()
        except StoreError as e:
            raise SpaceError(f"{where}: {e}") from None
    try:
        if path.suffix.lower() == ".npz" or (key is not None):
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
                if key is None:
                    if len(names) != 1:
                        raise SpaceError(f"{where}: {path} holds {len(names)} arrays {names}; name one as {path}:KEY")
                    key = names[0]
                if key not in names:
                    raise SpaceError(f"{where}: {path} has no array {key!r}; it holds {names}")
                return z[key]
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except SpaceError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise SpaceError(f"{where}: {path} is not a plain numeric .npy/.npz array ({e})") from None


def normalized(x: ArrayLike, where: str, keep: tuple = (np.float32,)) -> np.ndarray:
    """Validated L2-normalised rows: the input as is (no copy) when its dtype is in `keep` and its rows
    are unit already, else a float32 copy."""
    a = as_array(x, where)
    if a.ndim != 2:
        raise SpaceError(f"{where}: expected a 2-D array (rows x dim), got shape {tuple(a.shape)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise SpaceError(f"{where}: empty array of shape {tuple(a.shape)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise SpaceError(f"{where}: expected floating-point embeddings, got dtype {a.dtype}")
    already = a.dtype in keep
    for start in range(0, a.shape[0], _CHECK_ROWS):
        chunk = np.asarray(a[start : start + _CHECK_ROWS], dtype=np.float32)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            raise SpaceError(f"{where}: row {start + int(np.argmax(bad))} contains NaN or inf")
        norms = np.linalg.norm(chunk, axis=1)
        zero = norms < 1e-12
        if zero.any():
            raise SpaceError(f"{where}: row {start + int(np.argmax(zero))} is all zeros (cannot be L2-normalised)")
        already = already and bool(np.all(np.abs(norms - 1.0) < _NORM_TOL))
    if already:
        return a
    out = np.empty(a.shape, dtype=np.float32)
    for start in range(0, a.shape[0], _CHECK_ROWS):
        chunk = np.asarray(a[start : start + _CHECK_ROWS], dtype=np.float32)
        out[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def embedding_rows(x: ArrayLike, dim: int, where: str, source: str = "") -> np.ndarray:
    """What every `embed(space, modality, X)` accepts: validated, L2-normalised float32 rows of `dim`
    columns (NaN / inf / all-zero rows and non-float dtypes refused, naming the row). An empty
    input (0 rows) gives a (0, dim) array. `source` says where such rows come from, for messages."""
    a = as_array(x, where)
    if a.ndim == 2 and a.shape[0] == 0 and a.shape[1] in (0, dim):
        return np.zeros((0, dim), np.float32)
    if a.ndim != 2 or a.shape[1] != dim:
        hint = " (one vector: pass x[None])" if a.shape == (dim,) else ""
        raise SpaceError(f"{where}: expected (n, {dim}) embeddings{source}, got shape {tuple(a.shape)}{hint}")
    return normalized(a, where)


def fingerprint(a: np.ndarray) -> str:
    """Content hash of an array (shape, dtype and bytes), for caches keyed on inputs."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((a.shape, str(a.dtype))).encode())
    for start in range(0, a.shape[0], _CHECK_ROWS):
        h.update(np.ascontiguousarray(a[start : start + _CHECK_ROWS]).tobytes())
    return h.hexdigest()


class Space:
    """One pretrained contrastive space (CLIP, CLAP, ULIP-2, ...) and its embeddings per modality.

    Rows of different modalities are *not* paired. Embeddings are validated and L2-normalised on
    entry; float32 and float16 arrays that already have unit rows (e.g. memory-mapped `.npy` stores,
    clip-retrieval's float16 `img_emb/*.npy`) are kept as they are, without copying: at paper scale
    one modality is gigabytes, and every consumer converts chunk by chunk.
    """

    def __init__(self, name: str, embeddings: Mapping[str, ArrayLike]):
        if not name or not isinstance(name, str):
            raise SpaceError(f"space name must be a non-empty string, got {name!r}")
        if not embeddings:
            raise SpaceError(f"space {name!r}: no modalities given")
        self.name = name
        self._emb: dict[str, np.ndarray] = {}
        self._fingerprints: dict[str, str] = {}
        for modality, x in embeddings.items():
            self._emb[modality] = normalized(x, f"space {name!r}, modality {modality!r}", keep=(np.float32, np.float16))
        dims = {m: a.shape[1] for m, a in self._emb.items()}
        if len(set(dims.values())) != 1:
            raise SpaceError(f"space {name!r}: modalities have different dimensions {dims}; one space has one dim")
        self.dim = next(iter(dims.values()))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._emb)

    def __getitem__(self, modality: str) -> np.ndarray:
        if modality not in self._emb:
            raise SpaceError(f"space {self.name!r} has no modality {modality!r}; it has {list(self._emb)}")
        return self._emb[modality]

    def __contains__(self, modality: str) -> bool:
        return modality in self._emb

    def count(self, modality: str) -> int:
        return int(self[modality].shape[0])

    def fingerprint(self, modality: str) -> str:
        """Content hash of one modality's embeddings (computed once: arrays are not to be changed in place)."""
        if modality not in self._fingerprints:
            self._fingerprints[modality] = fingerprint(self[modality])
        return self._fingerprints[modality]

    def describe(self) -> dict[str, dict[str, object]]:
        """{modality: {"rows", "fingerprint"}}: what a model records about the data it was fitted on."""
        return {m: {"rows": self.count(m), "fingerprint": self.fingerprint(m)} for m in self.modalities}

    def __repr__(self) -> str:
        rows = ", ".join(f"{m}: {a.shape[0]}" for m, a in self._emb.items())
        return f"Space({self.name!r}, dim={self.dim}, {rows})"


def check_overlap(x: Space, y: Space, overlap: str) -> None:
    """The overlap modality must exist in both spaces with rows aligned 1:1 (same raw samples)."""
    for s in (x, y):
        if overlap not in s:
            raise SpaceError(
                f"overlap modality {overlap!r} is missing from space {s.name!r} (it has {list(s.modalities)})"
            )
    if x.count(overlap) != y.count(overlap):
        raise SpaceError(
            f"overlap {overlap!r} rows are not aligned: space {x.name!r} has {x.count(overlap)} rows, "
            f"space {y.name!r} has {y.count(overlap)}; row i must be the same raw sample in both"
        )
    if x.name == y.name:
        raise SpaceError(f"the two spaces need different names, both are {x.name!r}")


def other_modality(space: Space, overlap: str) -> str:
    """The single non-overlap modality of a space used in a connection."""
    others = [m for m in space.modalities if m != overlap]
    if len(others) != 1:
        raise SpaceError(
            f"space {space.name!r} must hold the overlap {overlap!r} and exactly one other modality, "
            f"it holds {list(space.modalities)}"
        )
    return others[0]
