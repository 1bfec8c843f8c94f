"""The unified model in use: toy media files through the real pipeline, raw media in / unified
embeddings out, preprocessing profiles, official releases by name, sharing on the Hub (offline)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import pairfree as pf
from pairfree.cli import main
from pairfree.store import EmbeddingStore
from pairfree.toy import ToyWorldConfig, make_world
from pairfree.toy import media as TM
from pairfree.unified import UnifiedModel

Image = pytest.importorskip("PIL.Image")
sf = pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def world(request):
    cache = request.config.cache.mkdir("pairfree-cache") / "toy"
    return make_world(ToyWorldConfig(seed=0, preset="small"), cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def media_dir(world, tmp_path_factory):
    return TM.write_media(world, tmp_path_factory.mktemp("toy") / "media", progress=False)


# ------------------------------------------------------------------ toy media: lossless or within the stated bound


def test_codecs_roundtrip_within_their_bounds(world, rng):
    gen = world.renderers()
    _, raw = gen.split("test")
    codec = TM.make_codec(gen.p["raw_dim"], float(np.abs(raw["image"]).max()))
    x = raw["image"][:50]
    dec = np.stack([TM.decode_image(TM.encode_image(v, codec), codec, x.shape[1]) for v in x])
    assert np.abs(dec - x).max() <= codec["image_range"] / 65535 + 1e-6  # 16-bit quantisation
    a = raw["audio"][:50]
    dec = np.stack([TM.decode_audio(TM.encode_audio(v, codec), codec, a.shape[1]) for v in a])
    assert np.abs(dec - a).max() < 1e-5  # float32 rounding of the waveform only
    p = raw["3d"][:50]
    dec = np.stack([TM.decode_points(TM.encode_points(v, codec, rng), codec, p.shape[1]) for v in p])
    np.testing.assert_array_equal(dec, p)
    t = raw["text"][:50]
    dec = np.stack([TM.decode_text(TM.encode_text(v, "c001 with c002"), t.shape[1]) for v in t])
    np.testing.assert_array_equal(dec, t)
    assert TM.decode_text("c001 with c002", t.shape[1]) is None  # no payload: a query


def test_files_embed_as_the_world_does(world, media_dir):
    """Decoded files through the toy encoders equal the world's in-memory embeddings within the bound."""
    info = TM.read_info(media_dir)
    assert info["splits"] == ["memory", "test", "scenes"] and len(info["concepts"]) == 100
    ids = [line.split(",")[0] for line in (media_dir / "metadata.csv").read_text().splitlines()[1:]]
    assert "test/image/00003.png" in ids and "memory/texts.txt#7" in ids
    um = UnifiedModel(_identity_model(world), {s: f"toy:{media_dir}/{s}" for s in ("clip", "clap", "ulip")})
    bound = {"image": 1e-4, "audio": 1e-5, "3d": 1e-6, "text": 1e-6}
    for modality, key, src in (("image", "clip/image", media_dir / "test" / "image"),
                               ("audio", "clap/audio", media_dir / "test" / "audio"),
                               ("3d", "ulip/3d", media_dir / "test" / "3d"),
                               ("text", "clip/text", Path(media_dir / "test" / "texts.txt"))):
        z, row_ids = um.encode(modality, src, return_ids=True)
        assert len(z) == 400 and row_ids[0].endswith(("00000.png", "00000.wav", "00000.npy", "texts.txt#0"))
        err = np.abs(z - world.test[key]).max()
        assert err < bound[modality], (modality, err)


def _identity_model(world):
    """A 'model' whose unified space is each pretrained space itself (Ex-MCR's base behaviour for all)."""

    class Identity:
        spaces = {s: {"dim": sp.dim, "modalities": list(sp.modalities)} for s, sp in world.spaces.items()}

        def embed(self, space, modality, X):
            return pf.space.embedding_rows(X, self.spaces[space]["dim"], "identity")

    return Identity()


def test_points_as_ply_decode_the_same(world, tmp_path):
    small = TM.write_media(world, tmp_path / "ply", splits=("test",), points_format="ply", progress=False)
    from pairfree import media

    enc = pf.load_encoder(f"toy:{small}/ulip")
    pts = [media.load("3d", small / "test" / "3d" / f"{i:05d}.ply") for i in range(20)]
    np.testing.assert_allclose(enc.encode("3d", pts), world.test["ulip/3d"][:20], atol=1e-6)


# ------------------------------------------------------------------ the must-hold: files -> encode -> fit -> UnifiedModel


def test_media_to_stores_to_fit_to_unified_model(world, media_dir, tmp_path):
    st = tmp_path / "stores"
    jobs = [("clip", "text", "memory/texts.txt"), ("clip", "image", "memory/image"), ("clap", "text", "memory/texts.txt"),
            ("clap", "audio", "memory/audio"), ("clap", "audio", "test/audio"), ("clip", "image", "test/image")]
    for space, modality, src in jobs:
        out = st / f"{space}-{modality}-{src.split('/')[0]}"
        assert main(["encode", "--encoder", f"toy:{media_dir}/{space}", "--modality", modality, str(media_dir / src),
                     "--out", str(out), "--quiet", "--workers", "0", "--batch-size", "256"]) == 0
    mem = {f"{s}/{m}": EmbeddingStore.open(st / f"{s}-{m}-memory").array() for s, m, src in jobs[:4]}
    np.testing.assert_allclose(mem["clap/audio"], world.spaces["clap"]["audio"], atol=1e-5)
    np.testing.assert_allclose(mem["clip/image"], world.spaces["clip"]["image"], atol=1e-4)
    assert main(["fit", "--space", "clip", f"text={st / 'clip-text-memory'}", f"image={st / 'clip-image-memory'}",
                 "--space", "clap", f"text={st / 'clap-text-memory'}", f"audio={st / 'clap-audio-memory'}",
                 "--overlap", "text", "--out", str(tmp_path / "run"), "--epochs", "6", "--batch-size", "512",
                 "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    model = pf.load_model(tmp_path / "run")
    um = UnifiedModel(model, {"clip": f"toy:{media_dir}/clip", "clap": f"toy:{media_dir}/clap"})
    za = um.encode("audio", media_dir / "test" / "audio")
    zv = um.encode("image", media_dir / "test" / "image")
    # the files' embeddings = model.embed of the stores' embeddings of the same files
    np.testing.assert_allclose(za, model.embed("clap", "audio", st / "clap-audio-test"), atol=1e-5)
    np.testing.assert_allclose(zv, model.embed("clip", "image", st / "clip-image-test"), atol=1e-5)
    # retrieval on the files scores what the same model scores on the world's in-memory embeddings
    files = pf.metrics.paired_retrieval(za, zv, positives="index")["a_to_b"]
    memory = pf.metrics.paired_retrieval(model.embed("clap", "audio", world.test["clap/audio"]),
                                         model.embed("clip", "image", world.test["clip/image"]), positives="index")["a_to_b"]
    assert files["R@1"] > 0.05  # chance 1/400
    assert abs(files["R@1"] - memory["R@1"]) <= 0.005 and abs(files["mAP"] - memory["mAP"]) <= 0.003, (files, memory)


# ------------------------------------------------------------------ raw media in, lazily


def test_dict_call_in_memory_items_and_lazy_encoders(world, media_dir):
    model = pf.CMCR(pf.CMCRConfig(epochs=2, batch_size=512)).fit(world.spaces["clip"], world.spaces["clap"], "text",
                                                                  progress=False)
    um = UnifiedModel(model, {"clip": f"toy:{media_dir}/clip", "clap": f"toy:{media_dir}/clap"})
    assert um.modalities == ("text", "image", "audio") and um._encoders == {}
    out = um({"audio": [media_dir / "test" / "audio" / "00000.wav"]})
    assert set(out) == {"audio"} and out["audio"].shape == (1, model.out_dim)
    assert list(um._encoders) == ["clap"]  # the image / text encoder was never loaded
    wave, rate = sf.read(media_dir / "test" / "audio" / "00000.wav", dtype="float32")
    np.testing.assert_allclose(um.encode("audio", (wave, rate)), out["audio"], atol=1e-6)
    img = Image.open(media_dir / "test" / "image" / "00001.png")
    np.testing.assert_allclose(um.encode("image", [img, np.asarray(img)]),
                               np.repeat(um.encode("image", media_dir / "test" / "image" / "00001.png"), 2, 0), atol=1e-6)
    q = um.encode("text", ["c017", "a c017 next to a c003"])  # queries by concept name
    assert q.shape == (2, model.out_dim)
    words = um.encode("text", ["a dog barking", "a dog barking", "violin music"])  # texts the toy world never wrote
    np.testing.assert_array_equal(words[0], words[1])
    assert not np.allclose(words[0], words[2])
    with pytest.raises(ValueError, match="embeds .* not '3d'"):
        um.encode("3d", np.zeros((10, 3)))
    with pytest.raises(pf.media.MediaError, match="missing.wav: no such file"):
        um.encode("audio", media_dir / "missing.wav")
    with pytest.raises(ValueError, match="gives 64-d embeddings, but the model's space 'clap' is 48-d"):
        UnifiedModel(model, {"clap": f"toy:{media_dir}/clip"}).encode("audio", (wave, rate))


# ------------------------------------------------------------------ profiles: what each encoder is fed


def _exif_rotated_jpeg(path: Path) -> Path:
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    im.save(path, exif=exif.tobytes())
    return path


def test_profiles_on_crafted_inputs(tmp_path):
    from pairfree import media

    jpg = _exif_rotated_jpeg(tmp_path / "rot.jpg")
    assert media.load("image", jpg).size == (20, 40)  # default: shown upright
    assert media.load("image", jpg, profile="official").size == (40, 20)  # official: as stored
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (10, 200, 30), 0  # fully transparent green
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(media.load("image", tmp_path / "a.png"))[0, 0].tolist() == [255, 255, 255]  # on white
    assert np.asarray(media.load("image", tmp_path / "a.png", profile="official"))[0, 0].tolist() == [10, 200, 30]
    wave = np.sin(np.arange(44101) / 30).astype(np.float32) * 0.3  # 44.1 kHz, odd length
    sf.write(tmp_path / "a.wav", wave, 44100, subtype="FLOAT")
    d, o = media.load("audio", tmp_path / "a.wav", sample_rate=48000), \
        media.load("audio", tmp_path / "a.wav", sample_rate=48000, profile="official")
    assert len(o) == int(np.ceil(44101 * 48000 / 44100)) == 48001 + 1 and len(d) == 48001
    np.testing.assert_array_equal(o[: len(d)], d)
    librosa = pytest.importorskip("librosa")
    ref, _ = librosa.load(tmp_path / "a.wav", sr=48000)
    np.testing.assert_allclose(o, ref, atol=1e-6)  # what laion_clap's file loader produces


def _transformers():
    from pairfree.encoders.common import import_torchvision

    import_torchvision()  # before transformers imports torchvision itself
    return pytest.importorskip("transformers")


def test_profiles_for_points_and_clip_images(tmp_path):
    _transformers()
    from pairfree.encoders.ulip2 import preprocess_points
    from tiny_checkpoints import write_tiny_hf_clip, write_tiny_ulip2

    path, _ = write_tiny_ulip2(tmp_path / "pointbert_ULIP-2.pt", embed_dim=10)
    cloud = np.random.default_rng(0).normal(size=(10000, 3)).astype(np.float32) * 3 + 5  # a 10,000-point record
    default = pf.load_encoder(f"ulip2:{path}")
    official = pf.load_encoder(f"ulip2:{path}", profile="official")
    np.testing.assert_array_equal(official.preprocess("3d", cloud), cloud)  # raw points, as the official trunk
    assert default.preprocess("3d", cloud).shape == (8192, 3)
    np.testing.assert_allclose(default.preprocess("3d", cloud), preprocess_points(cloud), atol=0)
    assert np.abs(np.linalg.norm(default.preprocess("3d", cloud), axis=1).max() - 1) < 1e-5
    (tmp_path / "clip").mkdir()
    clip_dir = write_tiny_hf_clip(tmp_path / "clip", projection_dim=10)
    im = Image.fromarray((np.random.default_rng(1).random((50, 70, 3)) * 255).astype("uint8"))
    from transformers import AutoImageProcessor

    pil = AutoImageProcessor.from_pretrained(clip_dir, backend="pil")  # the PIL processor, as transformers 4.x used
    np.testing.assert_array_equal(pf.load_encoder(f"hf-clip:{clip_dir}", profile="official").preprocess("image", im),
                                  pil(images=im, return_tensors="np")["pixel_values"][0])


# ------------------------------------------------------------------ releases by name, offline


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder as a user places it: the official ulip_clip.pt and tiny 512-d CLIP and ULIP-2."""
    _transformers()
    from pf_testing import reference
    from tiny_checkpoints import write_tiny_hf_clip, write_tiny_ulip2

    d = tmp_path_factory.mktemp("weights")
    shutil.copy(reference("c-mcr", "ulip_clip.pt"), d / "ulip_clip.pt")
    (d / "clip-vit-base-patch32").mkdir()
    write_tiny_hf_clip(d / "clip-vit-base-patch32", projection_dim=512)
    write_tiny_ulip2(d / "pointbert_ULIP-2.pt", embed_dim=512)
    return d


@pytest.mark.parametrize("profile", ["official", "default"])
def test_release_from_a_weights_dir_end_to_end(weights, profile, monkeypatch, tmp_path):
    from pf_testing import reference

    monkeypatch.setenv("PAIRFREE_CACHE", str(tmp_path / "cache"))
    um = UnifiedModel.from_release("c-mcr/ulip-clip", weights_dir=weights, profile=profile)
    assert um.meta["release"] == "c-mcr/ulip-clip" and um.profile == profile
    assets = reference("assets")
    records = [assets / f"{n}.npy" for n in ("BBQ", "toilet", "train")]
    jpegs = [assets / f"{n}.jpeg" for n in ("BBQ", "toilet", "train")]
    out = um({"3d": records, "image": jpegs, "text": ["BBQ", "a toilet", "a train"]})
    assert {k: v.shape for k, v in out.items()} == {"3d": (3, 512), "image": (3, 512), "text": (3, 512)}
    # equal to the pieces by hand: the encoder's embeddings through the official projector
    from pairfree import media

    official = pf.CMCR.from_official(weights / "ulip_clip.pt")
    ulip, clip = um.encoder("ulip"), um.encoder("clip")
    pts = ulip.encode("3d", [media.load("3d", r) for r in records])
    np.testing.assert_allclose(out["3d"], official.embed("ulip", "3d", pts), atol=1e-5)
    ims = clip.encode("image", [media.load("image", j, profile=profile) for j in jpegs])
    np.testing.assert_allclose(out["image"], official.embed("clip", "image", ims), atol=1e-5)
    assert (ulip.n_points is None) == (profile == "official")


def test_release_errors_name_every_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PAIRFREE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pairfree.releases import MissingWeights

    with pytest.raises(MissingWeights) as e:
        UnifiedModel.from_release("ex-mcr/base", weights_dir=tmp_path)
    msg = str(e.value)
    for name in ("ex_clap.pt", "ex_ulip.pt", "630k-fusion-best.pt", "pointbert_ULIP-2.pt", "--weights-dir"):
        assert name in msg
    assert "raw.githubusercontent.com/MCR-PEFT/Ex-MCR/" in msg and "hf download lukewys/laion_clap" in msg
    with pytest.raises(ValueError, match=r"unknown release 'c-mcr/nope'; known: \['c-mcr/clap-clip'"):
        UnifiedModel.from_release("c-mcr/nope")
    (tmp_path / "ulip_clip.pt").write_bytes(b"not the file")
    with pytest.raises(MissingWeights, match=r"ulip_clip.pt: not the released ulip_clip.pt \(git object id"):
        UnifiedModel.from_release("c-mcr/ulip-clip", weights_dir=tmp_path)


def test_release_cli_embeds_a_folder(weights, tmp_path, capsys):
    from pf_testing import reference

    assets = tmp_path / "clouds"
    assets.mkdir()
    for n in ("BBQ", "toilet"):
        shutil.copy(reference("assets", f"{n}.npy"), assets / f"{n}.npy")
    assert main(["embed", "--release", "c-mcr/ulip-clip", "--weights-dir", str(weights), "--modality", "3d",
                 str(assets), "--output", str(tmp_path / "z.npy"), "--quiet"]) == 0
    z = np.load(tmp_path / "z.npy")
    assert z.shape == (2, 512) and (tmp_path / "z.ids.txt").read_text().splitlines() == [
        str(assets / "BBQ.npy"), str(assets / "toilet.npy")]


# ------------------------------------------------------------------ sharing: a folder, the Hub cache, offline


def test_save_and_load_pretrained_and_the_model_card(world, media_dir, tmp_path):
    model = pf.ExMCR(pf.ExMCRConfig(epochs=2, batch_size=512)).fit(
        world.spaces["clip"], {"clap": (world.spaces["clap"], "text")}, progress=False)
    um = UnifiedModel(model, {"clip": f"toy:{media_dir}/clip", "clap": f"toy:{media_dir}/clap"},
                      meta={"evaluation": {"audio_to_image": {"R@1": 0.123, "mAP": 0.2}}})
    um.save_pretrained(tmp_path / "shared")
    files = sorted(p.name for p in (tmp_path / "shared").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "unified.json"]
    again = UnifiedModel.from_pretrained(tmp_path / "shared")
    wav = media_dir / "test" / "audio" / "00004.wav"
    np.testing.assert_array_equal(again.encode("audio", wav), um.encode("audio", wav))
    card = (tmp_path / "shared" / "README.md").read_text()
    for needle in ("library_name: pairfree", "Ex-MCR", f"toy:{media_dir}/clap", "## Training configuration",
                   "fm_depth: 2", world.spaces["clap"].fingerprint("audio")[:16], "| audio_to_image | 0.123 | 0.200 |",
                   "MIT (pairfree toy world)"):
        assert needle in card, needle
    # loading never unpickles: a pickle where the weights should be is refused
    import pickle

    (tmp_path / "shared" / "model.safetensors").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        UnifiedModel.from_pretrained(tmp_path / "shared")


def test_from_pretrained_reads_the_hub_cache_offline(world, media_dir, tmp_path, monkeypatch):
    model = pf.CMCR(pf.CMCRConfig(epochs=1, batch_size=512)).fit(world.spaces["clip"], world.spaces["clap"], "text",
                                                                  progress=False)
    um = UnifiedModel(model, {"clip": f"toy:{media_dir}/clip", "clap": f"toy:{media_dir}/clap"})
    # the layout huggingface_hub writes: models--user--repo/{refs/main, snapshots/<commit>/...}
    hub = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / "models--someone--toy-space" / "snapshots" / commit
    um.save_pretrained(snap)
    (hub / "models--someone--toy-space" / "refs").mkdir()
    (hub / "models--someone--toy-space" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    loaded = UnifiedModel.from_pretrained("someone/toy-space")
    txt = media_dir / "test" / "texts.txt"
    np.testing.assert_array_equal(loaded.encode("text", txt), um.encode("text", txt))
    from pairfree.remote import OfflineError

    with pytest.raises(OfflineError, match="'someone/absent' is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        UnifiedModel.from_pretrained("someone/absent")
    with pytest.raises(OfflineError, match="cannot push to .*someone/toy-space: HF_HUB_OFFLINE is set"):
        um.push_to_hub("someone/toy-space")
    with pytest.raises(FileNotFoundError, match="no such folder, and not a Hub repository id"):
        UnifiedModel.from_pretrained(str(tmp_path / "nowhere"))


def test_push_uploads_the_saved_folder(world, media_dir, tmp_path, monkeypatch):
    """What push_to_hub hands huggingface_hub (the upload itself needs network)."""
    model = pf.CMCR(pf.CMCRConfig(epochs=1, batch_size=512)).fit(world.spaces["clip"], world.spaces["clap"], "text",
                                                                  progress=False)
    um = UnifiedModel(model, {"clip": f"toy:{media_dir}/clip", "clap": f"toy:{media_dir}/clap"})
    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            seen["repo"] = (repo_id, private, exist_ok)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            seen["files"] = sorted(os.listdir(folder_path))
            seen["unified"] = json.loads(Path(folder_path, "unified.json").read_text())

    import huggingface_hub

    import pairfree.remote as remote

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(remote, "unreachable_reason", lambda url=None, timeout=3.0: None)
    assert um.push_to_hub("someone/space", private=True) == "https://huggingface.co/someone/space"
    assert seen["repo"] == ("someone/space", True, True)
    assert seen["files"] == ["README.md", "config.json", "model.safetensors", "unified.json"]
    assert seen["unified"]["encoders"] == {"clip": f"toy:{media_dir}/clip", "clap": f"toy:{media_dir}/clap"}


def test_half_precision_end_to_end_stays_close(world, media_dir):
    model = pf.CMCR(pf.CMCRConfig(epochs=2, batch_size=512)).fit(world.spaces["clip"], world.spaces["clap"], "text",
                                                                  progress=False)
    wav = media_dir / "test" / "audio"
    full = UnifiedModel(model, {"clap": f"toy:{media_dir}/clap"}).encode("audio", wav)
    half = UnifiedModel(model, {"clap": f"toy:{media_dir}/clap"}, dtype="bfloat16")
    assert next(model.heads.parameters()).dtype == pf.connect.torch.bfloat16  # the projector too
    z = half.encode("audio", wav)
    assert z.dtype == np.float32 and np.abs(z - full).max() < 0.05
    assert np.mean(np.sum(z * full, axis=1)) > 0.999
