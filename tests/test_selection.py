"""Model selection without paired data: held-out splits, label-free scores, keeping the best epoch."""

import numpy as np
import pytest
import torch

import pairfree as pf
from pairfree.selection import Scorer, split_holdout
from pf_testing import unit


def test_split_holdout_removes_rows_from_training(rng):
    t = unit(rng, 400, 8)
    x = pf.Space("clip", {"text": t, "image": unit(rng, 300, 8)})
    y = pf.Space("clap", {"text": t, "audio": unit(rng, 200, 8)})
    xt, yt, held = split_holdout(x, y, "text", fraction=0.1, seed=3)
    assert xt.count("text") == yt.count("text") == 360 and yt.count("audio") == 180 and xt.count("image") == 300
    assert len(held.x_overlap) == 40 and len(held.y_other) == 20
    np.testing.assert_array_equal(held.x_overlap, held.y_overlap)  # aligned rows stay aligned
    kept = {r.tobytes() for r in np.asarray(xt["text"])}
    assert not any(r.tobytes() in kept for r in held.x_overlap)


def test_select_restores_the_best_epoch(rng):
    """select= keeps the weights of the epoch with the highest monitored score (here: epoch 2)."""
    from pairfree.connect import CMCR, CMCRConfig

    t = unit(rng, 300, 8)
    x = pf.Space("clip", {"text": t, "image": unit(rng, 200, 8)})
    y = pf.Space("clap", {"text": t @ rng.standard_normal((8, 6)).astype(np.float32), "audio": unit(rng, 150, 6)})
    seen = []

    def monitor(model):
        seen.append({k: v.clone() for k, v in model.heads.state_dict().items()})
        return {"score": [0.1, 0.9, 0.3, 0.2][len(seen) - 1]}

    model = CMCR(CMCRConfig(epochs=4, batch_size=64)).fit(x, y, "text", progress=False, monitor=monitor, select="score")
    assert [h.get("selected", False) for h in model.history] == [False, True, False, False]
    for k, v in model.heads.state_dict().items():
        torch.testing.assert_close(v, seen[1][k])
    with pytest.raises(ValueError, match="needs a monitor"):
        CMCR(CMCRConfig(epochs=1)).fit(x, y, "text", progress=False, select="score")


@pytest.fixture(scope="module")
def toy(request):
    from pairfree.toy import ToyWorldConfig, make_world

    cache = request.config.cache.mkdir("pairfree-cache")
    return make_world(ToyWorldConfig(seed=0, preset="small"), cache_dir=cache / "toy", progress=False)


def test_scores_rank_a_broken_config_below_the_default(toy):
    """Without semantic consistency C-MCR never sees image or audio regions: the scores that look at
    those modalities (pseudo, anchored) rank it below the default, as the true audio-image mAP does;
    the overlap score alone cannot see the difference (it is reported, not used by default)."""
    from pairfree.connect import CMCR, CMCRConfig
    from pairfree.metrics import paired_retrieval

    x, y, held = split_holdout(toy.spaces["clip"], toy.spaces["clap"], "text", seed=0)
    scorer = Scorer(x, y, "text", held)
    results = {}
    for name, kw in {"default": {}, "broken": {"semantic_consistency": False, "semantic_completion": False}}.items():
        model = CMCR(CMCRConfig(epochs=12, batch_size=1024, **kw)).fit(x, y, "text", progress=False)
        r = paired_retrieval(model.embed("clap", "audio", toy.test["clap/audio"]),
                             model.embed("clip", "image", toy.test["clip/image"]), positives="index", ks=(1,))
        results[name] = {**scorer(model), "true": 0.5 * (r["a_to_b"]["mAP"] + r["b_to_a"]["mAP"])}
    d, b = results["default"], results["broken"]
    assert d["true"] > b["true"] + 0.05, results
    assert d["pseudo"] > b["pseudo"] and d["anchored"] > b["anchored"], results
