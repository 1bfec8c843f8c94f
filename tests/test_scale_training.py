"""Training at scale: pools read in place (memory-mapped float16), bf16 autocast, and what the
approximate aggregation does to a trained model on the toy world."""

import numpy as np
import pytest
import torch

import pairfree as pf
from pairfree import train
from pairfree.extend import ExMCR, ExMCRConfig
from pf_testing import unit


def test_concat_rows_is_the_concatenation_without_copying(rng):
    parts = [unit(rng, 50, 8), unit(rng, 30, 8).astype(np.float16), unit(rng, 7, 8)]
    rows = train.ConcatRows(parts)
    whole = torch.from_numpy(np.concatenate([p.astype(np.float32) for p in parts]))
    assert rows.shape == (87, 8) and len(rows) == 87
    idx = torch.randperm(87, generator=torch.Generator().manual_seed(0))[:40]
    torch.testing.assert_close(rows[idx], whole[idx], rtol=0, atol=0)
    assert rows.parts[0].data_ptr() == torch.from_numpy(parts[0]).data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match="different widths"):
        train.ConcatRows([unit(rng, 3, 8), unit(rng, 3, 4)])


def _spaces(rng, dtype=np.float32):
    t = unit(rng, 600, 16)
    clip = pf.Space("clip", {"image": unit(rng, 400, 16).astype(dtype), "text": t.astype(dtype)})
    t2 = t @ rng.standard_normal((16, 12)).astype(np.float32)
    clap = pf.Space("clap", {"text": (t2 / np.linalg.norm(t2, axis=1, keepdims=True)).astype(dtype),
                             "audio": unit(rng, 300, 12).astype(dtype)})
    return clip, clap


def test_exmcr_on_float16_memories_keeps_float16_memory_mapped_pools(rng, tmp_path):
    clip, clap = _spaces(rng, np.float16)
    assert clip["text"].dtype == np.float16  # unit float16 rows are not copied to float32
    model = ExMCR(ExMCRConfig(epochs=2, batch_size=128)).fit(clip, {"clap": (clap, "text")}, cache_dir=tmp_path,
                                                             progress=False)
    pools = sorted(tmp_path.glob("exmcr-pool-*/*.npy"))
    assert len(pools) == 8 and all(np.load(p, mmap_mode="r").dtype == np.float16 for p in pools)
    assert set(model.aggregation["clap"]) == {"overlap: text->audio", "overlap: text->image", "leaf: audio->text",
                                              "leaf: text->image", "base: image->text", "base: text->audio"}
    out = model.embed("clap", "audio", clap["audio"][:5])
    assert out.dtype == np.float32 and np.isfinite(out).all()


def test_pool_as_concat_rows_trains_exactly_like_the_concatenated_pool(rng, monkeypatch):
    """Reading the pool in place changes nothing: the same history, bit for bit, as concatenating it."""
    clip, clap = _spaces(rng)
    cfg = ExMCRConfig(epochs=2, batch_size=128)
    a = ExMCR(cfg).fit(clip, {"clap": (clap, "text")}, progress=False)
    monkeypatch.setattr("pairfree.extend.ConcatRows",
                        lambda parts: torch.from_numpy(np.concatenate([np.asarray(p, np.float32) for p in parts])))
    b = ExMCR(cfg).fit(clip, {"clap": (clap, "text")}, progress=False)
    def drop_time(h):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in h["clap"]]

    assert drop_time(a.history) == drop_time(b.history)


def test_max_steps_stops_inside_an_epoch(rng):
    clip, clap = _spaces(rng)
    head = torch.nn.Linear(16, 16)
    data = {"x": torch.from_numpy(clip["text"])}
    hist = train.run(head, data, lambda b, g: (head(b["x"]).pow(2).mean(), {}),
                     ExMCRConfig(epochs=3, batch_size=64).loop_settings(), progress=False, max_steps=4)
    assert hist[-1]["partial"] and hist[-1]["steps"] == 4


# ---- the toy world (small preset): what ivf aggregation and bf16 training do to the trained model ----
@pytest.fixture(scope="module")
def toy(request):
    from pairfree.toy import ToyWorldConfig, make_world

    cache = request.config.cache.mkdir("pairfree-cache")
    return make_world(ToyWorldConfig(seed=0, preset="small"), cache_dir=cache / "toy", progress=False)


def test_ivf_aggregation_and_bf16_training_leave_the_trained_model_as_good(toy):
    """C-MCR on the small toy world, 12 x 1024: with ivf pseudo pairs (forced; auto would run exact at
    this size), with one row selection per group of queries (256 rows of each memory at mean cosine
    0.9995 to exact, not exact; 1 % of the queries, those of largest estimated error, redone exactly
    through `aggregation_redo`) and with bf16 autocast training, audio<->image mAP stays within 0.02 of
    exact fp32 (400 test pairs: about the seed-to-seed spread)."""
    from pairfree.connect import CMCRConfig
    from pairfree.toy.evaluate import run_cmcr

    base = dict(epochs=12, batch_size=1024)
    ref_model, ref, _ = run_cmcr(toy, CMCRConfig(**base, aggregation="exact"), progress=False)
    ivf_model, ivf, _ = run_cmcr(toy, CMCRConfig(**base, aggregation="ivf"), progress=False)
    groups_model, groups, _ = run_cmcr(toy, CMCRConfig(**base, aggregation="ivf", aggregation_select="groups",
                                                       aggregation_min_cosine=0.999, aggregation_redo=0.01),
                                       progress=False)
    _, bf16, _ = run_cmcr(toy, CMCRConfig(**base, aggregation="exact", precision="bf16"), progress=False)
    for hop, rep in ivf_model.aggregation.items():
        assert rep["method"] == "ivf" and rep["cosine_to_exact"]["mean"] > 0.999, (hop, rep)
    for hop, rep in groups_model.aggregation.items():
        assert rep["select"] == "groups" and "ran" not in rep and rep["cosine_to_exact"]["mean"] > 0.999, (hop, rep)
        assert rep["redo"]["queries"] > 0 and rep["redo"]["share"] == 0.01, (hop, rep)
        assert rep["rows"] < 0.25 * len(toy.spaces[hop.split(":")[0]][hop.split("->")[1]]), (hop, rep)
    for task in ("audio_to_image", "image_to_audio"):
        for name, got in (("ivf", ivf), ("groups", groups), ("bf16", bf16)):
            assert abs(got[task]["mAP"] - ref[task]["mAP"]) < 0.02, (name, task, got[task], ref[task])
