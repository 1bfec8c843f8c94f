"""The usable unified space: a fitted model (C-MCR, Ex-MCR or a baseline map) plus one encoder per
pretrained space. Raw media in, unified embeddings out; the object the command line, search and
evaluation all use.

    um = UnifiedModel(model, {"clip": "hf-clip:openai/clip-vit-base-patch32",
                              "clap": "laion-clap:630k-fusion-best"}, device="cuda", dtype="float16")
    z = um.encode("audio", "clips/")                        # a folder, files, waveforms with their rate
    out = um({"audio": ["a.wav"], "image": ["b.jpg"], "text": ["a dog barking"]})   # the official API's shape

Encoders load lazily, only for the modalities asked for (the official trunks load all three).
`sources` says which space embeds each modality (default: the first space of the model that has
it; for Ex-MCR the base). `profile` chooses the preprocessing (`pairfree.media.profiles`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from pairfree.media.profiles import get_profile
from pairfree.models import default_sources, spaces_of

#: what `encode` accepts per item, besides paths and folders
ITEM_TYPES = {
    "text": "a string (a Path is a text file: one text per line / a table column)",
    "image": "a PIL image or an (H, W, 3) uint8 array",
    "audio": "a (waveform, sample_rate) pair",
    "3d": "an (N, 3) array of xyz points",
}


class UnifiedModel:
    """A fitted unified-space model with its encoders (see the module docstring)."""

    def __init__(self, model: Any, encoders: Mapping[str, Any], *, sources: Mapping[str, Sequence[str]] | None = None,
                 device: str = "cpu", dtype: str = "float32", profile: str = "default", batch_size: int = 32,
                 encoder_options: Mapping[str, Mapping[str, Any]] | None = None, meta: Mapping[str, Any] | None = None):
        self.model = model
        self.spaces = spaces_of(model)
        unknown = set(encoders) - set(self.spaces)
        if unknown:
            raise ValueError(f"encoders given for spaces {sorted(unknown)} that the model does not have; "
                             f"it has {list(self.spaces)}")
        self.encoder_specs: dict[str, Any] = dict(encoders)
        self.sources: dict[str, tuple[str, str]] = default_sources(model)
        for modality, src in (sources or {}).items():
            space, mod = tuple(src)
            if space not in self.spaces or mod not in self.spaces[space]["modalities"]:
                raise ValueError(f"sources[{modality!r}] = {(space, mod)}: the model has no modality {mod!r} "
                                 f"in a space {space!r}; it has { {s: i['modalities'] for s, i in self.spaces.items()} }")
            self.sources[modality] = (space, mod)
        from pairfree.devices import resolve_device
        from pairfree.encoders.common import DTYPES

        resolve_device(device)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        self.device, self.dtype, self.profile = device, dtype, get_profile(profile).name
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.encoder_options = {k: dict(v) for k, v in (encoder_options or {}).items()}
        self.meta: dict[str, Any] = dict(meta or {})
        self._encoders: dict[str, Any] = {}
        from pairfree.models import fingerprint

        self.fingerprint = fingerprint(model)  # before any dtype change: indices record it
        if hasattr(model, "to"):  # the projector runs on the same device and in the same dtype
            model.to(device, dtype)

    # ---- what it can do -------------------------------------------------------------------------
    @property
    def modalities(self) -> tuple[str, ...]:
        """Modalities this model embeds from raw media (those whose space has an encoder)."""
        return tuple(m for m, (space, _) in self.sources.items() if self.encoder_specs.get(space) is not None)

    @property
    def dim(self) -> int:
        some = next(iter(self.sources.items()))
        space, mod = some[1]
        return int(self.model.embed(space, mod, np.zeros((0, self.spaces[space]["dim"]), np.float32)).shape[1])

    def __repr__(self) -> str:
        specs = {s: (e if isinstance(e, str) else type(e).__name__) for s, e in self.encoder_specs.items()}
        return (f"UnifiedModel({type(self.model).__name__}, encoders={specs}, modalities={list(self.modalities)}, "
                f"profile={self.profile!r}, device={self.device!r})")

    # ---- encoders ---------------------------------------------------------------------------------
    def encoder(self, space: str):
        """The encoder of one space, loaded on first use (the others are never loaded)."""
        if space in self._encoders:
            return self._encoders[space]
        spec = self.encoder_specs.get(space)
        if spec is None:
            raise ValueError(f"no encoder for space {space!r}: give UnifiedModel(..., encoders={{{space!r}: SPEC}})")
        if isinstance(spec, str):
            from pairfree.encoders.registry import load_encoder

            enc = load_encoder(spec, device=self.device, dtype=self.dtype, profile=self.profile,
                               **self.encoder_options.get(space, {}))
        else:
            enc = spec
        want = self.spaces[space]
        if int(enc.dim) != int(want["dim"]):
            raise ValueError(f"encoder {getattr(enc, 'id', spec)!r} gives {enc.dim}-d embeddings, but the model's "
                             f"space {space!r} is {want['dim']}-d: not the encoder it was trained with")
        self._encoders[space] = enc
        return enc

    # ---- embedding --------------------------------------------------------------------------------
    def embed(self, space: str, modality: str, X) -> np.ndarray:
        """Precomputed embeddings of one space -> the unified space (the fitted model's `embed`)."""
        return self.model.embed(space, modality, X)

    def encode(self, modality: str, inputs: Any, *, batch_size: int | None = None, return_ids: bool = False,
               progress: bool = False):
        """Unified, L2-normalised float32 rows for raw inputs of one modality.

        inputs: a path (a file, or a folder scanned recursively for the modality's files), a string
        (text), an in-memory item (see `ITEM_TYPES`), or a list of them. Rows follow the inputs in
        order (folders expanded in sorted order); `return_ids=True` also returns one id per row (the
        path, `file#i` for the i-th text of a file, `input[i]` for in-memory items). An unreadable
        input raises `MediaError` naming it; `pairfree encode` skips and records such files instead.
        """
        if modality not in self.sources:
            raise ValueError(f"this unified model embeds {sorted(self.sources)}, not {modality!r}")
        space, mod = self.sources[modality]
        enc = self.encoder(space)
        items = expand_inputs(modality, inputs)
        bs = batch_size or self.batch_size
        from pairfree.progress import progress as progress_bar

        out = []
        with progress_bar(len(items), f"encode {modality}", progress, unit="item") as bar:
            for start in range(0, len(items), bs):
                chunk = [load_input(modality, x, enc, self.profile) for _, x in items[start : start + bs]]
                out.append(self.model.embed(space, mod, enc.encode(mod, chunk, batch_size=bs)))
                bar.update(len(chunk))
        dim = self.spaces[space]["dim"]
        z = np.concatenate(out) if out else self.model.embed(space, mod, np.zeros((0, dim), np.float32))
        return (z, [i for i, _ in items]) if return_ids else z

    def localize(self, images: Any, audios: Any) -> list[np.ndarray]:
        """One similarity map per (image, audio) pair: the cosine between the audio's unified
        embedding and each image patch brought into the unified space the way the image embedding
        is (the image encoder's `patch_embeddings` through the model's image projection)."""
        space, mod = self.sources["image"]
        enc = self.encoder(space)
        if not hasattr(enc, "patch_embeddings"):
            raise ValueError(f"encoder {getattr(enc, 'id', space)!r} gives no patch embeddings; localization needs one")
        imgs = expand_inputs("image", images)
        za = self.encode("audio", audios)
        if len(imgs) != len(za):
            raise ValueError(f"localize: {len(imgs)} images but {len(za)} audio clips; give them in pairs")
        maps = []
        for (_, img), a in zip(imgs, za):
            patches = enc.patch_embeddings(load_input("image", img, enc, self.profile))
            g = patches.shape[:2]
            zp = self.model.embed(space, mod, patches.reshape(-1, patches.shape[-1]))
            maps.append((zp @ a).reshape(g))
        return maps

    def __call__(self, inputs: Mapping[str, Any], **kw: Any) -> dict[str, np.ndarray]:
        """{modality: inputs} -> {modality: unified embeddings}: the official `get_embeddings` shape."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"expected a mapping {{modality: inputs}}, got {type(inputs).__name__}")
        return {m: self.encode(m, x, **kw) for m, x in inputs.items()}

    get_embeddings = __call__

    # ---- files: see pairfree.hub -----------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **card: Any) -> Path:
        from pairfree.hub import save_pretrained

        return save_pretrained(self, path, **card)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, **kw: Any) -> "UnifiedModel":
        from pairfree.hub import from_pretrained

        return from_pretrained(path_or_repo, **kw)

    def push_to_hub(self, repo_id: str, **kw: Any) -> str:
        from pairfree.hub import push_to_hub

        return push_to_hub(self, repo_id, **kw)

    @classmethod
    def from_release(cls, name: str, **kw: Any) -> "UnifiedModel":
        from pairfree.releases import load_release

        return load_release(name, **kw)


# ---- inputs --------------------------------------------------------------------------------------
def expand_inputs(modality: str, inputs: Any) -> list[tuple[str, Any]]:
    """(id, path-or-item) for every input, folders and text files expanded, in a stable order."""
    from pairfree.media import EXTENSIONS

    if modality not in EXTENSIONS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(EXTENSIONS)}")
    single = (isinstance(inputs, (str, os.PathLike)) or _is_item(modality, inputs))
    seq: Iterable[Any] = [inputs] if single else inputs
    if not isinstance(seq, (list, tuple)):
        try:
            seq = list(seq)
        except TypeError:
            raise TypeError(f"{modality} inputs: expected a path, {ITEM_TYPES[modality]}, or a list of them; "
                            f"got {type(inputs).__name__}") from None
    out: list[tuple[str, Any]] = []
    for i, x in enumerate(seq):
        if modality == "text" and isinstance(x, str):
            out.append((f"input[{i}]", x))
        elif isinstance(x, (str, os.PathLike)):
            path = Path(x)
            if path.is_dir():
                out.extend(_folder(path, modality))
            elif modality == "text":
                from pairfree.media.texts import load_texts

                out.extend((f"{path}#{j}", t) for j, t in enumerate(load_texts(path)))
            elif path.is_file():
                out.append((str(path), path))
            else:
                from pairfree.media import MediaError

                raise MediaError(f"{path}: no such file or folder")
        elif _is_item(modality, x):
            out.append((f"input[{i}]", x))
        else:
            raise TypeError(f"{modality} input {i}: expected a path, {ITEM_TYPES[modality]}; got {type(x).__name__}")
    return out


def _folder(path: Path, modality: str) -> list[tuple[str, Any]]:
    from pairfree.encode import _walk
    from pairfree.media import EXTENSIONS

    files = _walk(path, EXTENSIONS[modality])
    if modality != "text":
        return [(str(f), f) for f in files]
    from pairfree.media.texts import load_texts

    return [(f"{f}#{j}", t) for f in files for j, t in enumerate(load_texts(f))]


def _is_item(modality: str, x: Any) -> bool:
    if modality == "text":
        return isinstance(x, str)
    if modality == "image":
        return hasattr(x, "convert") and hasattr(x, "size") or (isinstance(x, np.ndarray) and x.ndim == 3)
    if modality == "audio":
        return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray) and np.isscalar(x[1])
    return isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 3


def load_input(modality: str, x: Any, encoder: Any, profile: str = "default") -> Any:
    """The encoder's item type for one input (a path or an in-memory item), loaded as `profile` says."""
    from pairfree import media

    p = get_profile(profile)
    if isinstance(x, Path):
        return media.load(modality, x, sample_rate=encoder.sample_rate, profile=p)
    if modality == "image":
        from PIL import Image, ImageOps

        im = Image.fromarray(np.asarray(x, dtype=np.uint8)) if isinstance(x, np.ndarray) else x
        if p.exif_transpose:
            im = ImageOps.exif_transpose(im)
        return (im if im.mode == "RGB" else im.convert("RGB")) if p.rgb == "pil" else media.to_rgb(im)
    if modality == "audio":
        wave, rate = x
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim == 2:  # (T, C) -> mono, as the loaders do
            wave = wave.mean(axis=1)
        return media.resample(wave, int(rate), int(encoder.sample_rate), p.audio_length)
    return x
