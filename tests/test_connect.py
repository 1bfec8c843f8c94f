import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pairfree as pf
import pairfree.train as train_mod
from pairfree import losses
from pf_testing import reference, unit


def spaces(rng, n_text=400):
    t1 = unit(rng, n_text, 16)
    t2 = t1 @ rng.standard_normal((16, 12)).astype(np.float32)
    clip = pf.Space("clip", {"text": t1, "image": unit(rng, 300, 16)})
    clap = pf.Space("clap", {"text": t2, "audio": unit(rng, 250, 12)})
    return clip, clap


def test_info_nce_and_intra_against_direct_formula(rng):
    a, b = torch.from_numpy(unit(rng, 6, 5)), torch.from_numpy(unit(rng, 6, 5))
    s = (a @ b.T / 0.05).double()
    direct = -0.5 * (torch.diag(s.log_softmax(1)).mean() + torch.diag(s.log_softmax(0)).mean())
    assert abs(losses.info_nce(a, b, 0.05).item() - direct.item()) < 1e-5
    assert abs(losses.squared_l2(a, b).item() - ((a - b) ** 2).sum(1).mean().item()) < 1e-6
    g = torch.Generator().manual_seed(0)
    x = losses.add_noise(a, 0.004, g)
    torch.testing.assert_close(x.norm(dim=1), torch.ones(6))
    delta = losses.add_noise(torch.zeros(20000, 1) + 1e3, 0.004, torch.Generator().manual_seed(1))
    assert torch.allclose(delta, torch.ones_like(delta))  # renormalised


def test_fit_embed_save_load(tmp_path, rng):
    clip, clap = spaces(rng)
    model = pf.CMCR(pf.CMCRConfig(epochs=2, batch_size=128)).fit(clip, clap, overlap="text", progress=False)
    za = model.embed("clap", "audio", unit(rng, 9, 12))
    assert za.shape == (9, 16) and za.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(za, axis=1), 1, atol=1e-5)
    assert [h["epoch"] for h in model.history] == [1, 2]
    model.save(tmp_path / "m")
    again = pf.CMCR.load(tmp_path / "m")
    X = unit(rng, 5, 16)
    np.testing.assert_array_equal(again.embed("clip", "image", X), model.embed("clip", "image", X))


def test_deterministic_and_resume_is_exact(tmp_path, rng, monkeypatch):
    clip, clap = spaces(rng)
    cfg = pf.CMCRConfig(epochs=4, batch_size=128, seed=3)
    X = unit(rng, 20, 12)
    full = pf.CMCR(cfg).fit(clip, clap, "text", progress=False)
    again = pf.CMCR(cfg).fit(clip, clap, "text", progress=False)
    np.testing.assert_array_equal(full.embed("clap", "audio", X), again.embed("clap", "audio", X))

    saved = train_mod.save_training_state

    def crash_after_two(path, *args):
        saved(path, *args)
        if args[4] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_training_state", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        pf.CMCR(cfg).fit(clip, clap, "text", run_dir=tmp_path / "ck", progress=False)
    monkeypatch.setattr(train_mod, "save_training_state", saved)
    resumed = pf.CMCR(cfg).fit(clip, clap, "text", run_dir=tmp_path / "ck", progress=False)
    assert len(resumed.history) == 4
    np.testing.assert_array_equal(resumed.embed("clap", "audio", X), full.embed("clap", "audio", X))
    # a checkpoint written for other settings is refused, not silently mixed in
    with pytest.raises(ValueError, match="different data or settings"):
        pf.CMCR(pf.CMCRConfig(epochs=4, batch_size=128, seed=4)).fit(clip, clap, "text", run_dir=tmp_path / "ck", progress=False)


def test_training_step_matches_manual_computation(rng):
    """One optimisation step of fit equals a step computed by hand from the DESIGN formulas."""
    clip, clap = spaces(rng, n_text=64)
    cfg = pf.CMCRConfig(epochs=1, batch_size=64, semantic_completion=False, lr=1e-2)
    model = pf.CMCR(cfg)
    v = pf.aggregate(clip["text"], clip["image"], tau=0.01)
    a = pf.aggregate(clap["text"], clap["audio"], tau=0.01)
    model.fit(clip, clap, "text", progress=False)
    # manual: same init, same single batch in the loop's shuffled order (AdamW's first step is
    # sign-like, so even float summation order matters for near-zero gradients)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(cfg.seed))
    ref = pf.CMCR(cfg)
    ref._build(model.spaces)
    fx, fy = ref.heads["clip"], ref.heads["clap"]
    ref.heads.train()
    opt = torch.optim.AdamW(ref.heads.parameters(), lr=1e-2, weight_decay=0.01)
    tx, ty = torch.from_numpy(clip["text"])[perm], torch.from_numpy(clap["text"])[perm]
    zx = F.normalize(fx(torch.cat([tx, torch.from_numpy(v)[perm]])), dim=-1)
    zy = F.normalize(fy(torch.cat([ty, torch.from_numpy(a)[perm]])), dim=-1)
    ztx, zv, zty, za = zx[:64], zx[64:], zy[:64], zy[64:]
    loss = losses.info_nce(ztx, zty, 0.05) + losses.info_nce(zv, za, 0.05) + 0.1 * (
        ((ztx - zv) ** 2).sum(1).mean() + ((zty - za) ** 2).sum(1).mean())
    assert abs(loss.item() - model.history[0]["loss"]) < 1e-4
    opt.zero_grad(); loss.backward(); opt.step()
    ref.heads.eval()
    X = unit(rng, 7, 12)
    np.testing.assert_allclose(ref.embed("clap", "audio", X), model.embed("clap", "audio", X), atol=1e-5)


def test_plain_variant_uses_only_text_pairs(rng):
    clip, clap = spaces(rng)
    m = pf.CMCR(pf.CMCRConfig(epochs=1, batch_size=400, semantic_consistency=False, semantic_completion=False))
    m.fit(clip, clap, "text", progress=False)
    assert set(m.history[0]) >= {"inter_text"} and "inter_pseudo" not in m.history[0]


def test_errors(tmp_path, rng):
    clip, clap = spaces(rng)
    m = pf.CMCR(pf.CMCRConfig(epochs=1, batch_size=512))
    with pytest.raises(ValueError, match="not fitted"):
        m.embed("clap", "audio", unit(rng, 2, 12))
    m.fit(clip, clap, "text", progress=False)
    with pytest.raises(ValueError, match=r"expected \(n, 12\)"):
        m.embed("clap", "audio", unit(rng, 2, 16))
    with pytest.raises(ValueError, match="unknown space 'ulip'"):
        m.embed("ulip", "3d", unit(rng, 2, 12))
    with pytest.raises(ValueError, match="has modalities"):
        m.embed("clap", "image", unit(rng, 2, 12))
    with pytest.raises(ValueError, match=r"CMCRConfig.projector: expected one of \[.mlp1., .mlp2.\], got .mlp9."):
        pf.CMCRConfig(projector="mlp9")
    # settings that only make sense together are refused when the config is made, naming its fields
    with pytest.raises(ValueError, match="aggregation_select='groups' needs aggregation_min_cosine"):
        pf.CMCRConfig(aggregation="ivf", aggregation_select="groups")
    with pytest.raises(ValueError, match="aggregation_redo=0.01 needs aggregation_select='groups'"):
        pf.CMCRConfig(aggregation="ivf", aggregation_redo=0.01)
    m.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors"):
        pf.CMCR.load(tmp_path / "m")
    m.save(tmp_path / "m2")
    cfg = json.loads((tmp_path / "m2" / "config.json").read_text())
    cfg["spaces"]["clap"]["dim"] = 13
    (tmp_path / "m2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch"):
        pf.CMCR.load(tmp_path / "m2")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        pf.CMCR.load(tmp_path / "nothing")


def _official_head(state, prefix, x, preset):
    """Direct re-computation of the released head definition (eval-mode BatchNorm)."""
    def lin(h, p):
        return h @ state[f"{p}.weight"].double().T + state[f"{p}.bias"].double()

    def bn(h, p):
        return (h - state[f"{p}.running_mean"].double()) / torch.sqrt(state[f"{p}.running_var"].double() + 1e-5) \
            * state[f"{p}.weight"].double() + state[f"{p}.bias"].double()

    x = F.normalize(x.double(), dim=-1)
    if preset == "mlp1":
        h = torch.relu(bn(lin(x, f"{prefix}.net.0"), f"{prefix}.net.1"))
    else:
        h = torch.relu(bn(lin(x, f"{prefix}.net1.0"), f"{prefix}.net1.1"))
        h = bn(lin(h, f"{prefix}.net2.0"), f"{prefix}.net2.1")
    return F.normalize(h, dim=-1).numpy()


def test_official_ulip_clip_checkpoint(rng):
    path = reference("c-mcr", "ulip_clip.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = pf.CMCR.from_official(path)
    assert model.config.projector == "mlp1" and model.overlap == "image"
    x = torch.from_numpy(unit(rng, 64, 512))
    np.testing.assert_allclose(model.embed("clip", "image", x.numpy()), _official_head(state, "Head_A", x, "mlp1"), atol=1e-6)
    np.testing.assert_allclose(model.embed("ulip", "3d", x.numpy()), _official_head(state, "Head_B", x, "mlp1"), atol=1e-6)


def _random_bn(d):
    return {"weight": torch.rand(d) + 0.5, "bias": torch.randn(d) * 0.1, "running_mean": torch.randn(d) * 0.1,
            "running_var": torch.rand(d) + 0.1, "num_batches_tracked": torch.tensor(3080)}


def test_official_clap_clip_layout(tmp_path, rng):
    state = {}
    for head in ("Head_A", "Head_B"):
        state[f"{head}.net1.0.weight"], state[f"{head}.net1.0.bias"] = torch.randn(64, 32) * 0.1, torch.randn(64) * 0.1
        state[f"{head}.net2.0.weight"], state[f"{head}.net2.0.bias"] = torch.randn(32, 64) * 0.1, torch.randn(32) * 0.1
        for k, v in _random_bn(64).items():
            state[f"{head}.net1.1.{k}"] = v
        for k, v in _random_bn(32).items():
            state[f"{head}.net2.1.{k}"] = v
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "clap_clip.pt")
    model = pf.CMCR.from_official(tmp_path / "clap_clip.pt")
    assert model.config.projector == "mlp2" and set(model.spaces) == {"clap", "clip"}
    x = torch.from_numpy(unit(rng, 16, 32))
    np.testing.assert_allclose(model.embed("clap", "audio", x.numpy()), _official_head(state, "Head_A", x, "mlp2"), atol=1e-6)
    np.testing.assert_allclose(model.embed("clip", "image", x.numpy()), _official_head(state, "Head_B", x, "mlp2"), atol=1e-6)


def test_official_checkpoint_errors(tmp_path):
    bad = dict(("Head_A.net.0.weight", torch.zeros(4, 4)) for _ in range(1))
    torch.save(bad, tmp_path / "one_head.pt")
    with pytest.raises(ValueError, match="Head_A and Head_B"):
        pf.CMCR.from_official(tmp_path / "one_head.pt")

    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True refused"):
        pf.CMCR.from_official(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "one_head.pt").read_bytes()[:50])
    with pytest.raises(ValueError, match="trunc.pt"):
        pf.CMCR.from_official(tmp_path / "trunc.pt")
