"""ULIP-2 PointBERT: official layout, safe strict loading, and each tower against a direct computation.

The reference forwards below are written from the architecture spec
(shared/reference/ulip2_pointbert.md) with plain float64 torch ops, one cloud / group / token at a
time, independently of `pairfree.encoders.pointbert`.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import pickletools
import zipfile

import numpy as np
import pytest
import torch

from pairfree.encoders.pointbert import (
    ULIP2,
    ULIP2CheckpointError,
    ULIP2Config,
    check_state_dict,
    farthest_point_sample,
    infer_config,
    knn_indices,
    load_ulip2,
)
from pairfree.encoders.ulip2 import ULIP2Encoder, pc_normalize, preprocess_image, preprocess_points, tokenize
from pf_testing import reference
from tiny_checkpoints import TINY, TINY_ARGS, random_state_dict, save_official

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    sd = random_state_dict(TINY)
    path = save_official(
        tmp_path_factory.mktemp("ulip2") / "pointbert_tiny.pt", sd,
        model="ULIP_PointBERT", npoints=256, lr=3e-3, betas=(0.9, 0.98), **TINY_ARGS,
    )  # fmt: skip
    return path, sd, load_ulip2(path)


def try_import(name: str):
    from pairfree.encoders.common import import_torchvision

    try:
        import_torchvision()  # tolerates a torchvision whose compiled ops do not match this torch
        return __import__(name)
    except Exception as e:  # e.g. a torchvision build that does not match torch raises RuntimeError
        pytest.skip(f"{name} cannot be imported here ({type(e).__name__}: {str(e)[:80]})")


# ----------------------------------------------------------------------------- direct computations (float64)


def ln(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(x, wqkv, bqkv, wo, bo, heads, mask=None):
    C = x.shape[1]
    qkv = x @ wqkv.T + (bqkv if bqkv is not None else 0)
    q, k, v = qkv[:, :C], qkv[:, C : 2 * C], qkv[:, 2 * C :]
    d = C // heads
    out = []
    for h in range(heads):
        s = q[:, h * d : (h + 1) * d] @ k[:, h * d : (h + 1) * d].T / math.sqrt(d)
        if mask is not None:
            s = s + mask
        a = torch.exp(s - s.max(-1, keepdim=True).values)
        out.append((a / a.sum(-1, keepdim=True)) @ v[:, h * d : (h + 1) * d])
    return torch.cat(out, 1) @ wo.T + bo


def vit_block(x, p, pre, heads, eps, qkv_bias):
    a = ln(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
    x = x + attention(a, p[pre + "attn.qkv.weight"], p.get(pre + "attn.qkv.bias") if qkv_bias else None,
                      p[pre + "attn.proj.weight"], p[pre + "attn.proj.bias"], heads)  # fmt: skip
    m = ln(x, p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
    return (
        x
        + gelu(m @ p[pre + "mlp.fc1.weight"].T + p[pre + "mlp.fc1.bias"]) @ p[pre + "mlp.fc2.weight"].T
        + p[pre + "mlp.fc2.bias"]
    )


def ref_fps(pts, n):
    chosen, nearest = [0], torch.full((len(pts),), math.inf, dtype=pts.dtype)
    while len(chosen) < n:
        nearest = torch.minimum(nearest, ((pts - pts[chosen[-1]]) ** 2).sum(1))
        chosen.append(int(torch.argmax(nearest)))
    return chosen


def ref_point_embedding(sd, cfg: ULIP2Config, cloud: np.ndarray) -> np.ndarray:
    p = {k: v.double() for k, v in sd.items()}
    e = "point_encoder.encoder."
    pts = torch.from_numpy(cloud).double()

    def conv(x, name):  # 1x1 Conv1d on (K, C) rows
        return x @ p[e + name + ".weight"][:, :, 0].T + p[e + name + ".bias"]

    def bn(x, name):
        return (x - p[e + name + ".running_mean"]) / torch.sqrt(p[e + name + ".running_var"] + 1e-5) * p[
            e + name + ".weight"
        ] + p[e + name + ".bias"]

    centres = pts[ref_fps(pts, cfg.num_group)]
    tokens = []
    for c in centres:
        order = sorted(range(len(pts)), key=lambda i: float(((pts[i] - c) ** 2).sum()))
        group = pts[order[: cfg.group_size]] - c  # K x 3
        f = conv(torch.relu(bn(conv(group, "first_conv.0"), "first_conv.1")), "first_conv.3")
        f = torch.cat([f.max(0).values.expand_as(f), f], 1)
        f = conv(torch.relu(bn(conv(f, "second_conv.0"), "second_conv.1")), "second_conv.3")
        tokens.append(f.max(0).values)
    pe = "point_encoder."
    x = torch.cat(
        [p[pe + "cls_token"][0], torch.stack(tokens) @ p[pe + "reduce_dim.weight"].T + p[pe + "reduce_dim.bias"]]
    )
    pos = gelu(centres @ p[pe + "pos_embed.0.weight"].T + p[pe + "pos_embed.0.bias"]) @ p[pe + "pos_embed.2.weight"].T
    pos = torch.cat([p[pe + "cls_pos"][0], pos + p[pe + "pos_embed.2.bias"]])
    for i in range(cfg.point_depth):
        x = vit_block(x + pos, p, f"{pe}blocks.blocks.{i}.", cfg.point_heads, 1e-5, qkv_bias=False)
    x = ln(x, p[pe + "norm.weight"], p[pe + "norm.bias"], 1e-5)
    return (torch.cat([x[0], x[1:].max(0).values]) @ p["pc_projection"]).numpy()


def ref_image_embedding(sd, cfg: ULIP2Config, image: np.ndarray) -> np.ndarray:
    p = {k: v.double() for k, v in sd.items()}
    P, n = cfg.patch_size, cfg.image_size // cfg.patch_size
    img = torch.from_numpy(image).double()  # 3 H W
    patches = img.reshape(3, n, P, n, P).permute(1, 3, 0, 2, 4).reshape(n * n, 3 * P * P)  # row-major grid
    w = p["visual.patch_embed.proj.weight"].reshape(cfg.vision_width, -1)
    x = (
        torch.cat([p["visual.cls_token"][0], patches @ w.T + p["visual.patch_embed.proj.bias"]])
        + p["visual.pos_embed"][0]
    )
    for i in range(cfg.vision_depth):
        x = vit_block(x, p, f"visual.blocks.{i}.", cfg.vision_heads, 1e-6, qkv_bias=True)
    x = ln(x, p["visual.norm.weight"], p["visual.norm.bias"], 1e-6)
    return (x[0] @ p["image_projection"]).numpy()


def ref_text_embedding(sd, cfg: ULIP2Config, ids: np.ndarray) -> np.ndarray:
    p = {k: v.double() for k, v in sd.items()}
    L = cfg.context_length
    x = p["token_embedding.weight"][torch.from_numpy(ids)] + p["positional_embedding"]
    mask = torch.tensor([[0.0 if j <= i else -math.inf for j in range(L)] for i in range(L)], dtype=torch.float64)
    for i in range(cfg.text_depth):
        r = f"transformer.resblocks.{i}."
        a = ln(x, p[r + "ln_1.weight"], p[r + "ln_1.bias"], 1e-5)
        x = x + attention(a, p[r + "attn.in_proj_weight"], p[r + "attn.in_proj_bias"],
                          p[r + "attn.out_proj.weight"], p[r + "attn.out_proj.bias"], cfg.text_heads, mask)  # fmt: skip
        h = ln(x, p[r + "ln_2.weight"], p[r + "ln_2.bias"], 1e-5) @ p[r + "mlp.c_fc.weight"].T + p[r + "mlp.c_fc.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ p[r + "mlp.c_proj.weight"].T + p[r + "mlp.c_proj.bias"]
    x = ln(x, p["ln_final.weight"], p["ln_final.bias"], 1e-5)
    return (x[int(np.argmax(ids))] @ p["text_projection"]).numpy()


def assert_close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale)


# ----------------------------------------------------------------------------- layout


def test_full_size_model_has_exactly_the_official_names_and_shapes():
    official = json.loads(reference("ulip2_pointbert_state_dict_shapes.json").read_text())
    with torch.device("meta"):
        model = ULIP2()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert len(official) == 462
    assert sorted(set(official) - set(ours)) == [] and sorted(set(ours) - set(official)) == []
    assert {k: v for k, v in ours.items() if official[k] != v} == {}
    # and the sizes read back from those shapes are the official defaults (head width 64)
    meta_sd = {k: torch.empty(v, device="meta") for k, v in official.items()}
    assert infer_config(meta_sd) == ULIP2Config()
    check_state_dict({k: v.shape for k, v in model.state_dict().items()}, meta_sd, "official")  # no error


def test_official_layout_loads_strictly_with_sizes_from_shapes_and_args(tiny):
    _, sd, model = tiny
    assert model.config == TINY
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    got = model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert model.checkpoint_args["npoints"] == 256 and model.checkpoint_args["betas"] == (0.9, 0.98)


def test_bare_state_dict_loads_with_overrides(tiny, tmp_path):
    _, sd, model = tiny
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    with pytest.raises(ULIP2CheckpointError, match="point_heads"):
        load_ulip2(bare)  # width 32 tells no head count, and there are no args
    m2 = load_ulip2(bare, **TINY_ARGS)
    assert m2.config == TINY
    x = torch.rand(2, 64, 3)
    torch.testing.assert_close(m2.encode_pc(x), model.encode_pc(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- towers vs direct computations


def test_point_tower_matches_direct_computation(tiny):
    _, sd, model = tiny
    rng = np.random.default_rng(1)
    clouds = np.stack([rng.standard_normal((150, 3)) * [1.0, 0.5, 0.3] + 0.1 * i for i in range(3)]).astype(np.float32)
    with torch.inference_mode():
        got = model.encode_pc(torch.from_numpy(clouds)).numpy()
    want = np.stack([ref_point_embedding(sd, TINY, c) for c in clouds])
    assert got.shape == (3, TINY.embed_dim)
    assert_close(got, want)


def test_image_tower_matches_direct_computation(tiny):
    _, sd, model = tiny
    images = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        got = model.encode_image(torch.from_numpy(images)).numpy()
    assert_close(got, np.stack([ref_image_embedding(sd, TINY, im) for im in images]))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.encode_image(torch.zeros(1, 3, 224, 224))


def test_image_tower_matches_timm(tiny):
    _, sd, model = tiny
    try_import("timm")
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0,
                            qkv_bias=True, num_classes=0).eval()  # fmt: skip
    vit.load_state_dict({k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(x), vit(x) @ sd["image_projection"], rtol=1e-5, atol=1e-5)


def test_text_tower_matches_direct_computation(tiny):
    _, sd, model = tiny
    rng = np.random.default_rng(3)
    ids = np.zeros((3, TINY.context_length), np.int64)
    for row, n in zip(ids, (3, 7, TINY.context_length)):  # <start> words <end>, zero padded
        row[0], row[1 : n - 1], row[n - 1] = (
            TINY.vocab_size - 2,
            rng.integers(1, TINY.vocab_size - 2, n - 2),
            TINY.vocab_size - 1,
        )
    with torch.inference_mode():
        got = model.encode_text(torch.from_numpy(ids)).numpy()
    assert_close(got, np.stack([ref_text_embedding(sd, TINY, r) for r in ids]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 60\)"):
        model.encode_text(torch.full((1, TINY.context_length), 49407))


def test_text_tower_matches_open_clip(tiny):
    _, sd, model = tiny
    try_import("open_clip")
    from open_clip.transformer import TextTransformer

    from pairfree.encoders.pointbert import QuickGELU

    tt = TextTransformer(context_length=12, vocab_size=60, width=16, heads=2, layers=2, mlp_ratio=2.0, output_dim=10,
                         act_layer=QuickGELU).eval()  # fmt: skip
    names = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
    missing, unexpected = tt.load_state_dict({k: v for k, v in sd.items() if k.startswith(names)}, strict=False)
    assert not unexpected and all(k == "attn_mask" for k in missing)
    ids = torch.randint(1, 58, (2, 12))
    ids[:, 0], ids[0, 5:], ids[0, 4], ids[1, 11] = 58, 0, 59, 59
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_text(ids), tt(ids), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- grouping determinism


def test_fps_is_batched_deterministic_from_index_zero_and_knn_is_exact():
    g = torch.Generator().manual_seed(4)
    xyz = torch.rand(3, 300, 3, generator=g)
    idx = farthest_point_sample(xyz, 40)
    assert idx.shape == (3, 40) and (idx[:, 0] == 0).all()
    for b in range(3):
        assert idx[b].tolist() == ref_fps(xyz[b].double(), 40)
        assert torch.equal(farthest_point_sample(xyz[b : b + 1], 40)[0], idx[b])  # batch-independent
    centres = torch.gather(xyz, 1, idx.unsqueeze(-1).expand(-1, -1, 3))
    nn_idx = knn_indices(xyz, centres, 9)
    d = ((centres[:, :, None] - xyz[:, None]) ** 2).sum(-1)
    want = torch.argsort(d, dim=-1, stable=True)[..., :9]
    assert torch.equal(nn_idx, want)
    with pytest.raises(ValueError, match="cannot take 301"):
        farthest_point_sample(xyz, 301)


def test_same_cloud_same_embedding_and_permutation_invariance(tiny):
    path, _, _ = tiny
    enc = ULIP2Encoder(path, n_points=200)
    rng = np.random.default_rng(5)
    cloud = rng.standard_normal((200, 3)).astype(np.float32)
    other = rng.standard_normal((200, 3)).astype(np.float32)
    a = enc.encode("3d", [cloud, other])
    b = enc.encode("3d", [cloud, other])
    assert np.array_equal(a, b)  # no random FPS start: bit-identical
    np.testing.assert_allclose(enc.encode("3d", [cloud])[0], a[0], atol=1e-6)  # does not depend on the batch
    # any permutation keeping point 0 first gives the same groups, hence the same embedding
    perm = np.concatenate([[0], 1 + rng.permutation(199)])
    np.testing.assert_allclose(enc.encode("3d", [cloud[perm]])[0], a[0], atol=1e-6)
    # normalisation makes it invariant to translation and scale
    np.testing.assert_allclose(enc.encode("3d", [cloud * 3.5 + [1, -2, 0.5]])[0], a[0], atol=1e-5)


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_points_resampling_and_normalisation():
    rng = np.random.default_rng(6)
    cloud = (rng.standard_normal((500, 3)) * [2, 1, 0.5] + 3).astype(np.float32)
    down = preprocess_points(cloud, n_points=100, normalize=False)
    fps = farthest_point_sample(torch.from_numpy(cloud)[None], 100)[0].numpy()
    assert np.array_equal(down, cloud[fps]) and np.array_equal(down[0], cloud[0])
    norm = preprocess_points(cloud, n_points=100)
    np.testing.assert_allclose(norm, pc_normalize(cloud[fps]), atol=1e-6)
    np.testing.assert_allclose(norm.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(norm, axis=1).max(), 1, atol=1e-6)
    c = cloud - cloud.mean(0)  # ULIP's pc_normalize formula
    np.testing.assert_allclose(pc_normalize(cloud), c / np.sqrt((c**2).sum(1)).max(), atol=1e-6)
    up = preprocess_points(cloud[:30], n_points=100)
    assert up.shape == (100, 3) and up.dtype == np.float32
    assert np.array_equal(up, pc_normalize(cloud[:30])[np.arange(100) % 30])  # stats from the distinct points
    rnd = preprocess_points(cloud, n_points=100, normalize=False, resample="random")
    assert np.array_equal(rnd, preprocess_points(cloud, n_points=100, normalize=False, resample="random"))
    assert len({tuple(r) for r in rnd}) == 100 and all(tuple(r) in {tuple(q) for q in cloud} for r in rnd)
    assert preprocess_points(cloud, n_points=None, normalize=False).tobytes() == cloud.tobytes()
    np.testing.assert_array_equal(preprocess_points(np.ones((5, 3)), n_points=5), 0)  # one point: centred only
    for bad, msg in [(np.zeros((4, 6)), r"\(N, 3\)"), (np.zeros((0, 3)), "empty"), (np.full((4, 3), np.nan), "NaN")]:
        with pytest.raises(ValueError, match=msg):
            preprocess_points(bad)


def test_preprocess_image_matches_the_transform():
    from PIL import Image

    rng = np.random.default_rng(7)
    px = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    got = preprocess_image(Image.fromarray(px))
    want = ((px.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    wide = Image.fromarray(rng.integers(0, 256, (300, 451, 3), dtype=np.uint8))
    out = preprocess_image(wide)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    resized = np.asarray(wide.resize((336, 224), Image.BILINEAR), dtype=np.float32)[:, 56:280] / 255
    np.testing.assert_allclose(
        out, ((resized - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1), atol=1e-6
    )
    with pytest.raises(TypeError, match="PIL.Image"):
        preprocess_image(px)


def test_preprocess_image_matches_torchvision():
    from PIL import Image

    try_import("torchvision")
    import torchvision.transforms as T

    tf = T.Compose(
        [T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    rng = np.random.default_rng(8)
    for shape in [(300, 451, 3), (500, 233, 3), (224, 224, 3), (100, 150, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        np.testing.assert_allclose(preprocess_image(img), tf(img).numpy(), atol=1e-6)


def test_tokenize_gives_clip_bpe_ids():
    try:
        ids = tokenize("a photo of a cat")
    except ImportError as e:
        pytest.skip(str(e))
    assert ids.dtype == np.int64 and ids.shape == (77,)
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0] and not ids[8:].any()
    long = tokenize("cat " * 100)
    assert long[0] == 49406 and long[-1] == 49407  # cut to 77, ends with <end>
    with pytest.raises(TypeError, match="str"):
        tokenize(3)


# ----------------------------------------------------------------------------- the Encoder


def test_encoder_contract_end_to_end(tiny):
    from PIL import Image

    path, sd, model = tiny
    enc = ULIP2Encoder(path, n_points=128)
    assert enc.id == f"ulip2:{path}" and enc.modalities == ("3d", "image", "text") and enc.dim == TINY.embed_dim
    rng = np.random.default_rng(9)
    clouds = [rng.standard_normal((n, 3)).astype(np.float32) for n in (90, 128, 400)]
    z = enc.encode("3d", clouds, batch_size=2)
    assert z.shape == (3, TINY.embed_dim) and z.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1, atol=1e-6)
    pre = np.stack([preprocess_points(c, 128) for c in clouds])
    raw = model.encode_pc(torch.from_numpy(pre)).detach().numpy()
    np.testing.assert_allclose(z, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    images = [Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    zi = enc.encode("image", images)
    want = ref_image_embedding(sd, TINY, preprocess_image(images[1], 32))
    np.testing.assert_allclose(zi[1], want / np.linalg.norm(want), atol=1e-5)
    with pytest.raises(ValueError, match="not 'audio'"):
        enc.encode("audio", [np.zeros(10, np.float32)])
    with pytest.raises(ValueError, match="one size"):
        ULIP2Encoder(path, n_points=None).encode("3d", clouds)
    assert enc.encode("3d", []).shape == (0, TINY.embed_dim)


def test_encoder_half_precision_runs(tiny):
    path, _, _ = tiny
    cloud = np.random.default_rng(10).standard_normal((100, 3)).astype(np.float32)
    z32 = ULIP2Encoder(path, n_points=100).encode("3d", [cloud])
    z16 = ULIP2Encoder(path, n_points=100, dtype="bfloat16").encode("3d", [cloud])
    assert z16.dtype == np.float32 and float((z16 @ z32.T)[0, 0]) > 0.98
    with pytest.raises(ValueError, match="dtype"):
        ULIP2Encoder(path, dtype="float64")


# ----------------------------------------------------------------------------- malformed checkpoints


def test_wrong_shape_missing_and_extra_keys_are_named(tiny, tmp_path):
    _, sd, _ = tiny
    bad = dict(sd)
    bad["point_encoder.reduce_dim.weight"] = torch.zeros(32, 21)
    p = save_official(tmp_path / "shape.pt", bad, **TINY_ARGS)
    with pytest.raises(ULIP2CheckpointError) as e:
        load_ulip2(p)
    msg = str(e.value)
    assert str(p) in msg and "point_encoder.reduce_dim.weight (expected [32, 20], found [32, 21])" in msg

    bad = {k: v for k, v in sd.items() if k != "visual.norm.bias"}
    bad["visual.head.weight"] = torch.zeros(5, 24)
    p = save_official(tmp_path / "keys.pt", bad, **TINY_ARGS)
    with pytest.raises(ULIP2CheckpointError) as e:
        load_ulip2(p)
    msg = str(e.value)
    assert (
        "1 missing: visual.norm.bias (expected [24])" in msg
        and "1 unexpected: visual.head.weight (found [5, 24])" in msg
    )

    p = tmp_path / "junk.pt"
    p.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ULIP2CheckpointError, match="not a readable PyTorch checkpoint"):
        load_ulip2(p)
    torch.save({"state_dict": {"module.x": 3}}, tmp_path / "nontensor.pt")
    with pytest.raises(ULIP2CheckpointError, match="'module.x' is a int, not a tensor"):
        load_ulip2(tmp_path / "nontensor.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ULIP2CheckpointError, match="expected a dict with 'state_dict'"):
        load_ulip2(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_ulip2(tmp_path / "nowhere.pt")


class _WritesAFile:
    """Unpickling this would run `exec`, which would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("where", ["top", "args"])
def test_pickle_with_a_non_allowed_global_is_refused_and_runs_nothing(tiny, tmp_path, where):
    _, sd, _ = tiny
    marker = tmp_path / "marker.txt"
    args = argparse.Namespace(**TINY_ARGS)
    obj = {"state_dict": {"module." + k: v for k, v in sd.items()}, "args": args}
    if where == "top":
        obj["payload"] = _WritesAFile(marker)
    else:
        args.payload = _WritesAFile(marker)
    p = tmp_path / "evil.pt"
    torch.save(obj, p)
    with zipfile.ZipFile(p) as z:  # the payload really is in the pickle
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert any("exec" in str(a) for _, a, _ in pickletools.genops(io.BytesIO(data)))
    with pytest.raises(ULIP2CheckpointError) as e:
        load_ulip2(p)
    assert str(p) in str(e.value) and "refused to unpickle" in str(e.value) and "exec" in str(e.value)
    assert not marker.exists()


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        ULIP2Config(point_width=30, point_heads=4)
    with pytest.raises(TypeError, match="unknown ULIP-2 config fields"):
        infer_config({}, point_hedas=3)
    assert dataclasses.replace(TINY, num_group=8).num_group == 8


# ----------------------------------------------------------------------------- full size (slow)


@pytest.mark.slow
def test_full_size_point_tower_runs_on_8192_points(tmp_path):
    model = ULIP2().eval()
    cloud = preprocess_points(np.random.default_rng(11).standard_normal((10000, 3)), 8192)
    with torch.inference_mode():
        z = model.encode_pc(torch.from_numpy(cloud)[None])
        z2 = model.encode_pc(torch.from_numpy(cloud)[None])
    assert z.shape == (1, 512) and torch.isfinite(z).all() and torch.equal(z, z2)
    with torch.inference_mode():
        zi = model.encode_image(torch.zeros(1, 3, 224, 224))
        zt = model.encode_text(torch.tensor([[49406, 320, 49407] + [0] * 74]))
    assert zi.shape == zt.shape == (1, 512)


def test_demo_records_through_the_safe_reader_and_tiny_ulip2(tiny):
    """The official Objaverse demo records (pickled .npy) read without unpickling code, then the tiny
    ULIP-2 point tower, checked against the model's own forward on the same preprocessed points."""
    from pairfree.media import load_objaverse_record

    path, _, model = tiny
    enc = ULIP2Encoder(path, n_points=128)
    clouds = []
    for name in ("BBQ", "toilet", "train"):
        rec = load_objaverse_record(reference("assets", f"{name}.npy"))
        assert rec["xyz"].shape == (10000, 3)
        clouds.append(np.asarray(rec["xyz"], np.float32))
    z = enc.encode("3d", clouds)
    raw = model.encode_pc(torch.from_numpy(np.stack([preprocess_points(c, 128) for c in clouds]))).detach().numpy()
    np.testing.assert_allclose(z, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
