"""End to end on a small toy world: C-MCR's advantage over the baselines, with numbers."""

import pytest

import pairfree as pf
from pairfree.baselines import ProcrustesMap, RidgeMap
from pairfree.demo import audio_image_scores


@pytest.fixture(scope="module")
def world(request):
    from pairfree.toy import ToyWorldConfig, make_world

    cache = request.config.cache.mkdir("pairfree-toyworld")  # shared with test_extend, kept between sessions
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
