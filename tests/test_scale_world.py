"""The paper-scale world generator, on a scaled-down size: deterministic, resumable, bounded, and with
the statistics of real embedding spaces it claims (README, `pairfree.toy.scale`)."""

import json

import numpy as np
import pytest

from pairfree.toy import scale

SIZES = {"text": 70_000, "image": 15_000, "audio": 20_000, "3d": 6_000, "test": 500, "n_concepts": 1500,
         "n_topics": 60}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cfg = scale.ScaleWorldConfig(preset="mini", sizes=SIZES)
    folder = scale.build(tmp_path_factory.mktemp("scale") / "w", cfg, progress=False, stats=False)
    return folder, cfg


def test_layout_dtypes_and_alignment(built):
    folder, _ = built
    w = scale.load(folder)
    assert set(w["spaces"]) == {"clip", "clap", "ulip"}
    text = w["spaces"]["clip"]["text"]
    assert isinstance(text, np.memmap) and text.dtype == np.float16 and text.shape == (70_000, 512)
    assert w["spaces"]["clap"]["text"].shape[0] == text.shape[0]  # one raw text per row in both towers
    assert w["test"]["clip/image"].shape == (500, 512)
    norms = np.linalg.norm(np.asarray(text[:1000], np.float32), axis=1)
    np.testing.assert_allclose(norms, 1, atol=2e-3)


def test_deterministic_chunked_and_resumable(built, tmp_path):
    """A second build is bit-identical; deleting one corpus and building again regenerates only it, the
    same bytes (each 65,536-row chunk has its own seeded stream)."""
    folder, cfg = built
    other = scale.build(tmp_path / "again", cfg, progress=False, stats=False)
    for f in ("clip/text.npy", "clap/audio.npy", "ulip/3d.npy", "test/clip_image.npy"):
        assert (folder / f).read_bytes() == (other / f).read_bytes(), f
    (other / "clap" / "audio.npy").unlink()
    meta = json.loads((other / "world.json").read_text())
    meta["complete"] = False
    (other / "world.json").write_text(json.dumps(meta))
    before = (other / "clip" / "text.npy").stat().st_mtime_ns
    scale.build(other, cfg, progress=False, stats=False)
    assert (other / "clap" / "audio.npy").read_bytes() == (folder / "clap" / "audio.npy").read_bytes()
    assert (other / "clip" / "text.npy").stat().st_mtime_ns == before  # finished files are kept
    with pytest.raises(ValueError, match="another scale world"):
        scale.build(other, scale.ScaleWorldConfig(preset="mini", seed=1, sizes=SIZES), progress=False)


def test_statistics_of_real_embedding_spaces(built):
    """Cone (within-modality mean cosine ~0.5), modality gap (centroid distance ~0.8, matched cosine
    ~0.3 above random ~0.15), clustered neighbours that share concepts, competent in-space retrieval,
    two text towers related but not by a rotation."""
    folder, _ = built
    r = scale.realism(folder, sample=500)
    for key, a in r["arrays"].items():
        assert 0.35 < a["random_pair_cosine"] < 0.65, (key, a)
        assert a["nn_cosine"]["1"] > a["nn_cosine"]["100"] + 0.05, (key, a)
        assert a["top10_same_concept"] > 0.3, (key, a)
        assert 20 < a["effective_dim"] < 200, (key, a)
    for space, s in r["spaces"].items():
        assert s["matched_cosine"] > s["random_pair_cosine"] + 0.08, (space, s)
        assert 0.6 < s["centroid_gap_l2"] < 1.1, (space, s)
        assert s["r1_a_to_b"] > 50 * s["r1_chance"], (space, s)
    for pair, fit in r["overlap"].items():
        assert 0.6 < fit["linear_r2"] < 0.999 and fit["procrustes_residual"] > 0.05, (pair, fit)
    for hop, h in r["cross_modal_softmax"].items():
        assert 2 < h["effective_neighbours"] < 2000, (hop, h)
