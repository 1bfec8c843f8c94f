"""End to end on a small toy world: C-MCR's advantage over the baselines, with numbers."""

import pytest

import pairfree as pf
from pairfree.baselines import ProcrustesMap, RidgeMap
from pairfree.cli.demo import audio_image_scores


@pytest.fixture(scope="module")
def world(request):
    from pairfree.toy import ToyWorldConfig, make_world

    # the layout run_demo uses (<cache>/toy), shared with test_extend and the demo test, kept between sessions
    cache = request.config.cache.mkdir("pairfree-cache") / "toy"
    return make_world(ToyWorldConfig(seed=0, preset="small"), cache_dir=cache, progress=False)


def test_cmcr_beats_ridge_and_plain_on_audio_image(world):
    clip, clap = world.spaces["clip"], world.spaces["clap"]
    cfg = dict(epochs=12, batch_size=1024)
    scores = {
        "ridge": audio_image_scores(RidgeMap().fit(clip, clap, "text"), world.test),
        "procrustes": audio_image_scores(ProcrustesMap().fit(clip, clap, "text"), world.test),
        "cmcr_plain": audio_image_scores(pf.CMCR(pf.CMCRConfig(semantic_consistency=False, semantic_completion=False, **cfg))
                                         .fit(clip, clap, "text", progress=False), world.test),
        "cmcr": audio_image_scores(pf.CMCR(pf.CMCRConfig(**cfg)).fit(clip, clap, "text", progress=False), world.test),
    }
    chance = 1 / len(world.test["labels"])
    a2i = {name: s["audio_to_image"] for name, s in scores.items()}
    print({name: (s["R@1"], s["mAP"]) for name, s in a2i.items()})
    assert a2i["cmcr"]["R@1"] > 20 * chance
    for baseline in ("ridge", "cmcr_plain"):  # a clear margin, both directions
        assert a2i["cmcr"]["R@1"] > 2 * a2i[baseline]["R@1"] + 0.02, (baseline, a2i)
        assert a2i["cmcr"]["mAP"] > a2i[baseline]["mAP"] + 0.05, (baseline, a2i)
        assert scores["cmcr"]["image_to_audio"]["R@1"] > scores[baseline]["image_to_audio"]["R@1"] + 0.02
    assert a2i["cmcr"]["mAP"] > a2i["procrustes"]["mAP"], a2i  # and the strongest simple baseline


def test_demo_report(world, request, tmp_path, capsys):
    """`pairfree demo` end to end (small world, short schedule): the report.json contract, the plot, the table."""
    import json

    from pairfree.cli.demo import METHODS, run_demo

    run_demo(tmp_path / "demo", preset="small", epochs=2, batch_size=1024,
             cache_dir=request.config.cache.mkdir("pairfree-cache"), progress=False)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert list(report["methods"]) == [*METHODS, "exmcr"]
    assert report["world"]["key"] == world.info["key"] and report["schedule"] == {"epochs": 2, "batch_size": 1024}
    for name, r in report["methods"].items():
        for task in ("audio_to_image", "image_to_audio"):
            assert set(r[task]) == {"R@1", "R@5", "mAP"} and 0 <= r[task]["R@1"] <= r[task]["R@5"] <= 1, (name, r)
        assert r["seconds"] >= 0
    assert report["methods"]["random"]["audio_to_image"]["R@5"] < 0.05  # chance is 5/400
    assert report["methods"]["exmcr"]["audio_to_3d"]["R@1"] > 0 and "3d_zero_shot" in report["methods"]["exmcr"]
    assert (tmp_path / "demo" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "cmcr_plain" in out and "audio_to_3d" in out and "report.json" in out
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["report.json", "report.png"]  # no temporaries
