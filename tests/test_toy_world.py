"""The toy world: shapes, row alignment, determinism, cache, and realism statistics checked directly."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pairfree.space import check_overlap
from pairfree.toy import PAIRED_KEYS, PRESETS, ToyWorldConfig, make_world

SMALL = ToyWorldConfig(seed=0, preset="small")
DIMS = {"clip": 64, "clap": 48, "ulip": 56}
PAIRS = {"clip": ("image", "text"), "clap": ("text", "audio"), "ulip": ("image", "3d")}


def tiny(seed: int) -> ToyWorldConfig:
    """A few-second world for checks that need extra builds."""
    return ToyWorldConfig(
        seed=seed,
        preset="small",
        n_text=400,
        n_image=300,
        n_audio=300,
        n_3d=300,
        n_test=64,
        n_train_pairs=64,
        pretrain_pairs={"clip": 1024, "clap": 1024, "ulip": 1024},
        pretrain_epochs={"clip": 2, "clap": 2, "ulip": 2},
    )


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="module")
def world(cache_dir):
    return make_world(SMALL, cache_dir=cache_dir, progress=False)


def _all_arrays(w) -> dict[str, np.ndarray]:
    out = {f"spaces/{s}/{m}": w.spaces[s][m] for s in w.spaces for m in w.spaces[s].modalities}
    out.update({f"test/{k}": v for k, v in w.test.items()})
    out.update({f"train_pairs/{k}": v for k, v in w.train_pairs.items()})
    out.update({f"classes/{k}": v for k, v in w.classes.items() if k != "names"})
    return out


def test_shapes_and_sizes(world):
    p = SMALL.resolved()
    assert set(world.spaces) == {"clip", "clap", "ulip"}
    for s, mods in PAIRS.items():
        assert world.spaces[s].modalities == mods
        assert world.spaces[s].dim == DIMS[s]
    assert world.spaces["clip"].count("text") == world.spaces["clap"].count("text") == p["n_text"]
    assert world.spaces["clip"].count("image") == world.spaces["ulip"].count("image") == p["n_image"]
    assert world.spaces["clap"].count("audio") == p["n_audio"]
    assert world.spaces["ulip"].count("3d") == p["n_3d"]
    for split, n in ((world.test, p["n_test"]), (world.train_pairs, p["n_train_pairs"])):
        assert set(split) == {*PAIRED_KEYS, "labels"}
        for key in PAIRED_KEYS:
            assert split[key].shape == (n, DIMS[key.split("/")[0]]) and split[key].dtype == np.float32
        assert split["labels"].shape == (n,) and split["labels"].dtype == np.int64
        assert 0 <= split["labels"].min() and split["labels"].max() < p["n_concepts"]
    assert len(world.classes["names"]) == p["n_concepts"] and world.classes["names"][7] == "c007"
    for key in ("clip/text", "clap/text"):
        assert world.classes[key].shape == (p["n_concepts"], p["n_templates"], DIMS[key.split("/")[0]])
    json.dumps(world.info)  # JSON-serialisable
    assert world.info["dims"] == DIMS


def test_unit_norms(world):
    for name, a in _all_arrays(world).items():
        if name.endswith("labels"):
            continue
        assert a.dtype == np.float32, name
        np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, atol=1e-5, err_msg=name)


def test_overlap_rows_are_the_same_raw_samples(world):
    """clip/clap texts (and clip/ulip images) are one raw corpus through two towers, row for row."""
    check_overlap(world.spaces["clip"], world.spaces["clap"], "text")
    check_overlap(world.spaces["clip"], world.spaces["ulip"], "image")
    raw = world.raw
    for split, space_arrays in (("memory", None), ("test", world.test)):
        for shared, keys in (("text", ("clip/text", "clap/text")), ("image", ("clip/image", "ulip/image"))):
            for key in keys:
                s, m = key.split("/")
                expected = world.spaces[s][m] if space_arrays is None else space_arrays[key]
                np.testing.assert_array_equal(world.encode(key, raw[f"{split}/{shared}"]), expected)
    # different towers: the same raw text gives genuinely different embeddings (even different dims)
    assert world.spaces["clip"]["text"].shape[1] != world.spaces["clap"]["text"].shape[1]
    np.testing.assert_array_equal(
        world.encode("clip/text", raw["classes/text"]).reshape(world.classes["clip/text"].shape),
        world.classes["clip/text"],
    )


def test_determinism_same_seed(tiny_cache):
    again = make_world(tiny(0), progress=False)  # no cache: a real rebuild (the small world is checked via the cache)
    a, b = _all_arrays(tiny_cache[1]), _all_arrays(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    return d, make_world(tiny(0), cache_dir=d, progress=False)


def test_different_seed_differs(tiny_cache):
    w0, w1 = tiny_cache[1], make_world(tiny(1), progress=False)
    for k in PAIRED_KEYS:
        assert w0.test[k].shape == w1.test[k].shape
        assert not np.allclose(w0.test[k], w1.test[k]), k
    assert not np.array_equal(w0.spaces["clip"]["text"], w1.spaces["clip"]["text"])


def test_cache_round_trip(world, cache_dir):
    files = sorted(p.name for p in cache_dir.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npz"), files
    assert SMALL.key() in files[0] and not any(f.endswith(".tmp") for f in files)
    np.load(cache_dir / files[1], allow_pickle=False).close()
    t0 = time.perf_counter()
    loaded = make_world(SMALL, cache_dir=cache_dir, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert loaded.raw is None  # proves it came from the cache, not a rebuild
    a, b = _all_arrays(world), _all_arrays(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert a[k].dtype == b[k].dtype
    assert loaded.classes["names"] == world.classes["names"]
    assert json.loads(json.dumps(loaded.info)) == json.loads(json.dumps(world.info))
    np.testing.assert_array_equal(loaded.encode("clap/text", world.raw["test/text"]), world.test["clap/text"])


def test_modality_gap(world):
    """Matched pairs well below cosine 1, random pairs lower still, modality centroids apart."""
    for s, (ma, mb) in PAIRS.items():
        a, b = world.test[f"{s}/{ma}"].astype(np.float64), world.test[f"{s}/{mb}"].astype(np.float64)
        matched = np.mean(np.sum(a * b, axis=1))
        sim = a @ b.T
        random = (sim.sum() - np.trace(sim)) / (sim.size - len(a))
        ca, cb = a.mean(0), b.mean(0)
        centroid_distance = 1 - ca @ cb / np.linalg.norm(ca) / np.linalg.norm(cb)
        assert 0.1 < matched < 0.8, (s, matched)
        assert matched - random > 0.1, (s, matched, random)
        assert centroid_distance > 0.2, (s, centroid_distance)
        st = world.info["realism"]["spaces"][s]
        assert st["matched_cosine"] == pytest.approx(matched, abs=1e-6)
        assert st["random_pair_cosine"] == pytest.approx(random, abs=1e-6)
        assert st["centroid_cosine_distance"] == pytest.approx(centroid_distance, abs=1e-6)


def test_in_space_retrieval_far_above_chance(world):
    n = len(world.test["labels"])
    for s, (ma, mb) in PAIRS.items():
        sim = world.test[f"{s}/{ma}"] @ world.test[f"{s}/{mb}"].T
        r1 = [np.mean(sim.argmax(1) == np.arange(n)), np.mean(sim.argmax(0) == np.arange(n))]
        assert min(r1) > 20.0 / n, (s, r1)
        assert max(r1) < 0.9, (s, r1)  # competent but imperfect
        assert world.info["realism"]["spaces"][s]["r1_a_to_b"] == pytest.approx(r1[0])
    # zero-shot with template-averaged prompts, in-space (clip: image -> class text)
    protos = world.classes["clip/text"].mean(1)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    acc = np.mean((world.test["clip/image"] @ protos.T).argmax(1) == world.test["labels"])
    assert acc > 0.3, acc


def _procrustes_residual(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(0), y - y.mean(0)
    u, sv, vt = np.linalg.svd(x.T @ y, full_matrices=False)
    r = u @ vt * (sv.sum() / np.sum(x**2))
    return float(np.sum((x @ r - y) ** 2) / np.sum(y**2))


def test_text_spaces_are_not_a_rotation(world):
    x, y = world.spaces["clip"]["text"].astype(np.float64), world.spaces["clap"]["text"].astype(np.float64)
    in_sample = _procrustes_residual(x, y)
    assert in_sample > 0.1, in_sample
    held_out = world.info["realism"]["overlap"]["text clip->clap"]
    assert held_out["procrustes_residual"] > 0.1
    assert held_out["linear_r2"] < 0.99  # not even an arbitrary linear map explains it fully


def test_uneven_coverage(world):
    labels = world.memory_labels
    silent = world.info["silent_concepts"]
    assert silent and not np.isin(labels["audio"], silent).any()
    assert not np.isin(labels["3d"], world.info["shapeless_concepts"]).any()
    counts = np.bincount(labels["text"], minlength=len(world.classes["names"]))
    assert counts.max() > 4 * max(counts.min(), 1)  # text corpus is far from uniform over concepts


def test_config_presets_and_overrides():
    assert {"demo", "small"} <= set(PRESETS)
    demo = ToyWorldConfig(preset="demo").resolved()
    assert demo["n_concepts"] == PRESETS["demo"]["n_concepts"]
    cfg = ToyWorldConfig(preset="small", n_text=123, overrides={"zipf": 1.1})
    r = cfg.resolved()
    assert r["n_text"] == 123 and r["zipf"] == 1.1 and r["n_image"] == PRESETS["small"]["n_image"]
    assert cfg.key() != SMALL.key() and SMALL.key() == ToyWorldConfig(seed=0, preset="small").key()
    assert ToyWorldConfig(seed=1, preset="small").key() != SMALL.key()
    with pytest.raises(ValueError, match="preset"):
        ToyWorldConfig(preset="huge")
    with pytest.raises(ValueError, match="unknown keys"):
        ToyWorldConfig(overrides={"nosuchfield": 1})


def test_unreadable_cache_is_rebuilt(tiny_cache):
    d, w0 = tiny_cache
    (npz,) = d.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[:1000])  # truncated, as after a crash outside atomic_path
    with pytest.warns(UserWarning, match="unreadable"):
        w = make_world(tiny(0), cache_dir=d, progress=False)
    assert w.raw is not None  # rebuilt
    np.testing.assert_array_equal(w.test["clap/audio"], w0.test["clap/audio"])
    assert make_world(tiny(0), cache_dir=d, progress=False).raw is None  # and re-cached


def test_build_leaves_global_torch_state_alone():
    import torch

    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_world(tiny(2), progress=False, threads=1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_dict_fields_merge_key_by_key():
    r = ToyWorldConfig(preset="small", pretrain_epochs={"ulip": 40}, overrides={"noise": {"audio": 0.5}}).resolved()
    assert r["pretrain_epochs"] == {**PRESETS["small"]["pretrain_epochs"], "ulip": 40}
    assert r["noise"]["audio"] == 0.5 and r["noise"]["image"] == ToyWorldConfig().resolved()["noise"]["image"]
