"""LAION CLAP through the `laion_clap` package: registry id "laion-clap:<path to .pt | checkpoint id>".

The papers' audio space is `630k-fusion-best.pt` (DESIGN.md §6). A checkpoint id ("630k-best",
"630k-audioset-best", "630k-fusion-best", "630k-audioset-fusion-best" or upstream's model_id 0-3)
is fetched from the Hugging Face repo lukewys/laion_clap into the hub cache.

Loading: the file is read with `torch.load(weights_only=True)` (upstream's `load_ckpt` unpickles
arbitrary objects), its "state_dict" taken, a "module." prefix dropped and the stale
`text_branch.embeddings.position_ids` buffer removed, as upstream's `load_state_dict` does; then
loaded strictly into `laion_clap.CLAP_Module(enable_fusion, amodel="HTSAT-tiny")`.
`enable_fusion` defaults to what the checkpoint holds (fusion files carry `fusion_model` /
`mel_conv` weights).

audio: float32 mono at 48 kHz -> exactly `CLAP_Module.get_audio_embedding_from_data`'s per-clip
       path: int16 quantisation round-trip, then the package's `get_audio_features` (10 s clips;
       shorter ones repeat-padded; longer ones "fusion" (3 random crops + a shrunk whole) or
       "rand_trunc"). Random crops use `crop_seed` (default 0, per clip; None = numpy's global RNG).
text:  str -> the module's RoBERTa tokenizer, padded to 77 tokens (as `get_text_embedding`).

Offline use: CLAP_Module hard-codes hub names: `import laion_clap` loads the "bert-base-uncased",
"roberta-base" and "facebook/bart-base" tokenizers, and the model loads "roberta-base" (tokenizer
and RobertaModel, whose weights the checkpoint then replaces). `hub_redirects={"roberta-base":
"/local/roberta-base", ...}` makes those `from_pretrained` calls read local copies instead.

torchaudio: the fusion path computes mel spectrograms with `torchaudio.transforms`. Where
torchaudio is not installed, the package's module gets a pure-torch stand-in computing the same
`MelSpectrogram(norm=None, mel_scale="htk")` + `AmplitudeToDB(top_db=None)` (tests check it against
transformers' numpy `audio_utils` and, in the slow set, librosa).

Bad files: a missing, truncated or corrupt file, one needing arbitrary unpickling, or a state
dict that does not fit the model (fusion vs non-fusion, missing / extra / reshaped tensors) raises
an error naming the file and, for a misfit, what differs.

float16 / bfloat16: weights in that dtype; the non-fusion model's internal log-mel front end stays
float32 (float16 would turn zero-padded frames into -inf) and new tensors created inside the
audio branch take the weights' dtype (upstream pads with float32 zeros).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from typing import Any, Iterator, Mapping

import numpy as np

from pairfree.encoders.base import Encoder
from pairfree.encoders.common import (
    fixed_numpy_seed,
    import_torchaudio,
    import_torchvision,
    require,
    torch_dtype,
)

__all__ = [
    "CHECKPOINTS",
    "LaionCLAPEncoder",
    "import_laion_clap",
    "is_fusion_state",
    "load_state",
    "mismatch_report",
    "redirect_hub_names",
]

HF_REPO = "lukewys/laion_clap"
CHECKPOINTS = ("630k-best", "630k-audioset-best", "630k-fusion-best", "630k-audioset-fusion-best")  # upstream ids 0-3
MAX_SAMPLES = 480_000  # get_audio_embedding_from_data's clip length: 10 s at 48 kHz
TEXT_LENGTH = 77  # CLAP_Module.tokenizer's max_length
_HUB_CLASSES = ("RobertaTokenizer", "BertTokenizer", "BartTokenizer", "RobertaModel", "BertModel", "BartModel")


@contextlib.contextmanager
def redirect_hub_names(mapping: Mapping[str, str] | None) -> Iterator[None]:
    """While active, transformers' `<Class>.from_pretrained(name)` for the classes laion_clap uses
    reads `mapping[name]` when `name` is a key. Empty/None: nothing is patched (upstream as is)."""
    if not mapping:
        yield
        return
    import transformers

    saved = []
    for cls_name in _HUB_CLASSES:
        cls = getattr(transformers, cls_name)
        own = cls.__dict__.get("from_pretrained")
        original = cls.from_pretrained.__func__

        def redirected(klass: type, name: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            return _original(klass, mapping.get(str(name), name), *args, **kwargs)

        cls.from_pretrained = classmethod(redirected)
        saved.append((cls, own))
    try:
        yield
    finally:
        for cls, own in saved:
            if own is None:
                del cls.from_pretrained
            else:
                cls.from_pretrained = own


def _torchaudio_standin() -> Any:
    """`transforms.MelSpectrogram` / `AmplitudeToDB` with torchaudio's maths, for laion_clap's `get_mel`."""
    import types

    import torch

    class MelSpectrogram(torch.nn.Module):
        def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int,
                     f_min: float, f_max: float, center: bool = True, pad_mode: str = "reflect",
                     power: float = 2.0, norm: str | None = None, onesided: bool = True) -> None:  # fmt: skip
            super().__init__()
            if norm is not None or power != 2.0 or not onesided:
                raise NotImplementedError("the torchaudio stand-in covers laion_clap's get_mel settings only")
            self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
            self.center, self.pad_mode = center, pad_mode
            self.register_buffer("window", torch.hann_window(win_length))
            # torchaudio.functional.melscale_fbanks(mel_scale="htk", norm=None)
            all_freqs = torch.linspace(0, sample_rate // 2, n_fft // 2 + 1)
            m_min, m_max = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
            f_pts = 700.0 * (10.0 ** (torch.linspace(m_min, m_max, n_mels + 2) / 2595.0) - 1.0)
            f_diff = f_pts[1:] - f_pts[:-1]
            slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
            down = (-1.0 * slopes[:, :-2]) / f_diff[:-1]
            up = slopes[:, 2:] / f_diff[1:]
            self.register_buffer("fb", torch.max(torch.zeros(1), torch.min(down, up)))

        def forward(self, waveform: torch.Tensor) -> torch.Tensor:
            shape = waveform.shape
            spec = torch.stft(
                waveform.reshape(-1, shape[-1]), n_fft=self.n_fft, hop_length=self.hop_length,
                win_length=self.win_length, window=self.window, center=self.center, pad_mode=self.pad_mode,
                normalized=False, onesided=True, return_complex=True,
            )  # fmt: skip
            spec = spec.reshape(shape[:-1] + spec.shape[-2:]).abs().pow(2.0)
            return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)

    class AmplitudeToDB(torch.nn.Module):
        def __init__(self, stype: str = "power", top_db: float | None = None) -> None:
            super().__init__()
            if stype != "power" or top_db is not None:
                raise NotImplementedError("the torchaudio stand-in covers laion_clap's get_mel settings only")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 10.0 * torch.log10(torch.clamp(x, min=1e-10))

    transforms = types.SimpleNamespace(MelSpectrogram=MelSpectrogram, AmplitudeToDB=AmplitudeToDB)
    return types.SimpleNamespace(transforms=transforms, __name__="pairfree torchaudio stand-in")


MIN_VERSION = (1, 1, 6)  # 1.1.4/1.1.5 import their data module as a top-level `training` and squeeze batches


def import_laion_clap(redirects: Mapping[str, str] | None = None) -> Any:
    """Import `laion_clap` (its import loads three hub tokenizers: see `redirect_hub_names`)."""
    if sys.modules.get("laion_clap") is None:
        _check_version()
        require("transformers", "clap")
        import_torchvision()
        import_torchaudio()  # a torchaudio whose extension fails would otherwise break laion_clap's import
        from pairfree.remote import hub_access

        hint = "hub_redirects={'roberta-base': LOCAL_DIR, ...} points laion_clap at local copies"
        with redirect_hub_names(redirects), hub_access("laion_clap tokenizer", "roberta-base", hint):
            require("laion_clap", "clap")
    data = sys.modules["laion_clap.training.data"]
    if getattr(data, "torchaudio", None) is None:
        data.torchaudio = _torchaudio_standin()
    return sys.modules["laion_clap"]


def resolve_checkpoint(path_or_id: str | os.PathLike) -> str:
    """A local file as is; a known checkpoint id fetched into the Hugging Face cache."""
    path = os.fspath(path_or_id)
    if os.path.isfile(path):
        return path
    name = path[:-3] if path.endswith(".pt") else path
    if name.isdigit() and int(name) < len(CHECKPOINTS):
        name = CHECKPOINTS[int(name)]
    if name not in CHECKPOINTS:
        raise FileNotFoundError(f"laion-clap checkpoint {path!r}: no such file, and not one of the ids {list(CHECKPOINTS)}")
    from huggingface_hub import hf_hub_download

    from pairfree.remote import hub_access

    with hub_access("laion-clap checkpoint", f"{HF_REPO}/{name}.pt", hint="pass the path of the .pt file"):
        return hf_hub_download(HF_REPO, f"{name}.pt")


def load_state(path: str) -> dict[str, Any]:
    """The checkpoint's model state dict, read without unpickling arbitrary objects.

    Any file that is not a readable PyTorch checkpoint holding a state dict of tensors (truncated,
    corrupt, a pickle of other objects, a dict of something else) raises ValueError naming it.
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"laion-clap checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError, ...
        raise ValueError(
            f"laion-clap checkpoint {path}: not a readable PyTorch checkpoint of tensors and plain data "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"laion-clap checkpoint {path}: expected a state dict of tensors (or a dict with one under "
            f"'state_dict'), got {type(ckpt).__name__}"
        )
    if next(iter(state)).startswith("module."):
        state = {k[len("module.") :]: v for k, v in state.items()}
    state.pop("text_branch.embeddings.position_ids", None)  # a buffer newer transformers no longer save
    return state


def mismatch_report(model: Any, state: Mapping[str, Any], limit: int = 3) -> str:
    """What keeps `state` from loading strictly into `model`: missing / unexpected names, shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label} ({'; '.join(items[:limit])}{more})")
    return ", ".join(parts)


def is_fusion_state(state: Mapping[str, Any]) -> bool:
    """Fusion checkpoints carry the fusion block and the local-mel convolution; others do not."""
    return any(".fusion_model." in k or ".mel_conv" in k for k in state if k.startswith("audio_branch."))


class LaionCLAPEncoder(Encoder):
    """laion_clap's CLAP_Module with a 630k-style checkpoint (see the module docstring)."""

    modalities = ("audio", "text")
    sample_rate = 48_000

    def __init__(
        self,
        path_or_id: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "float32",
        enable_fusion: bool | None = None,
        amodel: str = "HTSAT-tiny",
        hub_redirects: Mapping[str, str] | None = None,
        crop_seed: int | None = 0,
    ):
        super().__init__(device=device, dtype=dtype)
        self.torch_dtype = torch_dtype(dtype)
        require("torch", "clap")
        import torch

        _check_installed("laion_clap", "clap")  # before any download or file check; importing it loads tokenizers
        self.path = resolve_checkpoint(path_or_id)
        self.id = f"laion-clap:{os.fspath(path_or_id)}"
        state = load_state(self.path)  # a bad file fails here, before the slow model build
        laion_clap = import_laion_clap(hub_redirects)
        self.enable_fusion = is_fusion_state(state) if enable_fusion is None else bool(enable_fusion)
        from pairfree.remote import hub_access

        with redirect_hub_names(hub_redirects), hub_access("laion_clap text model", "roberta-base",
                                                           "hub_redirects={'roberta-base': LOCAL_DIR}"):
            module = laion_clap.CLAP_Module(enable_fusion=self.enable_fusion, device="cpu", amodel=amodel)
        report = mismatch_report(module.model, state)
        if report:
            hint = ""
            if is_fusion_state(state) != self.enable_fusion:
                kind = "fusion" if is_fusion_state(state) else "non-fusion"
                hint = f"; the file holds a {kind} checkpoint (leave enable_fusion unset to follow the file)"
            raise ValueError(
                f"laion-clap checkpoint {self.path} does not fit CLAP_Module(amodel={amodel!r}, "
                f"enable_fusion={self.enable_fusion}): {report}{hint}"
            )
        module.model.load_state_dict(state, strict=True)
        _check_tokenizer(module, self.path)
        self.module = module.to(device=device, dtype=self.torch_dtype).eval()
        branch = module.model.audio_branch
        if self.torch_dtype != torch.float32 and hasattr(branch, "logmel_extractor"):
            # the non-fusion model computes its log-mel inside: kept in float32 (in float16 the
            # power floor 1e-10 underflows to 0 and zero-padded frames become -inf), as the fusion
            # path's mel is computed in float32 during preprocessing; its output is then cast
            branch.spectrogram_extractor.float()
            branch.logmel_extractor.float()
            branch.logmel_extractor.register_forward_hook(functools.partial(_cast_output, self.torch_dtype))
        self.audio_cfg = dict(module.model_cfg["audio_cfg"])
        self.sample_rate = int(self.audio_cfg.get("sample_rate", 48_000))
        self.dim = int(module.model.joint_embed_shape)
        self.crop_seed = crop_seed
        self.hub_redirects = dict(hub_redirects or {})

    def preprocess(self, modality: str, item: Any) -> Any:
        self.check_modality(modality)
        if modality == "text":
            if not isinstance(item, str):
                raise TypeError(f"text item: expected a str, got {type(item).__name__}")
            tokens = self.module.tokenizer([item])
            return {k: np.asarray(tokens[k][0], dtype=np.int64) for k in ("input_ids", "attention_mask")}
        import torch

        import_laion_clap(self.hub_redirects)  # a fresh worker process imports it here
        data = sys.modules["laion_clap.training.data"]
        wave = np.asarray(item, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"audio item: expected a non-empty 1-D mono waveform, got shape {wave.shape}")
        if not np.isfinite(wave).all():
            raise ValueError("audio item: the waveform contains NaN or infinite samples")
        wave = torch.from_numpy(data.int16_to_float32(data.float32_to_int16(wave))).float()
        with fixed_numpy_seed(self.crop_seed):
            features = data.get_audio_features(
                {}, wave, MAX_SAMPLES,
                data_truncating="fusion" if self.enable_fusion else "rand_trunc",
                data_filling="repeatpad", audio_cfg=self.audio_cfg, require_grad=False,
            )  # fmt: skip
        if self.enable_fusion:
            del features["waveform"]  # the fusion branch reads only mel_fusion and longer
        return {k: v.numpy() for k, v in features.items()}

    def collate(self, modality: str, items: list[Any]) -> Any:
        import torch

        return {k: torch.stack([torch.as_tensor(i[k]) for i in items]) for k in items[0]}

    def forward(self, modality: str, batch: Any) -> "torch.Tensor":  # noqa: F821
        self.check_modality(modality)
        model = self.module.model
        if modality == "text":
            return model.encode_text({k: v.to(self.device) for k, v in batch.items()}, device=self.device)
        inputs = {
            k: v.to(self.device, self.torch_dtype) if v.is_floating_point() and k != "waveform" else v.to(self.device)
            for k, v in batch.items()
        }  # the waveform goes to the float32 mel front end
        with _default_dtype(self.torch_dtype):
            return model.audio_projection(model.encode_audio(inputs, device=self.device)["embedding"])


def _cast_output(dtype: Any, module: Any, inputs: Any, output: Any) -> Any:
    return output.to(dtype)


@contextlib.contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    """Half precision: HTS-AT's fusion patch embedding pads the local features with
    `torch.zeros(...)` in the default dtype, which would promote them back to float32 ahead of
    half-precision weights (and fail writing into half-precision tensors); while the audio branch
    runs, new tensors take the weights' dtype."""
    import torch

    previous = torch.get_default_dtype()
    if dtype == previous:
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _check_version() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("laion_clap")
    except PackageNotFoundError:
        return  # not installed: `require` names the extra
    parts = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    if parts < MIN_VERSION:
        raise ImportError(f"laion_clap {found} is too old (pairfree needs >= {'.'.join(map(str, MIN_VERSION))}): "
                          "pip install -U 'laion_clap>=1.1.6'")


def _check_installed(module: str, extra: str) -> None:
    """ImportError naming the extra when `module` cannot be imported, without importing it."""
    import importlib.util

    if module in sys.modules:
        found = sys.modules[module] is not None
    else:
        found = importlib.util.find_spec(module) is not None
    if not found:
        raise ImportError(f"{module!r} is not installed: pip install 'pairfree[{extra}]'")


def _check_tokenizer(module: Any, path: str) -> None:
    """Fail loudly when "roberta-base" resolved to an empty tokenizer (transformers 5 builds one
    silently when the vocabulary files cannot be fetched), which would make every text embedding junk."""
    n_tokens = len(module.tokenize)
    n_embeddings = module.model.text_branch.get_input_embeddings().num_embeddings
    if n_tokens < n_embeddings // 2 or n_tokens > n_embeddings:
        raise ValueError(
            f"laion-clap {path}: the RoBERTa tokenizer has {n_tokens} tokens but the text branch embeds "
            f"{n_embeddings}; were the 'roberta-base' vocabulary files reachable? (see hub_redirects)"
        )
