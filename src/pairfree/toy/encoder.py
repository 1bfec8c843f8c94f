"""The toy world's spaces as registry encoders: "toy:<media folder>/<space>" (e.g. "toy:runs/media/clip").

They read the files `pairfree.toy.media.write_media` wrote through the same media loaders as CLIP,
CLAP and ULIP-2 (PIL RGB images, waveforms at `sample_rate`, (N, 3) points, strings), decode the raw
vectors and run the world's trained towers, so `pairfree encode`, stores, the unified model and
search work on the toy world exactly as on real models. A text without a payload is a query by
concept name: the mean of the prompt-template embeddings of every concept named in it ("c017");
any other text gets a deterministic vector from its words, so real captions can be run through
the toy encoders (meaningless, but valid, embeddings).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from pairfree.encoders.base import Encoder
from pairfree.toy import media as M


def split_spec(rest: str) -> tuple[Path, str]:
    folder, _, space = str(rest).rstrip("/").rpartition("/")
    if not folder or not space:
        raise ValueError(f"toy encoder spec needs '<media folder>/<space>', got {rest!r}")
    return Path(folder), space


def _hashed_words(text: str, dim: int) -> np.ndarray:
    """A deterministic raw vector for a text the toy world never wrote: the mean of one seeded
    Gaussian vector per lower-cased word, so equal texts embed equally and shared words pull texts
    together (a real tokenizer's behaviour, in miniature)."""
    import hashlib

    words = re.findall(r"\w+", text.lower()) or [""]
    vecs = [np.random.default_rng(int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")).normal(size=dim)
            for w in words]
    return np.mean(vecs, axis=0).astype(np.float32)


class ToyEncoder(Encoder):
    """One toy space (clip: image+text, clap: text+audio, ulip: image+3d) from a media folder."""

    def __init__(self, rest: str | os.PathLike, device: str = "cpu", dtype: str = "float32"):
        super().__init__(device=device, dtype=dtype)
        import torch
        from safetensors.torch import load_file

        from pairfree.toy.towers import make_tower

        self.folder, space = split_spec(str(rest))
        info = M.read_info(self.folder)
        if space not in info["spaces"]:
            raise ValueError(f"{self.folder / 'world.json'}: no space {space!r}; it has {sorted(info['spaces'])}")
        self.space, self.info, self.codec = space, info, info["codec"]
        self.modalities = tuple(info["spaces"][space])
        self.dim = int(info["space_dim"][space])
        self.raw_dim = {m: int(info["raw_dim"][m]) for m in self.modalities}
        if "audio" in self.modalities:
            self.sample_rate = int(self.codec["audio_rate"])
        wfile = self.folder / "towers" / f"{space}.safetensors"
        try:
            state = load_file(str(wfile))
        except Exception as e:
            raise ValueError(f"{wfile}: not a readable safetensors file ({e})") from None
        self.towers = {}
        for m in self.modalities:
            tower = make_tower(info["towers"][f"{space}/{m}"], self.raw_dim[m], self.dim, 0)
            tower.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(m + ".")})
            self.towers[m] = tower.to(device=device, dtype=getattr(torch, dtype)).eval()
        self.torch_dtype = getattr(torch, dtype)
        self._prompts: np.ndarray | None = None
        self.names = {n: i for i, n in enumerate(info["concepts"])}

    def prompts(self) -> np.ndarray:
        if self._prompts is None:
            self._prompts = np.load(self.folder / "prompts.npy", allow_pickle=False)
        return self._prompts

    def preprocess(self, modality: str, item: Any) -> Any:
        self.check_modality(modality)
        d = self.raw_dim[modality]
        if modality == "image":
            from PIL import Image

            if not hasattr(item, "convert"):
                raise TypeError(f"image item: expected a PIL image, got {type(item).__name__}")
            h, w = self.codec["image_shape"]
            img = item.convert("RGB")
            if img.size != (w, h):  # not one of ours: a fixed-size thumbnail of it
                img = img.resize((w, h), Image.Resampling.NEAREST)
            return M.decode_image(np.asarray(img), self.codec, d)[None]
        if modality == "audio":
            return M.decode_audio(np.asarray(item, np.float32), self.codec, d)[None]
        if modality == "3d":
            return M.decode_points(np.asarray(item, np.float32), self.codec, d)[None]
        if not isinstance(item, str):
            raise TypeError(f"text item: expected a str, got {type(item).__name__}")
        raw = M.decode_text(item, d)
        if raw is not None:
            return raw[None]
        found = [self.names[n] for n in re.findall(r"\bc\d+\b", item) if n in self.names]
        if not found:  # any other text: words hashed to a fixed raw vector (the toy world knows no words)
            return _hashed_words(item, d)[None]
        return self.prompts()[found].reshape(-1, d)  # every template of every named concept

    def patch_embeddings(self, image: Any) -> np.ndarray:
        """(rows, cols, dim) embeddings of each tile of a toy scene (a mosaic of toy images), the toy
        world's stand-in for CLIP's patch tokens; a single toy image is a 1 x 1 grid."""
        import torch

        h, w = self.codec["image_shape"]
        rgb = np.asarray(image.convert("RGB"))
        rows, cols = max(1, rgb.shape[0] // h), max(1, rgb.shape[1] // w)
        raw = [M.decode_image(rgb[r * h:(r + 1) * h, c * w:(c + 1) * w], self.codec, self.raw_dim["image"])
               for r in range(rows) for c in range(cols)]
        with torch.inference_mode():
            z = self.towers["image"](torch.from_numpy(np.stack(raw)).to(self.device, self.torch_dtype))
        return z.float().cpu().numpy().reshape(rows, cols, -1)

    def collate(self, modality: str, items: list[Any]) -> Any:
        import torch

        rows = max(len(i) for i in items)  # a payload text (1 row) is repeated: its mean is unchanged
        return torch.stack([torch.as_tensor(np.resize(i, (rows, i.shape[1]))) for i in items])

    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        self.check_modality(modality)
        b, rows, d = batch.shape
        z = self.towers[modality](batch.reshape(b * rows, d).to(self.device, self.torch_dtype))
        return z.reshape(b, rows, -1).mean(dim=1)
