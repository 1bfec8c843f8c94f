"""hf-clap and laion-clap encoders against transformers' ClapModel and laion_clap's CLAP_Module.

Offline stand-ins (nothing is downloaded): a tiny byte-level BPE vocabulary written locally serves
as the RoBERTa tokenizer (and BART's; BERT gets a tiny WordPiece list), with a one-layer RoBERTa
whose width is the 768 laion_clap hard-codes. laion_clap's hub names ("roberta-base", ...) are sent
to these folders through the encoder's `hub_redirects`.

- hf-clap: a tiny `ClapConfig` model saved with `save_pretrained`, with a `ClapProcessor`.
- laion-clap: checkpoints in the layout of the 630k releases ({"state_dict": {"module.<name>": ...}},
  plus the stale position_ids buffer), written with torch.save from a `CLAP_Module` (fusion and
  non-fusion) and compared with that same module's own embedding functions. The fast tests build
  the module with a narrow HTS-AT (laion_clap's own Swin class at width 16, one block per stage,
  under a registered config "HTSAT-pftest"); the slow test uses the real HTSAT-tiny architecture.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import pickle
import sys

import numpy as np
import pytest
from pf_testing import assert_imports_nothing_heavy, reference

from pairfree.encoders.common import import_torchvision
from pairfree.encoders.registry import load_encoder

try:
    import_torchvision()  # before transformers / laion_clap import torchvision themselves
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)
pytest.importorskip("transformers")

import torch  # noqa: E402

SR = 48_000
TEXTS = ["the sound of a cat", "dog", "a much longer caption: the cat and the dog make a sound " * 3]
TINY_AMODEL = "HTSAT-pftest"
HAS_LAION = importlib.util.find_spec("laion_clap") is not None  # not importorskip: its import loads tokenizers
needs_laion = pytest.mark.skipif(not HAS_LAION, reason="laion_clap is not installed (pip install 'pairfree[clap]')")


def clips(seed=0):
    """A short (1.3 s), a long (12.5 s) and an exactly 10 s clip: tones plus noise, amplitude < 1."""
    rng = np.random.default_rng(seed)
    out = []
    for seconds, freq in ((1.3, 440.0), (12.5, 1234.0), (10.0, 220.0)):
        t = np.arange(int(seconds * SR)) / SR
        out.append((0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))
    return out


def repeat_pad(x, n=10 * SR):
    """laion_clap / ClapFeatureExtractor "repeatpad": whole repeats, then zeros to `n` samples."""
    tiled = np.tile(x, n // len(x))
    return np.pad(tiled, (0, n - len(tiled)))


# ------------------------------------------------------------------------------- offline hub stand-ins


def byte_chars():
    """GPT-2's byte -> printable character table (RoBERTa's byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


MERGES = ["Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ c", "a t", "Ġc at", "Ġ d", "o g", "Ġd og",
          "Ġ s", "o u", "n d", "ou nd", "Ġs ound"]  # fmt: skip


def write_bpe(d):
    d.mkdir(parents=True, exist_ok=True)
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + byte_chars() + ["".join(m.split()) for m in MERGES] + ["<mask>"]
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local folders standing in for "roberta-base" (tokenizer + tiny model), "facebook/bart-base"
    and "bert-base-uncased" (tokenizers); returns laion_clap's hub name -> folder mapping."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    root = tmp_path_factory.mktemp("hub")
    write_bpe(root / "roberta")
    tokenizer = RobertaTokenizer.from_pretrained(root / "roberta")
    tokenizer.save_pretrained(root / "roberta")
    cfg = RobertaConfig(vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=80)  # fmt: skip
    torch.manual_seed(0)
    RobertaModel(cfg).save_pretrained(root / "roberta")
    write_bpe(root / "bart")
    (root / "bert").mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + ["the", "cat", "dog"]
    (root / "bert" / "vocab.txt").write_text("\n".join(words) + "\n")
    return {"roberta-base": str(root / "roberta"), "facebook/bart-base": str(root / "bart"),
            "bert-base-uncased": str(root / "bert")}  # fmt: skip


# ------------------------------------------------------------------------------------------ hf-clap


def write_hf_clap(d, tokenizer, fusion):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    cfg = ClapConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=80, projection_dim=16),
        audio_config=dict(patch_embeds_hidden_size=16, hidden_size=128, depths=[1, 1, 1, 1],
                          num_attention_heads=[1, 2, 2, 4], enable_fusion=fusion, projection_dim=16),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(int(fusion))
    model = ClapModel(cfg)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so train/eval mix-ups would show
        bn = model.audio_model.audio_encoder.batch_norm
        bn.running_mean.normal_(0.0, 3.0)
        bn.running_var.uniform_(0.5, 4.0)
    model.save_pretrained(d)
    extractor = ClapFeatureExtractor(truncation="fusion" if fusion else "rand_trunc")
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def hf_clap(hub, tmp_path_factory):
    """{fusion: (saved folder, pairfree encoder loaded from it)}: enable_fusion with truncation
    "fusion" (as laion/clap-htsat-fused), and without with "rand_trunc" (as clap-htsat-unfused)."""
    from transformers import RobertaTokenizer

    tokenizer = RobertaTokenizer.from_pretrained(hub["roberta-base"])
    out = {}
    for fusion in (True, False):
        d = write_hf_clap(tmp_path_factory.mktemp("hf_clap_fusion" if fusion else "hf_clap"), tokenizer, fusion)
        out[fusion] = (d, load_encoder(f"hf-clap:{d}"))
    return out


hf_variants = pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "rand_trunc"])


def hf_reference_audio(path, waves, is_longer=None):
    """transformers' own path: the feature extractor on the list (numpy RNG seeded 0), then
    `get_audio_features`; `is_longer` overrides the extractor's flags."""
    from transformers import ClapModel, ClapProcessor

    from pairfree.encoders.hf_clip import model_features

    model, processor = ClapModel.from_pretrained(path).eval(), ClapProcessor.from_pretrained(path)
    np.random.seed(0)
    inputs = processor.feature_extractor(waves, sampling_rate=SR, return_tensors="pt")
    flags = inputs["is_longer"] if is_longer is None else torch.tensor(is_longer).reshape(-1, 1)
    with torch.no_grad():
        out = model.get_audio_features(input_features=inputs["input_features"], is_longer=flags)
    return torch.nn.functional.normalize(model_features(out), dim=-1).numpy()


@hf_variants
def test_hf_clap_matches_transformers(hf_clap, fusion):
    from transformers import ClapModel, ClapProcessor

    from pairfree.encoders.hf_clip import model_features

    path, enc = hf_clap[fusion]
    assert (enc.modalities, enc.dim, enc.sample_rate, enc.enable_fusion) == (("audio", "text"), 16, SR, fusion)
    assert enc.id == f"hf-clap:{path}"

    model, processor = ClapModel.from_pretrained(path).eval(), ClapProcessor.from_pretrained(path)
    tokens = processor.tokenizer(TEXTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    ref_txt = torch.nn.functional.normalize(model_features(out), dim=-1).numpy()
    z_txt = enc.encode("text", TEXTS)
    assert z_txt.dtype == np.float32 and z_txt.shape == (3, 16)
    np.testing.assert_allclose(z_txt, ref_txt, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([enc.encode("text", [t]) for t in TEXTS]), z_txt, atol=1e-5)

    # a list holding a clip over 10 s: upstream sets no random flag, so it is exactly our per-clip path
    waves = clips()
    z_audio = enc.encode("audio", waves)
    assert z_audio.dtype == np.float32 and z_audio.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(z_audio, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(z_audio, hf_reference_audio(path, waves), atol=1e-5)
    # the flags are the clips' own: only the 12.5 s clip is "longer"
    assert [bool(enc.preprocess("audio", w)["is_longer"][0]) for w in waves] == [False, True, False]


@hf_variants
def test_hf_clap_lone_short_clip_keeps_its_true_flag(hf_clap, fusion):
    """Upstream flags a random clip as longer when none is (fusion): pairfree does not, so a
    clip's embedding does not depend on its batch."""
    path, enc = hf_clap[fusion]
    short = clips()[0]
    z = enc.encode("audio", [short])
    np.testing.assert_allclose(z, hf_reference_audio(path, [short], is_longer=[False]), atol=1e-5)
    # repeat-pad: the short clip is the same input as its repeats padded with zeros to 10 s
    np.testing.assert_allclose(enc.encode("audio", [repeat_pad(short)]), z, atol=1e-5)
    if fusion:
        upstream = hf_reference_audio(path, [short])  # flag forced True by the extractor
        assert not np.allclose(upstream, z, atol=1e-3)


@hf_variants
def test_hf_clap_preprocess_truncates_text_and_rejects_bad_audio(hf_clap, fusion):
    enc = hf_clap[fusion][1]
    ids = enc.preprocess("text", "the cat " * 100)
    assert len(ids) == 77 and ids[0] == 0 and ids[-1] == 2  # <s> ... </s>, as laion_clap embeds
    x = pickle.loads(pickle.dumps(enc.preprocess("audio", clips()[1])))
    assert x["input_features"].dtype == np.float32
    assert x["input_features"].shape == ((4, 1001, 64) if enc.enable_fusion else (1, 1001, 64))
    with pytest.raises(ValueError, match="1-D"):
        enc.encode("audio", [np.zeros((2, 100), dtype=np.float32)])
    with pytest.raises(ValueError, match="NaN"):
        enc.encode("audio", [np.full(100, np.nan, dtype=np.float32)])
    with pytest.raises(ValueError, match="image"):
        enc.encode("image", [None])


def test_hf_clap_bfloat16_stays_close(hf_clap):
    path, full = hf_clap[True]
    waves = clips()[:2]
    half = load_encoder(f"hf-clap:{path}", dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    for modality, items in (("audio", waves), ("text", TEXTS)):
        z = half.encode(modality, items)
        assert z.dtype == np.float32
        cos = (z * full.encode(modality, items)).sum(axis=1)
        assert cos.min() > 0.98, (modality, cos)


# --------------------------------------------------------------------------------------- laion-clap


@contextlib.contextmanager
def narrow_htsat():
    """Build CLAP_Modules with a narrow HTS-AT (laion_clap's own class, width 16, one block per
    stage, 128-d output) under the config name TINY_AMODEL. laion_clap imports its modules twice
    (as `laion_clap.clap_module` and, through the sys.path entry it adds, as `clap_module`);
    CLAP_Module uses the second."""
    factory, model_mod = sys.modules["clap_module.factory"], sys.modules["clap_module.model"]
    htsat = sys.modules["clap_module.htsat"]
    cfg = copy.deepcopy(factory._MODEL_CONFIGS["HTSAT-tiny"])
    cfg["embed_dim"] = 128

    def create_htsat_model(audio_cfg, enable_fusion=False, fusion_type="None"):
        return htsat.HTSAT_Swin_Transformer(
            spec_size=256, patch_size=4, patch_stride=(4, 4), num_classes=audio_cfg.class_num, embed_dim=16,
            depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=8, config=audio_cfg,
            enable_fusion=enable_fusion, fusion_type=fusion_type,
        )  # fmt: skip

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(factory._MODEL_CONFIGS, TINY_AMODEL, cfg)
        mp.setattr(model_mod, "create_htsat_model", create_htsat_model)
        yield


def build_laion(hub, fusion, amodel, seed):
    """A randomly initialised CLAP_Module (eval mode, non-trivial BatchNorm statistics)."""
    from pairfree.encoders.laion_clap import import_laion_clap, redirect_hub_names

    laion_clap = import_laion_clap(hub)
    torch.manual_seed(seed)
    with redirect_hub_names(hub):
        module = laion_clap.CLAP_Module(enable_fusion=fusion, device="cpu", amodel=amodel)
    with torch.no_grad():
        bn = module.model.audio_branch.bn0
        bn.running_mean.normal_(0.0, 3.0)
        bn.running_var.uniform_(0.5, 4.0)
    return module.eval()


def save_630k_layout(module, path):
    """What the 630k checkpoints hold: training metadata and the DDP-prefixed state dict, with the
    text branch's position_ids buffer older transformers saved."""
    state = {f"module.{k}": v for k, v in module.model.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    torch.save({"epoch": 45, "name": "pairfree-test", "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def laion(hub, tmp_path_factory):
    """{fusion: (checkpoint path, reference CLAP_Module, pairfree encoder loaded from the file)}."""
    if not HAS_LAION:
        pytest.skip("laion_clap is not installed (pip install 'pairfree[clap]')")
    d = tmp_path_factory.mktemp("laion")
    out = {}
    from pairfree.encoders.laion_clap import import_laion_clap

    import_laion_clap(hub)
    with narrow_htsat():
        for fusion in (True, False):
            module = build_laion(hub, fusion, TINY_AMODEL, seed=int(fusion))
            path = save_630k_layout(module, d / f"tiny-{'fusion' if fusion else 'plain'}.pt")
            out[fusion] = (path, module, load_encoder(f"laion-clap:{path}", amodel=TINY_AMODEL, hub_redirects=hub))
    return out


def load_laion(hub, path, **kw):
    with narrow_htsat():
        return load_encoder(f"laion-clap:{path}", amodel=TINY_AMODEL, hub_redirects=hub, **kw)


def laion_reference_audio(module, waves, seed=0):
    """CLAP_Module.get_audio_embedding_from_data, one clip per call with numpy's RNG seeded."""
    rows = []
    for w in waves:
        np.random.seed(seed)
        with torch.no_grad():
            rows.append(module.get_audio_embedding_from_data([w]))
    return np.concatenate(rows)


@needs_laion
@pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "plain"])
def test_laion_clap_matches_laion_clap(laion, fusion):
    path, module, enc = laion[fusion]
    assert enc.enable_fusion is fusion  # read from the checkpoint
    assert (enc.modalities, enc.dim, enc.sample_rate, enc.id) == (("audio", "text"), 512, SR, f"laion-clap:{path}")

    waves = clips()
    z = enc.encode("audio", waves)
    assert z.dtype == np.float32 and z.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-6)
    # laion_clap's own call on the whole list (only the long clip draws random numbers, so seeding
    # once before the list is seeding it before that clip, as pairfree does per clip)
    np.random.seed(0)
    with torch.no_grad():
        np.testing.assert_allclose(z, module.get_audio_embedding_from_data(waves), atol=1e-5)

    with torch.no_grad():
        ref_txt = module.get_text_embedding(TEXTS)
    z_txt = enc.encode("text", TEXTS)
    assert z_txt.dtype == np.float32 and z_txt.shape == (3, 512)
    np.testing.assert_allclose(z_txt, ref_txt, atol=1e-5)


@needs_laion
@pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "plain"])
def test_laion_clap_audio_lengths(laion, fusion, monkeypatch):
    short, long, exact = clips()
    _, module, enc = laion[fusion]
    # short: repeated whole, then zero-padded to 10 s (after the int16 round trip, which commutes)
    z_short, z_padded = enc.encode("audio", [short, repeat_pad(short)])
    np.testing.assert_allclose(z_short, z_padded, atol=1e-6)
    x = enc.preprocess("audio", long)
    assert bool(x["longer"][0])
    x = pickle.loads(pickle.dumps(x))  # preprocess output crosses to DataLoader workers
    assert not bool(enc.preprocess("audio", exact)["longer"][0])
    seeded = enc.encode("audio", [long])
    if fusion:  # 3 random 10 s crops of the mel plus the whole clip shrunk, fused
        assert x["mel_fusion"].shape == (4, 1001, 64) and "waveform" not in x
        first_10s = enc.encode("audio", [long[: 10 * SR]])
        assert np.abs(seeded - first_10s).max() > 1e-3
    else:  # one random 10 s crop, at the offset numpy's RNG draws from the crop seed
        offset = np.random.RandomState(0).randint(0, len(long) - 10 * SR + 1)
        np.testing.assert_allclose(seeded, enc.encode("audio", [long[offset : offset + 10 * SR]]), atol=1e-6)
    # crops follow crop_seed
    monkeypatch.setattr(enc, "crop_seed", 7)
    other = enc.encode("audio", [long])
    np.testing.assert_allclose(other, laion_reference_audio(module, [long], seed=7), atol=1e-5)
    assert np.abs(other - seeded).max() > 1e-4


@needs_laion
def test_laion_clap_bad_checkpoints_name_the_file(hub, laion, tmp_path):
    good_fusion, good_plain = laion[True][0], laion[False][0]

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good_plain.read_bytes()[:100_000])
    not_tensors = tmp_path / "not_tensors.pt"
    torch.save({"state_dict": {"a": 1}}, not_tensors)
    code = tmp_path / "code.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": contextlib.nullcontext()}, code)  # needs unpickling
    for bad in (garbage, truncated, not_tensors, code):
        with pytest.raises(ValueError, match=str(bad)):
            load_laion(hub, bad)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_laion(hub, tmp_path / "nowhere.pt")

    # fusion file forced into a non-fusion model: names the file and what it holds
    with pytest.raises(ValueError, match=rf"{good_fusion}.*unexpected.*fusion checkpoint"):
        load_laion(hub, good_fusion, enable_fusion=False)
    with pytest.raises(ValueError, match=rf"{good_plain}.*missing.*non-fusion checkpoint"):
        load_laion(hub, good_plain, enable_fusion=True)
    # a tensor missing, a tensor of the wrong shape
    state = torch.load(good_plain, weights_only=True)["state_dict"]
    del state["module.audio_projection.0.weight"]
    state["module.text_projection.2.bias"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "edited.pt")
    expected = (
        r"edited\.pt.*1 missing \(audio_projection\.0\.weight\)"
        r".*1 shape mismatches \(text_projection\.2\.bias: file \(3,\), model \(512,\)\)"
    )
    with pytest.raises(ValueError, match=expected):
        load_laion(hub, tmp_path / "edited.pt")


@needs_laion
@pytest.mark.parametrize("fusion, dtype", [(True, "bfloat16"), (False, "float16")])
def test_laion_clap_half_precision_stays_close(hub, laion, fusion, dtype):
    path, _, full = laion[fusion]
    half = load_laion(hub, path, dtype=dtype)
    assert next(half.module.model.text_branch.parameters()).dtype == getattr(torch, dtype)
    waves = clips()  # the short clip's zero padding would give -inf log-mels in a float16 front end
    for modality, items in (("audio", waves), ("text", TEXTS)):
        z = half.encode(modality, items)
        assert z.dtype == np.float32
        cos = (z * full.encode(modality, items)).sum(axis=1)
        assert cos.min() > 0.99, (modality, cos)
    assert torch.get_default_dtype() == torch.float32


def standin_mel(wave, f_min=50):
    """laion_clap's get_mel settings (HTSAT-tiny audio_cfg) through the torchaudio stand-in, in dB."""
    from pairfree.encoders.laion_clap import _torchaudio_standin

    ta = _torchaudio_standin()
    mel = ta.transforms.MelSpectrogram(sample_rate=SR, n_fft=1024, win_length=1024, hop_length=480, center=True,
                                       pad_mode="reflect", power=2.0, norm=None, onesided=True, n_mels=64,
                                       f_min=f_min, f_max=14000)(torch.from_numpy(wave))  # fmt: skip
    return mel.numpy(), ta.transforms.AmplitudeToDB(top_db=None)(mel).numpy()


def test_torchaudio_standin_matches_transformers_audio_utils():
    """The fusion path's mel spectrogram (torchaudio's maths, used where torchaudio does not import)
    against transformers' numpy implementation with torchaudio's conventions (htk scale, no norm)."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    wave = clips()[0][: 2 * SR]
    mel, db = standin_mel(wave)
    filters = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=50, max_frequency=14000,
                              sampling_rate=SR, norm=None, mel_scale="htk")  # fmt: skip
    ref = spectrogram(wave.astype(np.float64), window_function(1024, "hann"), frame_length=1024, hop_length=480,
                      power=2.0, center=True, pad_mode="reflect", mel_filters=filters, mel_floor=1e-30)  # fmt: skip
    assert mel.shape == ref.shape == (64, len(wave) // 480 + 1)
    np.testing.assert_allclose(mel, ref, rtol=1e-3, atol=1e-5 * ref.max())
    np.testing.assert_allclose(db, 10 * np.log10(np.maximum(ref, 1e-10)), atol=2e-3)


@pytest.mark.slow  # librosa compiles its numba kernels on first use (tens of seconds)
def test_torchaudio_standin_matches_librosa():
    librosa = pytest.importorskip("librosa")
    wave = clips()[0]
    mel, db = standin_mel(wave)
    ref = librosa.feature.melspectrogram(y=wave, sr=SR, n_fft=1024, hop_length=480, win_length=1024, center=True,
                                         pad_mode="reflect", power=2.0, n_mels=64, fmin=50, fmax=14000, htk=True,
                                         norm=None)  # fmt: skip
    assert mel.shape == ref.shape == (64, len(wave) // 480 + 1)
    np.testing.assert_allclose(mel, ref, rtol=1e-3, atol=1e-4 * ref.max())
    np.testing.assert_allclose(db, librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None), atol=1e-4)


# ------------------------------------------------------------------------------ the official demo audio


@needs_laion
def test_demo_wavs_through_load_audio_and_tiny_clap(laion, hf_clap):
    """The official demo's .wav files (32 kHz, 10 s) -> pairfree.media.load_audio at 48 kHz ->
    tiny CLAP encoders, equal to laion_clap's / transformers' own embeddings of the same waveforms."""
    from pairfree.media import load_audio

    paths = [reference("assets", f"{name}.wav") for name in ("BBQ", "toilet", "train")]
    laion_enc = laion[True][2]
    waves = [load_audio(p, laion_enc.sample_rate) for p in paths]
    for p, w in zip(paths, waves):
        assert w.dtype == np.float32 and w.ndim == 1 and abs(len(w) - 10 * SR) <= 48, (p, len(w))
        assert 0 < np.abs(w).max() <= 1.0, p
    z = laion_enc.encode("audio", waves)
    np.testing.assert_allclose(z, laion_reference_audio(laion[True][1], waves), atol=1e-5)
    assert np.abs(z[0] - z[1]).max() > 1e-3  # different sounds, different embeddings

    path, hf_enc = hf_clap[True]
    flags = [len(w) > 10 * SR and hf_enc.enable_fusion for w in waves]
    np.testing.assert_allclose(hf_enc.encode("audio", waves), hf_reference_audio(path, waves, is_longer=flags), atol=1e-5)


# ------------------------------------------------------------------------------------------- imports


def test_clap_modules_import_nothing_heavy():
    assert_imports_nothing_heavy("import pairfree.encoders.hf_clap, pairfree.encoders.laion_clap",
                                 ("torch", "transformers", "laion_clap", "torchvision", "librosa"))


# ---------------------------------------------------------------------------- real HTSAT-tiny (slow)


@needs_laion
@pytest.mark.slow
@pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "plain"])
def test_laion_clap_full_htsat_tiny_matches_laion_clap(hub, tmp_path, fusion):
    """The 630k checkpoints' architecture (HTSAT-tiny, 31M audio parameters) in the 630k layout."""
    from pairfree.encoders.laion_clap import import_laion_clap

    import_laion_clap(hub)
    module = build_laion(hub, fusion, "HTSAT-tiny", seed=2)
    path = save_630k_layout(module, tmp_path / ("630k-fusion-like.pt" if fusion else "630k-like.pt"))
    enc = load_encoder(f"laion-clap:{path}", hub_redirects=hub)
    assert enc.enable_fusion is fusion and enc.dim == 512
    waves = clips()[:2]  # short and long
    np.testing.assert_allclose(enc.encode("audio", waves), laion_reference_audio(module, waves), atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(enc.encode("text", TEXTS), module.get_text_embedding(TEXTS), atol=1e-5)
