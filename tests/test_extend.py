"""Ex-MCR: pseudo data vs direct dense computation, projector vs the official head re-computed by hand,
frozen base, training step vs manual computation, exact resume, errors; toy-world claims (slow)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pairfree as pf
import pairfree.train as train_mod
from pairfree import metrics
from pairfree.extend import DecoupledProjector, ExMCRConfig, Roles, cached_pass, modality_centric_pass
from pairfree.space import SpaceError, normalized
from pf_testing import unit

TAU = 0.01


def spaces(rng, n_text=300, n_image=240):
    """base clip (16-d), leaf clap (12-d, texts aligned), leaf ulip (14-d, images aligned)."""
    t_clip, v_clip = unit(rng, n_text, 16), unit(rng, n_image, 16)
    t_clap = t_clip @ rng.standard_normal((16, 12)).astype(np.float32)
    v_ulip = v_clip @ rng.standard_normal((16, 14)).astype(np.float32)
    clip = pf.Space("clip", {"image": v_clip, "text": t_clip})
    clap = pf.Space("clap", {"text": t_clap, "audio": unit(rng, 200, 12)})
    ulip = pf.Space("ulip", {"image": v_ulip, "3d": unit(rng, 180, 14)})
    return clip, clap, ulip


def small_cfg(**kw):
    return ExMCRConfig(**{"epochs": 2, "batch_size": 128, **kw})


# ---- pseudo data ------------------------------------------------------------------------------------
def _softmax_avg(q, keys, values, tau=TAU):
    """Direct dense numpy: normalize(softmax(q·keysᵀ/τ)·values), float64."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    s = q @ keys.T / tau
    w = np.exp(s - s.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    out = w @ values
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.parametrize("leaf_name, overlap", [("clap", "text"), ("ulip", "image")])
def test_pseudo_data_matches_direct_dense_computation(rng, leaf_name, overlap):
    clip, clap, ulip = spaces(rng)
    leaf = {"clap": clap, "ulip": ulip}[leaf_name]
    r = Roles.of(clip, leaf, overlap)
    C, OL, OB, NB = leaf[r.leaf_other], leaf[overlap], clip[overlap], clip[r.base_other]
    assert (r.leaf_other, r.base_other) == {"clap": ("audio", "image"), "ulip": ("3d", "text")}[leaf_name]
    expect = {
        # overlap-centric: query overlap row i in both spaces
        "overlap": {"c": _softmax_avg(OL, C, C), "ol": OL, "ob": OB, "nb": _softmax_avg(OB, NB, NB)},
    }
    # leaf-centric: weights on the leaf's overlap rows, carried to the base's aligned rows
    ol, ob = _softmax_avg(C, OL, OL), _softmax_avg(C, OL, OB)
    expect["leaf"] = {"c": C, "ol": ol, "ob": ob, "nb": _softmax_avg(ob, NB, NB)}
    # base-centric: weights on the base's overlap rows, carried to the leaf's aligned rows
    ob, ol = _softmax_avg(NB, OB, OB), _softmax_avg(NB, OB, OL)
    expect["base"] = {"c": _softmax_avg(ol, C, C), "ol": ol, "ob": ob, "nb": NB}
    for name, want in expect.items():
        got = modality_centric_pass(r, name, tau=TAU)
        n = {"overlap": len(OL), "leaf": len(C), "base": len(NB)}[name]
        for role in ("c", "ol", "ob", "nb"):
            assert got[role].shape[0] == n
            np.testing.assert_allclose(got[role], want[role], atol=5e-5, err_msg=f"{name}/{role}")


def test_pool_cache_is_reused_and_keyed(rng, tmp_path, monkeypatch):
    clip, clap, _ = spaces(rng)
    r = Roles.of(clip, clap, "text")
    first = cached_pass(tmp_path, r, "leaf", tau=TAU)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].startswith("exmcr-pool-leaf-")
    assert sorted(p.name for p in (tmp_path / folders[0]).iterdir()) == ["meta.json", "nb.npy", "ob.npy", "ol.npy"]
    import pairfree.extend as ext

    def boom(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(ext, "modality_centric_pass", boom)
    again = cached_pass(tmp_path, r, "leaf", tau=TAU)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    monkeypatch.undo()
    cached_pass(tmp_path, r, "leaf", tau=0.02)  # another tau: another entry
    cached_pass(tmp_path, r, "base", tau=TAU)  # another pass: another entry
    other = pf.Space("clap", {"text": clap["text"], "audio": unit(rng, 200, 12)})
    cached_pass(tmp_path, Roles.of(clip, other, "text"), "leaf", tau=TAU)  # other inputs: another entry
    assert len(list(tmp_path.iterdir())) == 4
    # the model uses the per-pass cache: the pool is the concatenation of the enabled passes
    m = pf.ExMCR(small_cfg(passes="T,A", epochs=1)).fit(clip, {"clap": (clap, "text")}, cache_dir=tmp_path,
                                                        progress=False)
    assert m.timings["clap/pool_rows"] == clap.count("text") + clap.count("audio")
    assert len(list(tmp_path.glob("exmcr-pool-overlap-*"))) == 1


# ---- projector / official layout -------------------------------------------------------------------
def _random_bn(d):
    return {"weight": torch.rand(d) + 0.5, "bias": torch.randn(d) * 0.1, "running_mean": torch.randn(d) * 0.2,
            "running_var": torch.rand(d) + 0.1, "num_batches_tracked": torch.tensor(5123)}


def _official_state(d_leaf, d_base, rng_t):
    state = {"Head1.weight": torch.eye(d_leaf) + 0.1 * torch.randn(d_leaf, d_leaf, generator=rng_t),
             "Head1.bias": 0.05 * torch.randn(d_leaf, generator=rng_t)}
    d_in = d_leaf
    for blk in ("mlp1", "mlp2"):
        h = 2 * d_in
        p = f"Head2.{blk}"
        state[f"{p}.net1.0.weight"] = torch.randn(h, d_in, generator=rng_t) / d_in**0.5
        state[f"{p}.net1.0.bias"] = 0.1 * torch.randn(h, generator=rng_t)
        state[f"{p}.net2.0.weight"] = torch.randn(d_base, h, generator=rng_t) / h**0.5
        state[f"{p}.net2.0.bias"] = 0.1 * torch.randn(d_base, generator=rng_t)
        for k, v in _random_bn(h).items():
            state[f"{p}.net1.1.{k}"] = v
        for k, v in _random_bn(d_base).items():
            state[f"{p}.net2.1.{k}"] = v
        d_in = d_base
    return state


def _official_head(state, x, through_fl=True):
    """Independent re-computation of the released Ex_MCR_Head: Linear -> 2 x MLP block -> L2 (eval BN)."""
    S = {k: v.double() for k, v in state.items()}

    def lin(h, p):
        return h @ S[f"{p}.weight"].T + S[f"{p}.bias"]

    def bn(h, p):
        return (h - S[f"{p}.running_mean"]) / torch.sqrt(S[f"{p}.running_var"] + 1e-5) * S[f"{p}.weight"] + S[f"{p}.bias"]

    h = F.normalize(torch.as_tensor(x).double(), dim=-1)
    if through_fl:
        h = lin(h, "Head1")
    for blk in ("mlp1", "mlp2"):
        p = f"Head2.{blk}"
        h = torch.relu(bn(lin(h, f"{p}.net1.0"), f"{p}.net1.1"))
        h = bn(lin(h, f"{p}.net2.0"), f"{p}.net2.1")
    return F.normalize(h, dim=-1).numpy()


def test_official_layout_loads_and_matches_direct_recomputation(tmp_path, rng):
    g = torch.Generator().manual_seed(0)
    clap_state, ulip_state = _official_state(48, 64, g), _official_state(56, 64, g)
    torch.save({f"module.{k}": v for k, v in clap_state.items()}, tmp_path / "ex_clap.pt")
    torch.save(ulip_state, tmp_path / "ex_ulip.pt")
    model = pf.ExMCR.from_official(tmp_path / "ex_clap.pt", leaf="clap")
    assert model.config.fl == "linear" and model.config.fm_depth == 2 and model.config.hidden_mult == 2.0
    assert model.leaves["clap"]["overlap"] == "text" and model.base["name"] == "clip"
    # our module tree has exactly the official names
    assert set(model.heads["clap"].state_dict()) == set(clap_state)
    a = unit(rng, 64, 48) * 3.0  # un-normalised input: the official path normalises it first
    np.testing.assert_allclose(model.embed("clap", "audio", a), _official_head(clap_state, a), atol=1e-6)
    np.testing.assert_allclose(model.embed("clap", "text", a), _official_head(clap_state, a, through_fl=False), atol=1e-6)
    v = unit(rng, 10, 64)
    np.testing.assert_array_equal(model.embed("clip", "image", v), v)
    both = pf.ExMCR.from_official({"clap": tmp_path / "ex_clap.pt", "ulip": tmp_path / "ex_ulip.pt"})
    p = unit(rng, 32, 56)
    np.testing.assert_allclose(both.embed("ulip", "3d", p), _official_head(ulip_state, p), atol=1e-6)
    np.testing.assert_allclose(both.embed("clap", "audio", a), _official_head(clap_state, a), atol=1e-6)
    # save / load round trip keeps it exact
    both.save(tmp_path / "m")
    again = pf.ExMCR.load(tmp_path / "m")
    np.testing.assert_array_equal(again.embed("ulip", "3d", p), both.embed("ulip", "3d", p))


def test_official_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="name the leaf"):
        pf.ExMCR.from_official(tmp_path / "x.pt")
    torch.save({"Head_A.net.0.weight": torch.zeros(4, 4)}, tmp_path / "cmcr.pt")
    with pytest.raises(ValueError, match="Head1 .f_l. and Head2"):
        pf.ExMCR.from_official(tmp_path / "cmcr.pt", leaf="clap")
    state = _official_state(8, 6, torch.Generator().manual_seed(1))
    torch.save(state, tmp_path / "ex.pt")
    with pytest.raises(ValueError, match="unknown official leaf 'foo'"):
        pf.ExMCR.from_official(tmp_path / "ex.pt", leaf="foo")
    m = pf.ExMCR.from_official(tmp_path / "ex.pt", leaf="foo", overlap="text", modality="audio")
    assert m.leaves["foo"]["modality"] == "audio"
    del state["Head2.mlp2.net2.1.running_var"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken.pt: checkpoint does not match the model: missing keys \['Head2.mlp2.net2.1.running_var'\]"):
        pf.ExMCR.from_official(tmp_path / "broken.pt", leaf="clap")


def test_projector_structure_and_init():
    torch.manual_seed(0)
    p = DecoupledProjector(12, 16)
    assert torch.equal(p.Head1.weight, torch.eye(12)) and not p.Head1.bias.any()  # f_l starts as the identity
    assert p.Head2.mlp1.net1[0].weight.shape == (24, 12) and p.Head2.mlp1.net2[0].weight.shape == (16, 24)
    assert p.Head2.mlp2.net1[0].weight.shape == (32, 16) and p.Head2.mlp2.net2[0].weight.shape == (16, 32)
    assert not hasattr(p.Head2, "mlp3")
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    w = p.Head2.mlp1.net1[0].weight
    assert w.abs().max() <= (6 / (12 + 24)) ** 0.5 and w.abs().max() > 0.8 * (6 / (12 + 24)) ** 0.5
    assert set(DecoupledProjector(12, 16, fm_depth=5).Head2.state_dict()) >= {"mlp5.net2.1.running_var"}
    assert set(DecoupledProjector(12, 16, fm_depth=0).Head2.state_dict()) == {"linear.weight", "linear.bias"}
    assert "mlp2.net2.0.weight" in DecoupledProjector(12, 16, fl="mlp2").Head1.state_dict()


# ---- the model --------------------------------------------------------------------------------------
def test_fit_embed_and_frozen_base(rng, tmp_path):
    clip, clap, ulip = spaces(rng)
    model = pf.ExMCR(small_cfg()).fit(clip, {"clap": (clap, "text"), "ulip": (ulip, "image")}, progress=False)
    assert set(model.history) == {"clap", "ulip"} and [h["epoch"] for h in model.history["clap"]] == [1, 2]
    assert {"nce_A-T", "nce_T-T", "nce_A-V", "nce_T-V", "intra"} <= set(model.history["clap"][0])
    za, zp = model.embed("clap", "audio", unit(rng, 9, 12)), model.embed("ulip", "3d", unit(rng, 7, 14))
    assert za.shape == (9, 16) and zp.shape == (7, 16) and za.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(za, axis=1), 1, atol=1e-5)
    # base modalities come back exactly as the base space has them (validated, L2-normalised)
    for mod in ("image", "text"):
        np.testing.assert_array_equal(model.embed("clip", mod, clip[mod]), clip[mod])
    raw = rng.standard_normal((20, 16)).astype(np.float32) * 4
    np.testing.assert_array_equal(model.embed("clip", "image", raw), normalized(raw, "x"))
    # ... so base retrieval is exactly the base model's
    V, T = raw, rng.standard_normal((20, 16)).astype(np.float32)
    assert metrics.paired_retrieval(model.embed("clip", "image", V), model.embed("clip", "text", T)) == \
        metrics.paired_retrieval(V, T)
    model.save(tmp_path / "m")
    again = pf.ExMCR.load(tmp_path / "m")
    X = unit(rng, 5, 12)
    np.testing.assert_array_equal(again.embed("clap", "audio", X), model.embed("clap", "audio", X))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["leaves"]["ulip"]["overlap"] == "image"
    from pairfree.models import load_model

    assert isinstance(load_model(tmp_path / "m"), pf.ExMCR)


def test_leaves_are_independent_and_overlap_is_inferred(rng):
    clip, clap, ulip = spaces(rng)
    both = pf.ExMCR(small_cfg()).fit(clip, {"clap": (clap, "text"), "ulip": (ulip, "image")}, progress=False)
    alone = pf.ExMCR(small_cfg()).fit(clip, {"clap": clap}, progress=False)  # overlap inferred: text
    X = unit(rng, 11, 12)
    np.testing.assert_array_equal(alone.embed("clap", "audio", X), both.embed("clap", "audio", X))


def test_deterministic_and_resume_is_exact(tmp_path, rng, monkeypatch):
    clip, clap, ulip = spaces(rng)
    cfg = small_cfg(epochs=3, seed=5)
    leaves = {"clap": (clap, "text"), "ulip": (ulip, "image")}
    X = unit(rng, 20, 14)
    full = pf.ExMCR(cfg).fit(clip, leaves, progress=False)
    again = pf.ExMCR(cfg).fit(clip, leaves, progress=False)
    np.testing.assert_array_equal(full.embed("ulip", "3d", X), again.embed("ulip", "3d", X))

    saved = train_mod.save_training_state
    calls = []

    def crash_in_second_leaf(path, *args):
        saved(path, *args)
        calls.append(path)
        if "ulip" in str(path) and args[4] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_training_state", crash_in_second_leaf)
    with pytest.raises(KeyboardInterrupt):
        pf.ExMCR(cfg).fit(clip, leaves, run_dir=tmp_path / "run", progress=False)
    monkeypatch.setattr(train_mod, "save_training_state", saved)
    assert (tmp_path / "run" / "clap" / "last.safetensors").exists()
    resumed = pf.ExMCR(cfg).fit(clip, leaves, run_dir=tmp_path / "run", progress=False)
    assert [h["epoch"] for h in resumed.history["ulip"]] == [1, 2, 3]
    np.testing.assert_array_equal(resumed.embed("ulip", "3d", X), full.embed("ulip", "3d", X))
    with pytest.raises(ValueError, match="different data or settings"):
        pf.ExMCR(small_cfg(epochs=3, seed=6)).fit(clip, leaves, run_dir=tmp_path / "run", progress=False)


def test_training_step_matches_manual_computation(rng):
    """The first optimisation step equals one computed by hand from DESIGN §4 (no noise)."""
    clip, clap, _ = spaces(rng, n_text=40, n_image=30)
    clap = pf.Space("clap", {"text": clap["text"], "audio": clap["audio"][:30]})
    cfg = small_cfg(epochs=1, batch_size=1000, noise_variance=0.0, lr=1e-2)
    model = pf.ExMCR(cfg).fit(clip, {"clap": (clap, "text")}, progress=False)
    r = Roles.of(clip, clap, "text")
    pool = {k: np.concatenate([modality_centric_pass(r, p, tau=TAU)[k] for p in ("overlap", "leaf", "base")])
            for k in ("c", "ol", "ob", "nb")}
    n = len(pool["c"])
    assert n == 40 + 30 + 30
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    c, ol, ob, nb = (torch.from_numpy(pool[k])[perm] for k in ("c", "ol", "ob", "nb"))
    ref = pf.ExMCR(cfg)
    ref._build(model.base, model.leaves)
    head = ref.heads["clap"].train()
    h = c @ head.Head1.weight.T + head.Head1.bias
    z = F.normalize(head.Head2(torch.cat([h, ol])), dim=-1)  # one BatchNorm batch (bn="joint")
    a_hat, t_hat = z[:n], z[n:]

    def nce(x, y):
        s = x @ y.T / 0.05
        return -0.5 * (torch.diag(s.log_softmax(1)).mean() + torch.diag(s.log_softmax(0)).mean())

    intra = 0.5 * (h - ol).norm(dim=1).mean()
    loss = 0.1 * intra + (nce(a_hat, ob) + nce(t_hat, ob) + nce(a_hat, nb) + nce(t_hat, nb)) / 4
    assert abs(loss.item() - model.history["clap"][0]["loss"]) < 1e-4
    # gradients of the hand-written loss equal those of the library's step on the same batch
    # (parameters after an AdamW step are not compared: its first step is sign-like, so float noise
    # in the exactly-zero gradients of the Linear biases before BatchNorm would flip them)
    loss.backward()
    other = pf.ExMCR(cfg)
    other._build(model.base, model.leaves)
    head2 = other.heads["clap"].train()
    from pairfree.extend import make_step

    loss2, _ = make_step(head2, cfg)({"c": c, "ol": ol, "ob": ob, "nb": nb}, torch.Generator())
    loss2.backward()
    assert abs(loss.item() - loss2.item()) < 1e-5
    for (name, p1), p2 in zip(head.named_parameters(), head2.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_objectives_and_stop_gradient(rng):
    clip, clap, _ = spaces(rng, n_text=64, n_image=64)
    m = pf.ExMCR(small_cfg(epochs=1, objectives="T-T,A-V")).fit(clip, {"clap": clap}, progress=False)
    assert {k for k in m.history["clap"][0] if k.startswith("nce_")} == {"nce_T-T", "nce_A-V"}
    assert ExMCRConfig(objectives="dense").objective_list == ["A-T", "T-T", "A-V", "T-V"]
    assert ExMCRConfig(passes=["I", "T"]).passes == "overlap,base"
    # stop_grad: f_l's gradient comes from L_intra only
    from pairfree.extend import make_step

    b = {k: torch.from_numpy(unit(rng, 32, 12 if k in ("c", "ol") else 16)) for k in ("c", "ol", "ob", "nb")}
    for stop in (True, False):
        cfg = ExMCRConfig(stop_grad=stop, noise_variance=0.0)
        torch.manual_seed(0)
        head = DecoupledProjector(12, 16)
        loss, _ = make_step(head, cfg)(b, None)
        loss.backward()
        g_total = head.Head1.weight.grad.clone()
        head.zero_grad()
        (0.1 * 0.5 * (head.Head1(b["c"]) - b["ol"]).norm(dim=1).mean()).backward()
        same = torch.allclose(g_total, head.Head1.weight.grad, atol=1e-7)
        assert same == stop


def test_errors_are_clear_and_nothing_is_half_written(rng, tmp_path):
    clip, clap, ulip = spaces(rng)
    m = pf.ExMCR(small_cfg(epochs=1))
    with pytest.raises(ValueError, match="not fitted"):
        m.embed("clap", "audio", unit(rng, 2, 12))
    with pytest.raises(ValueError, match="not fitted"):
        m.save(tmp_path / "never")
    # overlap missing from the base
    no_text = pf.Space("clip", {"image": clip["image"], "depth": unit(rng, 5, 16)})
    with pytest.raises(SpaceError, match="leaf 'clap': overlap modality 'text' is missing from space 'clip'"):
        m.fit(no_text, {"clap": (clap, "text")}, progress=False)
    # unaligned overlap rows; the first (valid) leaf is not trained, no run folder appears
    short = pf.Space("ulip", {"image": ulip["image"][:100], "3d": ulip["3d"]})
    with pytest.raises(SpaceError, match="leaf 'ulip': overlap 'image' rows are not aligned: space 'clip' has 240 rows, "
                                         "space 'ulip' has 100"):
        m.fit(clip, {"clap": (clap, "text"), "ulip": (short, "image")}, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists() and m.heads is None
    with pytest.raises(SpaceError, match="cannot infer the overlap"):
        m.fit(clip, {"x": pf.Space("x", {"audio": unit(rng, 5, 12)})}, progress=False)
    with pytest.raises(ValueError, match="also the base space's name"):
        m.fit(clip, {"clip": (clap, "text")}, progress=False)
    with pytest.raises(ValueError, match="at least one leaf"):
        m.fit(clip, {}, progress=False)
    m.fit(clip, {"clap": (clap, "text")}, progress=False)
    with pytest.raises(ValueError, match=r"embed\('clap', 'audio'\): expected \(n, 12\) embeddings .* got shape \(2, 16\)"):
        m.embed("clap", "audio", unit(rng, 2, 16))
    with pytest.raises(ValueError, match=r"expected \(n, 16\)"):
        m.embed("clip", "image", unit(rng, 2, 12))
    with pytest.raises(ValueError, match=r"unknown space 'ulip'; this model has base 'clip' and leaves \['clap'\]"):
        m.embed("ulip", "3d", unit(rng, 2, 14))
    with pytest.raises(ValueError, match="leaf space 'clap' has modalities"):
        m.embed("clap", "image", unit(rng, 2, 12))
    bad = unit(rng, 3, 12)
    bad[1] = np.nan
    with pytest.raises(SpaceError, match="row 1 contains NaN"):
        m.embed("clap", "audio", bad)
    for kw, msg in [({"fl": "mlp9"}, r"ExMCRConfig.fl: expected one of \[.linear."), ({"objectives": "A-X"}, "unknown entry 'A-X'"),
                    ({"passes": ""}, "at least one entry"), ({"fm_depth": 9}, "fm_depth"), ({"bn": "x"}, r"ExMCRConfig.bn: expected one of")]:
        with pytest.raises(ValueError, match=msg):
            ExMCRConfig(**kw)
    with pytest.raises(ValueError, match="unknown ExMCRConfig fields"):
        ExMCRConfig.from_dict({"epoch": 3})
    # saving over an existing model: a failure leaves the old one intact (atomic folder swap)
    m.save(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    class Boom(torch.nn.Module):
        def state_dict(self, *a, **k):
            raise RuntimeError("disk full")

    heads, m.heads = m.heads, Boom()
    with pytest.raises(RuntimeError, match="disk full"):
        m.save(tmp_path / "m")
    m.heads = heads
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["leaves"]["clap"]["dim"] = 13
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        pf.ExMCR.load(tmp_path / "m")
    with pytest.raises(ValueError, match="field 'method' is 'exmcr', expected 'cmcr'"):
        pf.CMCR.load(tmp_path / "m")


# ---- toy world (small preset, ~20 s) --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(request):
    from pairfree.toy import ToyWorldConfig, make_world

    cache = request.config.cache.mkdir("pairfree-cache")  # kept between test sessions, shared with test_end_to_end
    return make_world(ToyWorldConfig(seed=0, preset="small"), cache_dir=cache / "toy", progress=False), cache


def test_toy_world_exmcr_vs_cmcr(toy):
    """Ex-MCR keeps base retrieval exactly, beats C-MCR on audio->text, is at least on par on audio->image,
    and gives emergent audio<->3d far above chance (same epochs / batch for both methods)."""
    from pairfree.toy.evaluate import chance, run_cmcr, run_exmcr

    world, cache = toy
    model, ex, _ = run_exmcr(world, ExMCRConfig(epochs=12, batch_size=1024), progress=False, cache_dir=cache)
    _, cm, _ = run_cmcr(world, pf.CMCRConfig(epochs=12, batch_size=1024), progress=False, cache_dir=cache)
    base = metrics.paired_retrieval(world.test["clip/image"], world.test["clip/text"], positives="index", ks=(1, 5))
    assert ex["image_to_text"] == {k: round(base["a_to_b"][k], 4) for k in ("R@1", "R@5", "mAP")}
    assert ex["text_to_image"] == {k: round(base["b_to_a"][k], 4) for k in ("R@1", "R@5", "mAP")}
    np.testing.assert_array_equal(model.embed("clip", "image", world.test["clip/image"]),
                                  normalized(world.test["clip/image"], "x"))
    for task in ("audio_to_text", "text_to_audio"):
        # mAP carries the margin (R@1 over 400 queries moves by ~0.015 from seed noise alone)
        assert ex[task]["R@1"] > cm[task]["R@1"] and ex[task]["mAP"] > cm[task]["mAP"] + 0.03, (ex[task], cm[task])
    print({t: (ex[t], cm[t]) for t in ("audio_to_text", "text_to_audio", "audio_to_image", "image_to_audio")})
    for task in ("audio_to_image", "image_to_audio"):  # on par: within 0.02 mAP (~ seed spread at 400 queries)
        assert ex[task]["mAP"] >= cm[task]["mAP"] - 0.02, (ex[task], cm[task])
    c = chance(world)
    for task in ("audio_to_3d", "3d_to_audio"):
        assert ex[task]["R@5"] > 5 * c["R@5"], ex[task]
    assert ex["3d_zero_shot"]["Acc@1"] > 10 * c["Acc@1"]
