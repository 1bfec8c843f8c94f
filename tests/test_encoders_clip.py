"""hf-clip and open_clip encoders against the upstream libraries' own forward passes.

Offline stand-ins: tiny randomly initialised models written in each upstream's own format
(transformers `save_pretrained`; an open_clip architecture registered with `add_model_config` and
its state dict saved to a file loaded by path). The HF tokenizer is the real CLIP BPE: its
vocab.json / merges.txt are rebuilt from the BPE file open_clip ships, as OpenAI's CLIP builds them.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from pairfree.encoders.common import import_torchvision
from pairfree.encoders.registry import load_encoder  # noqa: E402
from tiny_checkpoints import write_tiny_hf_clip  # noqa: E402

try:
    import_torchvision()  # before transformers / open_clip import torchvision themselves
except ImportError as e:
    pytest.skip(str(e), allow_module_level=True)
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TINY_OPEN_CLIP = "pairfree-test-tiny-ViT"
TEXTS = ["a photo of a cat", "dog", "a much longer caption about several things happening at the same time"]


def images(n=3, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((40 + 7 * i, 50 - 3 * i, 3)) * 255).astype("uint8")) for i in range(n)]


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory):
    return write_tiny_hf_clip(tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def open_clip_weights(tmp_path_factory):
    import open_clip

    d = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (d / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP)
    torch.save(model.state_dict(), d / "tiny.pt")
    return d / "tiny.pt"


def hf_reference(path, ims, texts):
    from transformers import CLIPModel, CLIPProcessor

    from pairfree.encoders.hf_clip import model_features

    model, processor = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    inputs = processor(images=ims, text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return F.normalize(model_features(img), dim=-1).numpy(), F.normalize(model_features(txt), dim=-1).numpy()


def test_hf_clip_matches_transformers(hf_clip_dir):
    enc = load_encoder(f"hf-clip:{hf_clip_dir}")
    assert (enc.modalities, enc.dim, enc.id) == (("image", "text"), 16, f"hf-clip:{hf_clip_dir}")
    ims = images()
    ref_img, ref_txt = hf_reference(hf_clip_dir, ims, TEXTS)
    z_img, z_txt = enc.encode("image", ims), enc.encode("text", TEXTS)
    assert z_img.dtype == np.float32 and z_img.shape == (3, 16) and z_txt.shape == (3, 16)
    np.testing.assert_allclose(z_img, ref_img, atol=1e-5)
    np.testing.assert_allclose(z_txt, ref_txt, atol=1e-5)
    # batch composition (padding length) does not change a text's embedding
    singles = np.concatenate([enc.encode("text", [t]) for t in TEXTS])
    np.testing.assert_allclose(singles, z_txt, atol=1e-5)


def test_hf_clip_preprocess_is_picklable_and_handles_grey_images_and_long_texts(hf_clip_dir):
    enc = load_encoder(f"hf-clip:{hf_clip_dir}")
    grey = images(1)[0].convert("L")
    x = pickle.loads(pickle.dumps(enc.preprocess("image", grey)))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    ids = enc.preprocess("text", "word " * 200)
    assert len(ids) == 77 and ids[-1] == 49407  # truncated to CLIP's context, still ending with <|endoftext|>
    with pytest.raises(ValueError, match="audio"):
        enc.encode("audio", [np.zeros(10)])


def test_open_clip_matches_open_clip(open_clip_weights):
    import open_clip

    spec = f"open_clip:{TINY_OPEN_CLIP}/{open_clip_weights}"
    enc = load_encoder(spec)
    assert (enc.modalities, enc.dim, enc.pretrained) == (("image", "text"), 16, str(open_clip_weights))
    model, _, transform = open_clip.create_model_and_transforms(TINY_OPEN_CLIP, pretrained=str(open_clip_weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(TINY_OPEN_CLIP)
    ims = images()
    with torch.no_grad():
        ref_img = model.encode_image(torch.stack([transform(i) for i in ims]), normalize=True).numpy()
        ref_txt = model.encode_text(tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(enc.encode("image", ims), ref_img, atol=1e-5)
    np.testing.assert_allclose(enc.encode("text", TEXTS), ref_txt, atol=1e-5)


def test_open_clip_spec_parsing():
    from pairfree.encoders.open_clip import split_model_pretrained

    assert split_model_pretrained("ViT-B-32/openai") == ("ViT-B-32", "openai")
    assert split_model_pretrained("ViT-B-32//data/w.pt") == ("ViT-B-32", "/data/w.pt")
    assert split_model_pretrained("ViT-B-32") == ("ViT-B-32", None)
    assert split_model_pretrained("hf-hub:laion/CLIP-ViT-B-32") == ("hf-hub:laion/CLIP-ViT-B-32", None)


def test_half_precision_stays_close(hf_clip_dir, open_clip_weights):
    ims = images(2)
    for spec in (f"hf-clip:{hf_clip_dir}", f"open_clip:{TINY_OPEN_CLIP}/{open_clip_weights}"):
        full = load_encoder(spec)
        reference = {"image": full.encode("image", ims), "text": full.encode("text", TEXTS[:2])}
        for dtype in ("float16", "bfloat16"):
            half = load_encoder(spec, dtype=dtype)
            assert next(half.model.parameters()).dtype == getattr(torch, dtype)
            for modality, items in (("image", ims), ("text", TEXTS[:2])):
                z = half.encode(modality, items)
                assert z.dtype == np.float32
                cos = (z * reference[modality]).sum(axis=1)
                assert cos.min() > 0.99, (spec, modality, dtype, cos)


def test_demo_jpegs_through_load_image_and_tiny_clip_encoders(hf_clip_dir, open_clip_weights):
    """The official demo images (JPEG, up to 1920x1080) through pairfree's loader and both CLIP kinds,
    each checked against its upstream library on the same decoded images."""
    import open_clip

    from pairfree.media import load_image
    from pf_testing import REFERENCE

    if not (REFERENCE / "assets").exists():
        pytest.skip(f"{REFERENCE} is absent (the official reference files live in ../shared/reference beside the repo)")
    ims = [load_image(REFERENCE / "assets" / f"{n}.jpeg") for n in ("BBQ", "toilet", "train")]
    assert all(im.mode == "RGB" for im in ims)
    ref_img, _ = hf_reference(hf_clip_dir, ims, TEXTS)
    np.testing.assert_allclose(load_encoder(f"hf-clip:{hf_clip_dir}").encode("image", ims), ref_img, atol=1e-5)
    model, _, transform = open_clip.create_model_and_transforms(TINY_OPEN_CLIP, pretrained=str(open_clip_weights))
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([transform(i) for i in ims]), normalize=True).numpy()
    z = load_encoder(f"open_clip:{TINY_OPEN_CLIP}/{open_clip_weights}").encode("image", ims)
    np.testing.assert_allclose(z, ref, atol=1e-5)
