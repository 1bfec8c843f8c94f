"""The toy world as real media files, so the whole raw-media path (loaders, encoders, stores, the
unified model, search) runs offline exactly as it does with CLIP, CLAP and ULIP-2.

Each item's raw vector is written in a file of its modality, losslessly or with a stated bound:

- image: an RGB PNG of `image_shape` pixels; value i (clipped to +-`image_range`, a bound chosen
  above the largest raw value) quantised to 16 bits, high byte in red and blue, low byte in green.
  It decodes through the ordinary 8-bit RGB loader; the error is at most image_range / 65535.
- audio: a 32-bit float WAV at `audio_rate` Hz: the sum of sinusoids whose amplitudes are the raw
  values (frequencies that are whole multiples of 1 / duration, so they are orthogonal over the
  clip); decoding projects the waveform back on them (float32 rounding only, ~1e-6).
- 3d: a point cloud (`.npy` float32 or binary `.ply`): the raw values as `anchors` xyz points, each
  followed by `points_per_anchor - 1` points scattered around it (something to look at); decoding
  reads every `points_per_anchor`-th point (exact).
- text: one line per item in a `.txt`: a readable caption (the concept names), " | ", then the raw
  float32 vector in URL-safe base64 (exact). A line without a payload is a query: the toy text
  encoder averages the prompt-template embeddings of the concept names it finds ("c017").

Layout of a media folder (`write_media`):

    world.json                what the toy encoders need: codec, dims, tower shapes, concept names
    towers/<space>.safetensors  the trained towers, keys "<modality>.<param>"
    prompts.npy               (n_concepts, n_templates, raw text dim) raw class prompts
    metadata.csv              id,split,modality,concept,concepts,caption (one row per item)
    memory/texts.txt, memory/image/*.png, memory/audio/*.wav, memory/3d/*.npy   (the memories)
    test/texts.txt, test/image/..., test/audio/..., test/3d/...                    (held-out paired items)
    scenes/*.png, scenes.json   localization scenes: 2 x 2 mosaics of test images; the query's concept
                                fills two tiles, their boxes are the ground truth (`write_scenes`)

Ids in metadata.csv are paths relative to the folder (`memory/image/00012.png`), texts
`memory/texts.txt#12`: the row order of `pairfree encode` over that folder.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

FORMAT, VERSION = "pairfree-toy-media", 1
SPLITS = ("memory", "test", "scenes")  # scenes: localization mosaics built from the test items
_SEP = " | "


# ------------------------------------------------------------------------------------------ codec


def make_codec(raw_dim: dict[str, int], image_max: float) -> dict[str, Any]:
    """Codec parameters for a world's raw dims (stored in world.json)."""
    d_img = raw_dim["image"]
    h = int(np.floor(np.sqrt(d_img / 1.5))) or 1
    w = int(np.ceil(d_img / h))
    rate, seconds = 8000, 0.25
    step = 1.0 / seconds  # orthogonal frequencies: whole multiples of 1 / duration
    return {
        "image_shape": [h, w],
        "image_range": float(np.ceil(image_max * 1.05 * 100) / 100),
        "audio_rate": rate,
        "audio_seconds": seconds,
        "audio_freqs": [float(step * (10 + 5 * k)) for k in range(raw_dim["audio"])],  # 40 Hz .. audible
        "audio_scale": 1.0 / (4.0 * np.sqrt(raw_dim["audio"])),
        "points_per_anchor": 17,
        "point_spread": 0.04,
    }


def encode_image(raw: np.ndarray, codec: dict) -> np.ndarray:
    """(h, w, 3) uint8 RGB holding `raw` at 16 bits per value."""
    h, w = codec["image_shape"]
    r = codec["image_range"]
    v = np.zeros(h * w)
    v[: len(raw)] = np.clip(raw, -r, r)
    q = np.rint((v + r) / (2 * r) * 65535).astype(np.uint32)
    hi, lo = (q >> 8).astype(np.uint8), (q & 255).astype(np.uint8)
    return np.stack([hi, lo, hi], axis=-1).reshape(h, w, 3)


def decode_image(rgb: np.ndarray, codec: dict, dim: int) -> np.ndarray:
    h, w = codec["image_shape"]
    r = codec["image_range"]
    a = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
    q = a[:, 0] * 256 + a[:, 1]
    return (q / 65535 * 2 * r - r)[:dim].astype(np.float32)


def _basis(codec: dict, dim: int) -> np.ndarray:
    n = int(round(codec["audio_rate"] * codec["audio_seconds"]))
    t = np.arange(n) / codec["audio_rate"]
    return np.sin(2 * np.pi * np.outer(np.asarray(codec["audio_freqs"][:dim]), t))  # (dim, n)


def encode_audio(raw: np.ndarray, codec: dict) -> np.ndarray:
    return (codec["audio_scale"] * (np.asarray(raw, np.float64) @ _basis(codec, len(raw)))).astype(np.float32)


def decode_audio(wave: np.ndarray, codec: dict, dim: int) -> np.ndarray:
    basis = _basis(codec, dim)
    n = basis.shape[1]
    x = np.zeros(n)
    x[: min(n, len(wave))] = np.asarray(wave, np.float64)[:n]
    return (x @ basis.T * (2.0 / n) / codec["audio_scale"]).astype(np.float32)


def encode_points(raw: np.ndarray, codec: dict, rng: np.random.Generator) -> np.ndarray:
    anchors = np.asarray(raw, np.float32).reshape(-1, 3)
    k = codec["points_per_anchor"]
    jitter = rng.normal(size=(len(anchors), k - 1, 3)) * codec["point_spread"] * (1.0 + np.abs(anchors).mean())
    cloud = np.concatenate([anchors[:, None, :], anchors[:, None, :] + jitter], axis=1)
    return cloud.reshape(-1, 3).astype(np.float32)


def decode_points(points: np.ndarray, codec: dict, dim: int) -> np.ndarray:
    k = codec["points_per_anchor"]
    n_anchor = dim // 3
    pts = np.asarray(points, np.float32)
    if len(pts) != n_anchor * k:  # not one of ours (an uploaded cloud): a fixed deterministic subsample
        from pairfree.media.points import sample_points

        pts = sample_points(pts, n_anchor * k)
    return pts[::k].reshape(-1)[:dim].astype(np.float32)


def encode_text(raw: np.ndarray, caption: str) -> str:
    payload = base64.urlsafe_b64encode(np.asarray(raw, "<f4").tobytes()).decode("ascii").rstrip("=")
    return f"{caption}{_SEP}{payload}"


def decode_text(line: str, dim: int) -> np.ndarray | None:
    """The raw vector of a written text line, or None when the line carries no payload (a query)."""
    if _SEP not in line:
        return None
    payload = line.rsplit(_SEP, 1)[1].strip()
    try:
        data = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (ValueError, TypeError):
        return None
    if len(data) != 4 * dim:
        return None
    return np.frombuffer(data, "<f4").astype(np.float32)


def caption(names: list[str], primary: int, secondary: int) -> str:
    return names[primary] + (f" with {names[secondary]}" if secondary >= 0 else "")


# ------------------------------------------------------------------------------------------ writing


def _write_ply(path: Path, points: np.ndarray) -> None:
    head = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(points)}\n"
            "property float x\nproperty float y\nproperty float z\nend_header\n").encode("ascii")
    path.write_bytes(head + np.ascontiguousarray(points, "<f4").tobytes())


def write_media(world, out: str | Path, splits: tuple[str, ...] = SPLITS, points_format: str = "npy",
                progress: bool = True) -> Path:
    """Write `world` (a `ToyWorld`) as media files under `out` (layout: module docstring), atomically."""
    import soundfile as sf
    from PIL import Image
    from safetensors.numpy import save_file

    from pairfree.fileio import atomic_dir
    from pairfree.progress import progress as progress_bar
    from pairfree.toy.concepts import rng_for
    from pairfree.toy.config import SPACE_MODALITIES
    from pairfree.toy.render import MODALITIES

    if points_format not in ("npy", "ply"):
        raise ValueError(f"points_format must be 'npy' or 'ply', got {points_format!r}")
    bad = set(splits) - set(SPLITS)
    if bad:
        raise ValueError(f"unknown splits {sorted(bad)}; choose from {SPLITS}")
    gen = world.renderers()
    p = gen.p
    names = world.classes["names"]
    if "scenes" in splits and "test" not in splits:
        raise ValueError("scenes are built from the test items: write splits=('test', 'scenes')")
    corpora: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}
    for split in splits:
        if split == "scenes":
            continue
        if split == "test":
            corpora["test"] = gen.split("test")
        else:
            for m in MODALITIES:
                corpora[f"memory/{m}"] = gen.split(f"memory/{m}")
    image_max = max(float(np.abs(raw["image"]).max()) for _, raw in corpora.values() if "image" in raw)
    codec = make_codec(p["raw_dim"], image_max)
    total = sum(len(items) * len(raw) for items, raw in corpora.values())
    rows: list[dict[str, Any]] = []
    with atomic_dir(out) as tmp, progress_bar(total, "toy media", progress, unit="file") as bar:
        for space, mods in SPACE_MODALITIES.items():
            state = {f"{m}.{k}": np.ascontiguousarray(v) for m in mods for k, v in world.towers[f"{space}/{m}"].items()}
            (tmp / "towers").mkdir(exist_ok=True)
            save_file(state, str(tmp / "towers" / f"{space}.safetensors"))
        np.save(tmp / "prompts.npy", gen.prompts().reshape(len(names), p["n_templates"], -1).astype(np.float32))
        for key, (items, raw) in corpora.items():
            split = key.split("/")[0]
            for m, x in raw.items():
                folder = tmp / split / m
                rng = rng_for(world.config.seed, f"media/{key}/{m}")
                texts = []
                for i in range(len(items)):
                    cap = caption(names, int(items.primary[i]), int(items.secondary[i]))
                    if m == "text":
                        texts.append(encode_text(x[i], cap))
                        rid = f"{split}/texts.txt#{i}"
                    else:
                        folder.mkdir(parents=True, exist_ok=True)
                        ext = {"image": "png", "audio": "wav", "3d": points_format}[m]
                        path = folder / f"{i:05d}.{ext}"
                        rid = str(path.relative_to(tmp))
                        if m == "image":
                            Image.fromarray(encode_image(x[i], codec), "RGB").save(path)
                        elif m == "audio":
                            sf.write(path, encode_audio(x[i], codec), codec["audio_rate"], subtype="FLOAT")
                        elif points_format == "npy":
                            np.save(path, encode_points(x[i], codec, rng))
                        else:
                            _write_ply(path, encode_points(x[i], codec, rng))
                    concepts = [names[int(items.primary[i])]] + (
                        [names[int(items.secondary[i])]] if items.secondary[i] >= 0 else [])
                    rows.append({"id": rid, "split": split, "modality": m, "concept": names[int(items.primary[i])],
                                 "concepts": " ".join(concepts), "caption": cap})
                    bar.update(1)
                if m == "text":
                    (tmp / split).mkdir(parents=True, exist_ok=True)
                    (tmp / split / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
        if "scenes" in splits:
            test_items, test_raw = corpora["test"]
            write_scenes(tmp, test_items, test_raw["image"], names, codec, rng_for(world.config.seed, "media/scenes"))
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "split", "modality", "concept", "concepts", "caption"])
            w.writeheader()
            w.writerows(rows)
        info = {
            "format": FORMAT, "version": VERSION, "world_key": world.info.get("key"), "seed": world.config.seed,
            "preset": world.config.preset, "codec": codec, "raw_dim": p["raw_dim"], "space_dim": p["space_dim"],
            "towers": {k: p["towers"][k] for k in world.towers}, "spaces": {s: list(ms) for s, ms in SPACE_MODALITIES.items()},
            "n_templates": p["n_templates"], "concepts": names, "splits": list(splits), "points_format": points_format,
        }
        (tmp / "world.json").write_text(json.dumps(info, indent=1) + "\n")
    return Path(out)


def write_scenes(folder: Path, items, raw_images: np.ndarray, names: list[str], codec: dict,
                 rng: np.random.Generator, n: int = 200) -> None:
    """`n` localization scenes: 2 x 2 mosaics of test images in which the query's concept fills two
    tiles (the query item and another item of the same concept when the test split has one) and two
    items of other concepts fill the others. The query is the first item's test audio; the ground
    truth the two concept tiles (half the frame, so a perfect map scores cIoU 1)."""
    from PIL import Image

    h, w = codec["image_shape"]
    (folder / "scenes").mkdir(parents=True, exist_ok=True)
    scenes = []
    for s in range(min(n, len(items))):
        target = s
        same = [int(i) for i in np.flatnonzero(items.primary == items.primary[target]) if i != target]
        twin = int(rng.choice(same)) if same else target
        others = [int(i) for i in rng.permutation(len(items)) if items.primary[i] != items.primary[target]][:2]
        tiles = [target, twin] + others
        order = rng.permutation(4)
        mosaic = np.zeros((2 * h, 2 * w, 3), np.uint8)
        boxes = []
        for slot, t in zip(order, tiles):
            r, c = divmod(int(slot), 2)
            mosaic[r * h:(r + 1) * h, c * w:(c + 1) * w] = encode_image(raw_images[t], codec)
            if items.primary[t] == items.primary[target]:
                boxes.append([c / 2, r / 2, (c + 1) / 2, (r + 1) / 2])
        Image.fromarray(mosaic, "RGB").save(folder / "scenes" / f"{s:05d}.png")
        scenes.append({"image": f"scenes/{s:05d}.png", "audio": f"test/audio/{target:05d}.wav", "boxes": boxes,
                       "concept": names[int(items.primary[target])]})
    (folder / "scenes.json").write_text(json.dumps(scenes, indent=0) + "\n")


def read_info(folder: str | Path) -> dict[str, Any]:
    """world.json of a toy media folder, checked; ValueError naming the file and field otherwise."""
    path = Path(folder) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a toy media folder (no world.json); write one with "
                                "`python -m pairfree.toy --media DIR`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: field 'format' must be {FORMAT!r}")
    if info.get("version") != VERSION:
        raise ValueError(f"{path}: field 'version' is {info.get('version')!r}; this pairfree reads {VERSION}")
    for key in ("codec", "raw_dim", "space_dim", "towers", "spaces", "concepts", "n_templates"):
        if key not in info:
            raise ValueError(f"{path}: missing field {key!r}")
    return info
