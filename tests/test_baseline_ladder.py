"""The baseline ladder against direct computations on small cases."""

import numpy as np
import pytest

import pairfree as pf
from pairfree.baselines import CentredMap, ProcrustesMap, RelativeMap, RidgeMap, modality_means
from pairfree.models import load_model
from pf_testing import unit


def spaces(rng, n=300):
    t = unit(rng, n, 12)
    x = pf.Space("clip", {"image": unit(rng, 200, 12) + 0.5, "text": t})
    ty = t @ rng.standard_normal((12, 10)).astype(np.float32)
    y = pf.Space("clap", {"text": ty, "audio": unit(rng, 150, 10) - 0.3})
    return x, y


def test_relative_map_is_asif_by_hand(rng, tmp_path):
    x, y = spaces(rng)
    m = RelativeMap().fit(x, y, "text", anchors=100, k=7, power=3.0, seed=1)
    idx = np.sort(np.random.default_rng(1).choice(300, 100, replace=False))
    audio = y["audio"][:20]
    sims = audio @ y["text"][idx].T
    want = np.zeros_like(sims)
    for i, row in enumerate(sims):
        top = np.argsort(-row)[:7]
        want[i, top] = np.maximum(row[top], 0) ** 3
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(m.embed("clap", "audio", audio), want, atol=1e-6)
    # images are described by the same anchors, through CLIP's texts
    assert m.embed("clip", "image", x["image"][:3]).shape == (3, 100)
    m.save(tmp_path / "rel")
    np.testing.assert_array_equal(load_model(tmp_path / "rel").embed("clap", "audio", audio), m.embed("clap", "audio", audio))


def test_relative_map_aligns_a_hidden_rotation():
    """Two spaces that are rotations of each other: an item and its rotated copy get the same anchor
    representation, whatever the rotation (relative representations are isometry-invariant)."""
    r = np.random.default_rng(0)
    t, a = unit(r, 500, 16), unit(r, 50, 16)
    q, _ = np.linalg.qr(r.standard_normal((16, 16)))
    x = pf.Space("x", {"text": t, "image": a})
    y = pf.Space("y", {"text": (t @ q).astype(np.float32), "audio": (a @ q).astype(np.float32)})
    m = RelativeMap().fit(x, y, "text", k=50)
    np.testing.assert_allclose(m.embed("x", "image", a), m.embed("y", "audio", (a @ q).astype(np.float32)), atol=1e-5)


@pytest.mark.parametrize("kind", ["procrustes", "ridge"])
def test_centred_map_by_hand(rng, tmp_path, kind):
    x, y = spaces(rng)
    m = CentredMap().fit(x, y, "text", kind=kind, readd="image")
    means = modality_means(x, y)
    inner = ProcrustesMap().fit(x, y, "text", center=True) if kind == "procrustes" else RidgeMap().fit(
        x, y, "text", center=True)
    np.testing.assert_allclose(m.W, inner.W)
    audio = y["audio"][:9]
    z = (audio - means["clap/audio"]) @ inner.W + means["clip/image"]
    np.testing.assert_allclose(m.embed("clap", "audio", audio), z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)
    img = x["image"][:4]
    z = img - means["clip/image"] + means["clip/image"]
    np.testing.assert_allclose(m.embed("clip", "image", img), z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-6)
    m.save(tmp_path / "c")
    np.testing.assert_allclose(load_model(tmp_path / "c").embed("clap", "audio", audio), m.embed("clap", "audio", audio))
    with pytest.raises(ValueError, match="readd"):
        CentredMap().fit(x, y, "text", readd="audio")


def test_modality_means_remove_a_constant_gap():
    """Two modalities that differ by a constant offset become identical once each is centred."""
    r = np.random.default_rng(3)
    h = 0.4  # unit rows (sqrt(1 - h^2) w, +h) and (sqrt(1 - h^2) w, -h) differ by exactly (0, ..., 0, -2h)
    w = unit(r, 400, 7) * np.sqrt(1 - h * h)
    text = np.hstack([w, np.full((400, 1), h, np.float32)]).astype(np.float32)
    audio = np.hstack([w, np.full((400, 1), -h, np.float32)]).astype(np.float32)
    y = pf.Space("y", {"text": text, "audio": audio})
    x = pf.Space("x", {"text": text, "image": text})
    m = CentredMap().fit(x, y, "text")
    np.testing.assert_allclose(m.embed("y", "audio", y["audio"]), m.embed("y", "text", y["text"]), atol=1e-5)


def test_text_offset_map_trains_on_texts_and_centres_every_modality(rng, tmp_path):
    from pairfree.textonly import TextOffsetConfig, TextOffsetMap

    x, y = spaces(rng)
    m = TextOffsetMap(TextOffsetConfig(epochs=30, batch_size=100, lr=3e-3)).fit(x, y, "text")
    assert m.history[-1]["loss"] < m.history[0]["loss"]
    means = modality_means(x, y)
    import torch

    audio = y["audio"][:5]
    with torch.inference_mode():
        z = m.head(torch.from_numpy((audio - means["clap/audio"]).astype(np.float32))).numpy()
    np.testing.assert_allclose(m.embed("clap", "audio", audio), z / np.linalg.norm(z, axis=1, keepdims=True), atol=1e-5)
    zt = x["text"][:5] - means["clip/text"]
    np.testing.assert_allclose(m.embed("clip", "text", x["text"][:5]), zt / np.linalg.norm(zt, axis=1, keepdims=True),
                               atol=1e-6)
    # held-in text retrieval works (the only thing it was trained on)
    a, b = m.embed("clap", "text", y["text"]), m.embed("clip", "text", x["text"])
    assert np.mean((a @ b.T).argmax(1) == np.arange(len(a))) > 0.1  # chance 0.003
    m.save(tmp_path / "t")
    np.testing.assert_allclose(load_model(tmp_path / "t").embed("clap", "audio", audio), m.embed("clap", "audio", audio),
                               atol=1e-6)


def test_retrieval_pseudo_pairs_are_the_nearest_memory_item(rng):
    from pairfree.connect import CMCR, CMCRConfig

    x, y = spaces(rng)
    pp = CMCR(CMCRConfig(pseudo_pairs="retrieve")).pseudo_pairs(x, y, "text", progress=False)
    nearest = x["image"][np.argmax(x["text"] @ x["image"].T, axis=1)]
    np.testing.assert_allclose(pp["v"], nearest / np.linalg.norm(nearest, axis=1, keepdims=True), atol=1e-6)


def test_the_ladder_is_in_the_demo_and_beside_the_ablations(request):
    """demo and eval --toy take their methods from the one zoo, and `pairfree ablate` reports the
    ladder's rows on the same world and tasks, equal to scoring those maps directly."""
    from pairfree.cli import ablate, demo
    from pairfree.cli.study import method_builders
    from pairfree.extend import ExMCRConfig
    from pairfree.toy import ToyWorldConfig, make_world
    from pairfree.toy.evaluate import evaluate_unified

    assert {"centred", "relative", "textoffset"} <= set(demo.METHODS)
    world = make_world(ToyWorldConfig(seed=0, preset="small"), progress=False,
                       cache_dir=request.config.cache.mkdir("pairfree-cache") / "toy")
    base = ExMCRConfig(epochs=1, batch_size=1024)
    rows = ablate.baseline_rows(world, base, lambda msg: None)
    assert list(rows) == list(ablate.BASELINES)
    direct = evaluate_unified(method_builders(world, {"epochs": 1, "batch_size": 1024, "seed": 0}, None)["relative"](),
                              world, ablate.ABLATE_TASKS)
    assert rows["relative"]["scores"] == direct
    assert rows["relative"]["scores"]["audio_to_image"]["R@1"] > 20 * ablate.chance(world)["R@1"]
    table = ablate.format_table({"rows": [], "baselines": rows})
    assert "baseline   relative" in table
