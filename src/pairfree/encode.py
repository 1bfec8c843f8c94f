"""Embed a folder / file list / text file / webdataset shards into a store.

    pairfree encode --encoder SPEC --modality image photos/ --out stores/clip-image   (pairfree.cli.encode)

Inputs (INPUT may be given several times, in any mix):
  - a folder: scanned recursively for files of the modality's extensions (sorted, hidden skipped);
    for --modality text, every text file in it (.txt one text per line, .csv/.tsv/.jsonl/.parquet
    with --column);
  - a file list (.txt / .lst, for image / audio / 3d): one path per line, relative paths taken
    from the list's folder, blank lines and lines starting with '#' skipped;
  - for --modality text: a text file as above;
  - webdataset shards (.tar, uncompressed): members grouped by key (the basename up to its first
    dot); per key, the member whose extension fits the modality (for text: .txt / .text / .caption,
    the whole member is one text);
  - a single media file.
Row ids: the path as given (folder joined with the relative path), `file#i` for the i-th text of
a text file, `shard.tar#key` for a webdataset sample.

Loading + `encoder.preprocess` + `encoder.collate` run in torch DataLoader workers; the model runs
under `torch.inference_mode` in the main process. Inputs that cannot be read are skipped and
recorded in the store's errors.jsonl. Re-running the same command after a kill resumes: inputs
already in committed shards (or recorded as errors) are skipped, the partial shard is recomputed.
`--backend ray` does the same with Ray Data (an encoder actor per worker) and writes the same store.
"""

from __future__ import annotations

import functools
import os
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np

from pairfree.media._common import MediaError

TAR_TEXT_EXTENSIONS = (".txt", ".text", ".caption", ".cap")
FILE_LIST_EXTENSIONS = (".txt", ".lst")
#: errors of one input that skip it (recorded in errors.jsonl); anything else is a bug and stops the run
ITEM_ERRORS = (MediaError, OSError, ValueError, UnicodeError, EOFError)


@dataclass(frozen=True)
class Item:
    """One input: a file, a member of an uncompressed tar (byte range), or a text."""

    id: str
    kind: str  # "file" | "tar" | "text" | "error" (known unreadable: `text` holds the reason)
    path: str = ""
    offset: int = 0
    size: int = 0
    member: str = ""
    text: str = ""


# ------------------------------------------------------------------------------------ listing


def _extensions(modality: str) -> tuple[str, ...]:
    from pairfree.media import EXTENSIONS

    if modality not in EXTENSIONS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {sorted(EXTENSIONS)}")
    return EXTENSIONS[modality]


def _walk(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    """Files under `folder` with one of `exts`, hidden names skipped, sorted by relative path."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith(".") and Path(f).suffix.lower() in exts:
                found.append(Path(root) / f)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _tar_items(path: Path, modality: str) -> list[Item]:
    exts = TAR_TEXT_EXTENSIONS if modality == "text" else _extensions(modality)
    try:
        tf = tarfile.open(path, "r:")  # uncompressed only: members are read back by byte range
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not an uncompressed tar file ({e}); decompress webdataset shards first") from e
    groups: dict[str, list[tarfile.TarInfo]] = {}
    with tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if base.startswith(".") or "." not in base:
                continue
            key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
            groups.setdefault(key, []).append(m)
    items = []
    for key, members in groups.items():
        fitting = [m for m in members if Path(m.name).suffix.lower() in exts]
        if not fitting:
            continue
        m = min(fitting, key=lambda m: exts.index(Path(m.name).suffix.lower()))
        items.append(Item(id=f"{path}#{key}", kind="tar", path=str(path), offset=m.offset_data, size=m.size, member=m.name))
    return items


def _text_items(path: Path, column: str | None) -> list[Item]:
    """The texts of one file as items `file#i`; a line that cannot be read becomes an error item
    `file#lineN`, a file that cannot be read at all (or holds no text) one error item `file`."""
    from pairfree.media.texts import read_texts

    try:
        texts, bad = read_texts(path, column)
    except MediaError as e:
        return [Item(id=str(path), kind="error", path=str(path), text=str(e))]
    items = [Item(id=f"{path}#{i}", kind="text", path=str(path), text=t) for i, t in enumerate(texts)]
    items += [Item(id=f"{path}#line{n}", kind="error", path=str(path), text=f"{path}: line {n} is {reason}")
              for n, reason in bad]
    if not texts and not bad:
        items.append(Item(id=str(path), kind="error", path=str(path), text=f"no texts in {path}"))
    return items


def list_inputs(inputs: Sequence[str | Path], modality: str, column: str | None = None,
                limit: int | None = None) -> list[Item]:
    """Every item of the inputs, in a deterministic order, duplicates (same id) dropped.

    Raises ValueError / FileNotFoundError when an input is missing or of an unknown kind, and
    when nothing at all is found ("no <modality> inputs in ...").
    """
    exts = _extensions(modality)
    items: list[Item] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"input {p} does not exist")
        ext = p.suffix.lower()
        if p.is_dir():
            for f in _walk(p, exts):
                items.extend(_text_items(f, column) if modality == "text" else [Item(id=str(f), kind="file", path=str(f))])
        elif ext == ".tar":
            items.extend(_tar_items(p, modality))
        elif modality == "text":
            if ext not in exts:
                raise ValueError(f"input {p}: not a folder, .tar or text file ({', '.join(exts)})")
            items.extend(_text_items(p, column))
        elif ext in FILE_LIST_EXTENSIONS:
            base = p.parent
            lines = p.read_text(encoding="utf-8-sig").splitlines()
            for line in lines:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                f = Path(line)
                f = f if f.is_absolute() else base / f
                items.append(Item(id=os.path.normpath(str(f)), kind="file", path=str(f)))
        elif ext in exts:
            items.append(Item(id=str(p), kind="file", path=str(p)))
        else:
            raise ValueError(f"input {p}: not a folder, .tar, file list (.txt/.lst) or {modality} file ({', '.join(exts)})")
    seen: set[str] = set()
    unique = []
    for it in items:
        if it.id not in seen:
            seen.add(it.id)
            unique.append(it)
    if limit is not None:
        unique = unique[: max(0, int(limit))]
    if not unique:
        where = ", ".join(str(i) for i in inputs) or "(no inputs given)"
        looked = "texts" if modality == "text" else f"files with extensions {', '.join(exts)}"
        raise ValueError(f"no {modality} inputs in {where} (looked for {looked})")
    return unique


def load_item(item: Item, modality: str, sample_rate: int | None = None, profile: str = "default") -> Any:
    """The raw model input of one item (PIL image, waveform, points or str), loaded as `profile` says."""
    from pairfree import media

    if item.kind == "text":
        return item.text
    if item.kind == "error":
        raise MediaError(item.text)
    if item.kind == "tar":
        with open(item.path, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
        if len(data) != item.size:
            raise MediaError(f"{item.id}: tar member {item.member} is truncated")
        if modality == "text":
            text = data.decode("utf-8").strip()
            if not text:
                raise MediaError(f"{item.id}: empty text")
            return text
        return media.load(modality, data, sample_rate=sample_rate, name=item.member, profile=profile)
    return media.load(modality, item.path, sample_rate=sample_rate, profile=profile)


# ------------------------------------------------------------------------------------ encoders

EncoderLike = Union[str, "Encoder", Callable[[], "Encoder"]]  # noqa: F821


def load_encoder(spec: str, device: str = "cpu", dtype: str = "float32", profile: str = "default"):
    """An encoder from the registry (`pairfree.encoders.registry.load_encoder`; new kinds are added
    with `pairfree.encoders.registry.register_encoder`)."""
    from pairfree.encoders.registry import load_encoder as registry_load

    return registry_load(spec, device, dtype, profile=profile)


def _load_by_spec(spec: str, device: str, dtype: str, profile: str):
    return sys.modules[__name__].load_encoder(spec, device, dtype, profile)


def _resolve(encoder: EncoderLike, device: str, dtype: str, profile: str = "default"):
    from pairfree.encoders.base import Encoder

    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, str):
        return _load_by_spec(encoder, device, dtype, profile)
    if callable(encoder):
        return encoder()
    raise TypeError(f"encoder must be a registry spec, an Encoder or a factory, got {type(encoder).__name__}")


def _factory(spec: str, device: str, dtype: str, profile: str = "default") -> Callable[[], Any]:
    """A picklable zero-argument factory for Ray actors (each loads the model itself).

    The registry entry of the spec's kind travels with it, so a kind registered in the driver with
    `register_encoder` loads in the Ray workers too (their registry only has the built-in kinds).
    An unknown kind fails here, in the driver, before any actor starts.
    """
    from pairfree.encoders import registry

    kind, _ = registry.parse_spec(spec)
    return functools.partial(_load_in_worker, spec, device, dtype, kind, registry._REGISTRY[kind], profile)


def _load_in_worker(spec: str, device: str, dtype: str, kind: str, kind_factory: Callable[..., Any],
                    profile: str = "default"):
    from pairfree.encoders import registry

    registry.register_encoder(kind, kind_factory, overwrite=True)
    return registry.load_encoder(spec, device, dtype, profile=profile)


def _identity(x):
    return x


# ------------------------------------------------------------------------------------ local backend


class _Items:
    """torch Dataset: load + preprocess one item; failures come back as (index, None, reason)."""

    def __init__(self, items: list[Item], modality: str, encoder, sample_rate: int | None, profile: str):
        self.items, self.modality, self.encoder, self.sample_rate = items, modality, encoder, sample_rate
        self.profile = profile

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            raw = load_item(self.items[i], self.modality, self.sample_rate, self.profile)
            return i, self.encoder.preprocess(self.modality, raw), None
        except ITEM_ERRORS as e:
            return i, None, _reason(e)


def _reason(e: BaseException) -> str:
    return str(e) if isinstance(e, MediaError) else f"{type(e).__name__}: {e}"


class _Collate:
    def __init__(self, encoder, modality: str):
        self.encoder, self.modality = encoder, modality

    def __call__(self, batch):
        ok = [(i, x) for i, x, err in batch if err is None]
        errors = [(i, err) for i, _, err in batch if err is not None]
        collated = self.encoder.collate(self.modality, [x for _, x in ok]) if ok else None
        return [i for i, _ in ok], collated, errors


def _forward(encoder, modality: str, batch) -> np.ndarray:
    import torch.nn.functional as F

    z = encoder.forward(modality, batch)
    if not hasattr(z, "float"):  # transformers-style output objects are the encoder's job; be explicit
        raise TypeError(f"encoder {encoder.id!r}.forward returned {type(z).__name__}, expected a tensor")
    return F.normalize(z.float(), dim=-1).cpu().numpy()


def _run_local(todo, modality, enc, writer, batch_size, workers, bar, profile="default"):
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _Items(todo, modality, enc, enc.sample_rate, profile),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(enc, modality),
        pin_memory=str(getattr(enc, "device", "cpu")).startswith("cuda"),
    )
    with torch.inference_mode():
        for idx, batch, errors in loader:
            writer.add_errors((todo[i].id, r) for i, r in errors)
            if idx:
                writer.add([todo[i].id for i in idx], _forward(enc, modality, batch))
            bar.update(len(idx) + len(errors))


# ------------------------------------------------------------------------------------ ray backend


class _RayEncoder:
    """Ray Data actor: one encoder per worker; load + preprocess + forward a batch of items."""

    def __init__(self, factory, modality: str, profile: str = "default"):
        self.encoder = factory()
        _check_encoder(self.encoder, modality)
        self.modality, self.profile = modality, profile

    def __call__(self, batch: dict) -> dict:
        import torch

        enc, modality = self.encoder, self.modality
        n = len(batch["pos"])
        xs, ok, reasons = [], [], [""] * n
        for k in range(n):
            item = Item(**{f: _scalar(batch[f][k]) for f in Item.__dataclass_fields__})
            try:
                xs.append(enc.preprocess(modality, load_item(item, modality, enc.sample_rate, self.profile)))
                ok.append(k)
            except ITEM_ERRORS as e:
                reasons[k] = _reason(e)
        emb = np.zeros((n, enc.dim), dtype=np.float32)
        if ok:
            with torch.inference_mode():
                emb[ok] = _forward(enc, modality, enc.collate(modality, xs))
        return {"pos": np.asarray(batch["pos"]), "emb": emb, "error": np.asarray(reasons, dtype=object)}


def _scalar(v):
    return v.item() if hasattr(v, "item") else v


def _run_ray(todo, modality, factory, writer, batch_size, workers, device, bar, profile="default"):
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ImportError("--backend ray needs Ray Data: pip install 'pairfree[ray]'") from e
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
    ctx.execution_options.preserve_order = True  # rows come back in input order
    ctx.enable_progress_bars = False  # our tqdm bar counts the items
    try:
        rows = [{"pos": k, **asdict(it)} for k, it in enumerate(todo)]
        ds = ray.data.from_items(rows).map_batches(
            _RayEncoder,
            fn_constructor_kwargs={"factory": factory, "modality": modality, "profile": profile},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=max(1, workers)),
            num_gpus=1 if str(device).startswith("cuda") else 0,
            num_cpus=1,
        )
        expect = 0
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            pos = [int(p) for p in out["pos"]]
            if pos != list(range(expect, expect + len(pos))):
                raise RuntimeError(f"Ray returned rows out of order (expected {expect}, got {pos[:3]}...)")
            expect += len(pos)
            errors = [(todo[p].id, str(r)) for p, r in zip(pos, out["error"]) if r]
            good = [j for j, r in enumerate(out["error"]) if not r]
            writer.add_errors(errors)
            if good:
                writer.add([todo[pos[j]].id for j in good], np.asarray(out["emb"])[good])
            bar.update(len(pos))
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
    if expect != len(todo):
        raise RuntimeError(f"Ray returned {expect} of {len(todo)} rows")


# ------------------------------------------------------------------------------------ entry point


@dataclass
class EncodeResult:
    out: Path
    total: int  # items in the input set
    skipped: int  # already in the store before this run (resume)
    encoded: int  # rows added by this run
    errors: int  # inputs recorded as unreadable by this run
    seconds: float

    def summary(self) -> str:
        s = f"{self.out}: {self.encoded} encoded"
        if self.skipped:
            s += f", {self.skipped} already done"
        if self.errors:
            s += f", {self.errors} unreadable (see {self.out / 'errors.jsonl'})"
        rate = self.encoded / self.seconds if self.seconds > 0 else 0.0
        return s + f" in {self.seconds:.1f} s ({rate:.1f} items/s)"


def encode(
    inputs: Sequence[str | Path],
    *,
    encoder: EncoderLike,
    modality: str,
    out: str | Path,
    batch_size: int = 64,
    workers: int = 0,
    shard_size: int = 65536,
    dtype: str = "float32",
    device: str = "cpu",
    model_dtype: str = "float32",
    column: str | None = None,
    backend: str = "local",
    limit: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    profile: str = "default",
) -> EncodeResult:
    """Encode `inputs` into the store `out` (created, or resumed when it exists); see the module doc.

    `encoder` is a registry spec, an `Encoder`, or a zero-argument factory returning one. `profile`
    chooses the preprocessing ("default" or "official", `pairfree.media.profiles`); it is part of
    the store's header, so a store is never resumed with another one.
    Raises ValueError when there is nothing to encode, or when no input could be read (naming the
    first reasons); no store is created in either case.
    """
    from pairfree.store import StoreWriter, committed_ids, peek_manifest

    if backend not in ("local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; expected 'local' or 'ray'")
    if batch_size <= 0 or shard_size <= 0 or workers < 0:
        raise ValueError("batch size and shard size must be positive, workers >= 0")
    start = time.perf_counter()
    out = Path(out)
    items = list_inputs(inputs, modality, column=column, limit=limit)
    manifest = peek_manifest(out)  # before loading a model: a bad --out fails fast
    done = committed_ids(manifest, out)
    if retry_errors and manifest is not None:
        done = committed_ids({**manifest, "errors": {"count": 0, "bytes": 0}}, out)
    todo = [it for it in items if it.id not in done]
    if not todo:
        if manifest is not None and not manifest.get("complete"):
            StoreWriter(out, encoder=manifest["encoder"], modality=manifest["modality"], dim=manifest["dim"],
                        dtype=manifest["dtype"], shard_size=shard_size).finish()
        return EncodeResult(out, len(items), len(items), 0, 0, time.perf_counter() - start)

    from pairfree.media.profiles import get_profile

    profile = get_profile(profile).name
    meta = {"encoder_spec": encoder if isinstance(encoder, str) else None, "batch_size": batch_size,
            "backend": backend, "model_dtype": model_dtype}

    def open_writer(enc_id: str, dim: int):
        return StoreWriter(out, encoder=enc_id, modality=modality, dim=int(dim), dtype=dtype,
                           shard_size=shard_size, meta=meta, retry_errors=retry_errors, profile=profile)

    lazy = backend == "ray" and isinstance(encoder, str)  # then only the Ray actors load the model
    enc = None
    if not lazy:
        enc = _resolve(encoder, device, model_dtype, profile)
        _check_encoder(enc, modality)
    # the store is created with the first embeddings: an encode where nothing can be read writes none
    writer = _LazyWriter(open_writer, encoder if lazy else _encoder_id(enc, encoder), manifest)

    from pairfree.progress import progress as progress_bar

    with progress_bar(len(items), f"encode {modality}", progress, unit="item", initial=len(items) - len(todo)) as bar:
        if backend == "local":
            _run_local(todo, modality, enc, writer, batch_size, workers, bar, profile)
        else:
            factory = _factory(encoder, device, model_dtype, profile) if lazy else functools.partial(_identity, enc)
            _run_ray(todo, modality, factory, writer, batch_size, workers, device, bar, profile)
    writer = writer.writer_or_raise(len(todo))
    before = writer.count_before, writer.errors_before
    store = writer.finish()
    return EncodeResult(out, len(items), len(items) - len(todo), store.count - before[0],
                        int(store.manifest["errors"]["count"]) - before[1], time.perf_counter() - start)


def _encoder_id(enc, encoder: EncoderLike) -> str:
    return enc.id or (encoder if isinstance(encoder, str) else type(enc).__name__)


def _check_encoder(enc, modality: str) -> None:
    enc.check_modality(modality)
    if modality == "audio" and not enc.sample_rate:
        raise ValueError(f"encoder {enc.id!r} embeds audio but declares no sample_rate")


class _LazyWriter:
    """Opens the StoreWriter when the first embeddings arrive (they also show the dimension when only
    Ray actors load the model), so that an encode in which nothing could be read leaves no store.
    Errors seen before that are held back; an existing store (resume) is opened at once."""

    def __init__(self, open_writer, enc_id: str, manifest: dict | None):
        self._open, self._id, self._writer, self._errors = open_writer, enc_id, None, []
        if manifest is not None:  # resuming: the dimension is known, open now (and check the header)
            self._writer = open_writer(enc_id, manifest["dim"])

    def add_errors(self, entries) -> None:
        if self._writer is None:
            self._errors.extend(entries)
        else:
            self._writer.add_errors(entries)

    def add(self, ids, embeddings) -> None:
        if self._writer is None:
            self._writer = self._open(self._id, np.asarray(embeddings).shape[1])
            self._writer.add_errors(self._errors)
            self._errors = []
        self._writer.add(ids, embeddings)

    def writer_or_raise(self, n: int):
        if self._writer is None:
            first = "; ".join(r if r.startswith(i) else f"{i}: {r}" for i, r in self._errors[:3])
            raise ValueError(f"none of the {n} inputs could be read; no store written (first errors: {first})")
        return self._writer
