"""ULIP-2 PointBERT in plain torch: the architecture of the official `pointbert_ULIP-2.pt`.

No pip package or transformers class provides this model, so it is re-implemented here with the
exact parameter names and shapes of the official checkpoint (Salesforce ULIP, BSD-3; see
`shared/reference/ulip2_pointbert.md`), so that the official file loads with `strict=True`.
`ULIP2(ULIP2Config())` has exactly the 462 official tensors (171.9M values): the point tower
(`point_encoder.*`, `pc_projection`), the image tower (`visual.*`: timm's `vit_base_patch16_224`
with `num_classes=0`, re-implemented here with timm's names so timm is not needed at run time;
`image_projection`), the CLIP-style text tower (`token_embedding`, `positional_embedding`,
`transformer.resblocks.*`, `ln_final`, `text_projection`) and `logit_scale`.

Point tower forward (B, N, 3) -> (B, 512):
  1. grouping: G centres by farthest point sampling, each centre's K nearest points (squared
     Euclidean distance, computed exactly as a sum of squared differences), minus the centre.
     **Deviation from upstream, on purpose:** the torch FPS in ULIP's released code (and in the
     C-MCR / Ex-MCR copies of it) starts from a random point (`torch.randint`), so the same cloud
     gives a different embedding on every call. Here FPS always starts from point index 0 (as the
     CUDA `pointnet2_ops` kernel of the original Point-BERT code does) and FPS ties go to the lowest
     point index, so the same cloud always gives the same embedding. The groups then depend only on
     the coordinates and on which point comes first: any permutation of the points that keeps
     point 0 in place gives the same embedding.
  2. mini-PointNet token per group (`encoder.first_conv` / `second_conv`, BatchNorm in eval mode).
  3. `reduce_dim`, a `cls_token` in front; positions `pos_embed(centre)` and `cls_pos`.
  4. pre-norm blocks (`blocks.blocks.{i}`, qkv without bias), the position embedding added before
     every block: x = block(x + pos).
  5. `norm`; feature = concat(cls output, max over the group tokens) -> @ `pc_projection`.

Loading (`load_ulip2`): `torch.load(weights_only=True)` with exactly `argparse.Namespace` allowed
beyond torch's own safe types; the `module.` prefix is stripped; architecture sizes are read from
the tensor shapes (and, for what shapes cannot tell - head counts, group count and size - from
attributes of the saved `args` with this module's config field names, else the official values);
any missing, unexpected or mis-shaped tensor raises `ULIP2CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ULIP2",
    "PointBERT",
    "ULIP2CheckpointError",
    "ULIP2Config",
    "VisionTransformer",
    "check_state_dict",
    "farthest_point_sample",
    "group_points",
    "infer_config",
    "knn_indices",
    "load_ulip2",
    "read_ulip2_checkpoint",
]

# bounds on the temporaries of the kNN distance matrix and the token encoder (elements)
_KNN_CHUNK_ELEMS = 1 << 24
_ENCODER_CHUNK_ELEMS = 1 << 25


class ULIP2CheckpointError(ValueError):
    """A ULIP-2 checkpoint file that cannot be (safely) loaded into the architecture."""


@dataclasses.dataclass(frozen=True)
class ULIP2Config:
    """Sizes of the three towers; the defaults are the official ULIP-2 PointBERT checkpoint."""

    # point tower (PointBERT, `point_encoder.*`)
    num_group: int = 512  # G centres (FPS)
    group_size: int = 32  # K nearest points per centre
    enc_conv1: int = 128  # first_conv hidden channels
    enc_conv2: int = 256  # first_conv output per point (second_conv input is twice this)
    enc_conv3: int = 512  # second_conv hidden channels
    encoder_dims: int = 256  # token per group
    pos_hidden: int = 128  # pos_embed hidden width
    point_width: int = 384  # trans_dim
    point_depth: int = 12
    point_heads: int = 6
    point_mlp: int = 1536
    # image tower (timm vit_base_patch16_224, num_classes=0)
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    # text tower (CLIP)
    vocab_size: int = 49408
    context_length: int = 77
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    # joint space
    embed_dim: int = 512

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ULIP2Config.{f.name} must be a positive int, got {v!r}")
        for width, heads in (
            ("point_width", "point_heads"),
            ("vision_width", "vision_heads"),
            ("text_width", "text_heads"),
        ):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(
                    f"ULIP2Config.{width}={getattr(self, width)} is not divisible by {heads}={getattr(self, heads)}"
                )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ULIP2Config.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )

    @property
    def point_feature_dim(self) -> int:
        return 2 * self.point_width


# ----------------------------------------------------------------------------- grouping


def farthest_point_sample(xyz: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Indices (B, n_samples) of farthest point sampling, batched; O(N * n_samples) per cloud.

    Deterministic: the first sample is point index 0 (upstream picks a random start); each next
    sample is the point with the largest squared distance to the samples so far, ties to the lowest
    index (`argmax` returns the first maximum).
    """
    if xyz.dim() != 3 or xyz.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample: expected (B, N, 3) points, got {tuple(xyz.shape)}")
    B, N, _ = xyz.shape
    if not 1 <= n_samples <= N:
        raise ValueError(f"farthest_point_sample: cannot take {n_samples} samples from {N} points")
    coords = xyz.permute(2, 0, 1).contiguous()  # 3 B N: the per-step work runs over contiguous rows
    batch = torch.arange(B, device=xyz.device)
    nearest = torch.full((B, N), float("inf"), dtype=xyz.dtype, device=xyz.device)
    current = torch.zeros(B, dtype=torch.long, device=xyz.device)
    chosen = []
    for _ in range(n_samples):
        chosen.append(current)
        centre = coords[:, batch, current].unsqueeze(-1)  # 3 B 1
        torch.minimum(nearest, ((coords - centre) ** 2).sum(0), out=nearest)
        current = nearest.argmax(-1)
    return torch.stack(chosen, 1)


def knn_indices(xyz: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, G, k) of each centre's k nearest points of `xyz`, nearest first.

    Squared Euclidean distances as sums of squared coordinate differences (no |a|^2+|b|^2-2ab
    cancellation: the neighbourhoods do not depend on the batch they are computed in), selected by
    `torch.topk` (deterministic for a given input; exactly equidistant distinct points are rare, and
    duplicated points - as from repeat-padding - are interchangeable). Chunked so that the
    temporaries stay small.
    """
    B, N, _ = xyz.shape
    G = centres.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"knn_indices: cannot take {k} neighbours from {N} points")
    rows = max(1, _KNN_CHUNK_ELEMS // (3 * N))
    out = torch.empty(B, G, k, dtype=torch.long, device=xyz.device)
    for b in range(B):
        for s in range(0, G, rows):
            d = ((centres[b, s : s + rows, None, :] - xyz[b, None, :, :]) ** 2).sum(-1)
            out[b, s : s + rows] = torch.topk(d, k, dim=-1, largest=False, sorted=True).indices
    return out


def group_points(xyz: torch.Tensor, num_group: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbourhoods (B, G, K, 3) relative to their centre, centres (B, G, 3)) of a batch of clouds."""
    B = xyz.shape[0]
    centre_idx = farthest_point_sample(xyz, num_group)
    centres = torch.gather(xyz, 1, centre_idx.unsqueeze(-1).expand(-1, -1, 3))
    idx = knn_indices(xyz, centres, group_size)
    neighbourhood = torch.gather(xyz, 1, idx.reshape(B, -1, 1).expand(-1, -1, 3)).reshape(B, num_group, group_size, 3)
    return neighbourhood - centres.unsqueeze(2), centres


# ----------------------------------------------------------------------------- building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as CLIP's, for half precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection (PointBERT / timm layout)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp: int, qkv_bias: bool, eps: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------- point tower


class MiniPointNet(nn.Module):
    """PointBERT's token encoder, shared over groups: (B, G, K, 3) -> (B, G, encoder_dims)."""

    def __init__(self, c1: int, c2: int, c3: int, out: int):
        super().__init__()
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, c1, 1), nn.BatchNorm1d(c1), nn.ReLU(inplace=True), nn.Conv1d(c1, c2, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * c2, c3, 1), nn.BatchNorm1d(c3), nn.ReLU(inplace=True), nn.Conv1d(c3, out, 1)
        )

    def _tokens(self, groups: torch.Tensor) -> torch.Tensor:  # (M, 3, K) -> (M, out)
        f = self.first_conv(groups)
        f = torch.cat([f.amax(dim=2, keepdim=True).expand_as(f), f], dim=1)  # group summary first
        return self.second_conv(f).amax(dim=2)

    def forward(self, neighbourhoods: torch.Tensor) -> torch.Tensor:
        B, G, K, C = neighbourhoods.shape
        flat = neighbourhoods.reshape(B * G, K, C).transpose(1, 2)
        if self.training:  # batch statistics: all groups at once, as upstream
            return self._tokens(flat).reshape(B, G, -1)
        width = max(self.second_conv[0].in_channels, self.second_conv[0].out_channels)
        step = max(1, _ENCODER_CHUNK_ELEMS // (width * K))  # eval: per-group, so chunking is exact
        return torch.cat([self._tokens(flat[s : s + step]) for s in range(0, B * G, step)]).reshape(B, G, -1)


class TransformerEncoder(nn.Module):
    """`blocks.blocks.{i}`; the position embedding is added before every block."""

    def __init__(self, dim: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp, qkv_bias=False, eps=1e-5) for _ in range(depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos)
        return x


class PointBERT(nn.Module):
    """The point tower (`point_encoder.*`): (B, N, 3) xyz -> (B, 2 * point_width) feature."""

    def __init__(self, cfg: ULIP2Config):
        super().__init__()
        self.num_group = cfg.num_group
        self.group_size = cfg.group_size
        self.encoder = MiniPointNet(cfg.enc_conv1, cfg.enc_conv2, cfg.enc_conv3, cfg.encoder_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, cfg.point_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.point_width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, cfg.point_width))
        self.pos_embed = nn.Sequential(
            nn.Linear(3, cfg.pos_hidden), nn.GELU(), nn.Linear(cfg.pos_hidden, cfg.point_width)
        )
        self.blocks = TransformerEncoder(cfg.point_width, cfg.point_depth, cfg.point_heads, cfg.point_mlp)
        self.norm = LayerNorm(cfg.point_width)

    def forward(self, pts: torch.Tensor) -> torch.Tensor:
        if pts.dim() != 3 or pts.shape[-1] != 3:
            raise ValueError(f"point tower: expected (B, N, 3) xyz points, got {tuple(pts.shape)}")
        n = pts.shape[1]
        if n < max(self.num_group, self.group_size):
            raise ValueError(
                f"point tower: clouds of {n} points are too small for {self.num_group} groups of "
                f"{self.group_size} points; resample them (ULIP2Encoder's n_points) first"
            )
        # grouping always in float32: the same neighbourhoods whatever the model dtype
        neighbourhood, centres = group_points(pts.float(), self.num_group, self.group_size)
        dtype = self.cls_token.dtype
        tokens = self.reduce_dim(self.encoder(neighbourhood.to(dtype)))
        B = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(B, -1, -1), self.pos_embed(centres.to(dtype))], dim=1)
        x = self.norm(self.blocks(x, pos))
        return torch.cat([x[:, 0], x[:, 1:].amax(dim=1)], dim=-1)


# ----------------------------------------------------------------------------- image tower


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """timm's `vit_base_patch16_224` with `num_classes=0` (names and maths): the cls token's output."""

    def __init__(self, cfg: ULIP2Config):
        super().__init__()
        self.image_size = cfg.image_size
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.vision_width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.vision_width))
        self.blocks = nn.ModuleList(
            [
                Block(cfg.vision_width, cfg.vision_heads, cfg.vision_mlp, qkv_bias=True, eps=1e-6)
                for _ in range(cfg.vision_depth)
            ]
        )
        self.norm = LayerNorm(cfg.vision_width, eps=1e-6)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"image tower: expected (B, 3, {self.image_size}, {self.image_size}) images, got {tuple(images.shape)}"
            )
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


# ----------------------------------------------------------------------------- text tower


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, mlp)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(mlp, width))])
        )
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, mlp: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp) for _ in range(depth)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


# ----------------------------------------------------------------------------- the whole model


class ULIP2(nn.Module):
    """ULIP-2 PointBERT with the official state-dict layout; `encode_pc`, `encode_image`, `encode_text`."""

    def __init__(self, config: ULIP2Config | None = None):
        super().__init__()
        cfg = config or ULIP2Config()
        self.config = cfg
        self.point_encoder = PointBERT(cfg)
        self.pc_projection = nn.Parameter(torch.empty(cfg.point_feature_dim, cfg.embed_dim))
        self.visual = VisionTransformer(cfg)
        self.image_projection = nn.Parameter(torch.empty(cfg.vision_width, cfg.embed_dim))
        self.transformer = TextTransformer(cfg.text_width, cfg.text_depth, cfg.text_heads, cfg.text_mlp)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self._init_parameters()

    def _init_parameters(self) -> None:
        """Upstream's initialisation of the free parameters (a loaded checkpoint replaces them all)."""
        cfg = self.config
        nn.init.normal_(self.pc_projection, std=cfg.point_feature_dim**-0.5)
        nn.init.normal_(self.image_projection, std=cfg.vision_width**-0.5)
        nn.init.normal_(self.text_projection, std=cfg.text_width**-0.5)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.point_encoder.cls_pos, std=1.0)
        nn.init.normal_(self.visual.pos_embed, std=0.02)
        nn.init.normal_(self.visual.cls_token, std=1e-6)

    def encode_pc(self, pts: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) xyz -> (B, embed_dim), not normalised."""
        return self.point_encoder(pts) @ self.pc_projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim), not normalised."""
        return self.visual(images.to(self.image_projection.dtype)) @ self.image_projection

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, context_length) CLIP BPE ids -> (B, embed_dim) at the end-of-text token (the largest id)."""
        cfg = self.config
        if tokens.dim() != 2 or tokens.shape[1] != cfg.context_length:
            raise ValueError(f"text tower: expected (B, {cfg.context_length}) token ids, got {tuple(tokens.shape)}")
        tokens = tokens.long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(
                f"text tower: token ids must lie in [0, {cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        x = self.token_embedding(tokens) + self.positional_embedding
        L = cfg.context_length
        mask = torch.full((L, L), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)  # causal
        x = self.ln_final(self.transformer(x, mask))
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return eot @ self.text_projection


# ----------------------------------------------------------------------------- loading

_HEADS = {"point_width": "point_heads", "vision_width": "vision_heads", "text_width": "text_heads"}
# read from the checkpoint's `args` when present: what tensor shapes cannot tell
_FROM_ARGS = ("num_group", "group_size", "point_heads", "vision_heads", "text_heads")


def read_ulip2_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], argparse.Namespace | None]:
    """(state dict without the `module.` prefix, saved args or None) of a ULIP-2 checkpoint file.

    Accepts the official layout `{"state_dict": {...}, "args": Namespace, ...}` and a bare state
    dict. Unpickling is `weights_only=True` with `argparse.Namespace` as the only extra allowed
    global: any other class or function in the pickle is refused before anything runs.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ULIP-2 checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise ULIP2CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (weights-only unpickling stopped; nothing from it "
                f"was run): {_unpickling_reason(e)}"
            ) from e
        raise ULIP2CheckpointError(
            f"{path}: refused to unpickle: it holds objects other than tensors, plain containers and "
            f"argparse.Namespace (loaded with weights_only=True; nothing from it was run): {_unpickling_reason(e)}"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise ULIP2CheckpointError(f"{path}: not a readable PyTorch checkpoint: {e}") from e

    args = None
    if isinstance(obj, Mapping) and "state_dict" in obj:
        sd, args = obj["state_dict"], obj.get("args")
        if args is not None and not isinstance(args, argparse.Namespace):
            raise ULIP2CheckpointError(f"{path}: 'args' should be an argparse.Namespace, found {type(args).__name__}")
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj
    else:
        found = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else type(obj).__name__
        raise ULIP2CheckpointError(
            f"{path}: expected a dict with 'state_dict' (and 'args') or a bare state dict; found {found}"
        )
    if not isinstance(sd, Mapping):
        raise ULIP2CheckpointError(f"{path}: 'state_dict' should be a dict of tensors, found {type(sd).__name__}")
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ULIP2CheckpointError(f"{path}: state dict key {k!r} is a {type(k).__name__}, not a str")
        if not isinstance(v, torch.Tensor):
            raise ULIP2CheckpointError(f"{path}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        name = k.removeprefix("module.")
        if name in out:
            raise ULIP2CheckpointError(f"{path}: state dict has {name!r} both with and without the 'module.' prefix")
        out[name] = v
    return out, args


def _unpickling_reason(e: Exception) -> str:
    """The one informative line of torch's weights-only refusal (not its advice to switch it off)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\n|$)", text)
    if m:
        return m.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def _depth(sd: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else None


def infer_config(
    state_dict: Mapping[str, torch.Tensor], args: argparse.Namespace | None = None, **overrides: int
) -> ULIP2Config:
    """The `ULIP2Config` a state dict was saved from.

    Widths, depths, vocabulary, context length and image/patch size come from tensor shapes (a
    tensor that is absent leaves the official value, and the strict key check reports it). Head
    counts, group count and group size cannot be seen in shapes: they come from `overrides`, then
    from attributes of `args` with the same names, then from a head width of 64 (the official
    value for all three towers) and the official 512 groups of 32 points.
    """
    names = {f.name for f in dataclasses.fields(ULIP2Config)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise TypeError(f"unknown ULIP-2 config fields {bad}; known: {sorted(names)}")

    def shape(key: str) -> tuple[int, ...] | None:
        t = state_dict.get(key)
        return tuple(t.shape) if t is not None else None

    v: dict[str, int] = {}

    def take(field: str, key: str, axis: int) -> None:
        s = shape(key)
        if s and -len(s) <= axis < len(s):
            v[field] = int(s[axis])

    pe = "point_encoder."
    take("point_width", pe + "cls_token", -1)
    take("enc_conv1", pe + "encoder.first_conv.0.weight", 0)
    take("enc_conv2", pe + "encoder.first_conv.3.weight", 0)
    take("enc_conv3", pe + "encoder.second_conv.0.weight", 0)
    take("encoder_dims", pe + "encoder.second_conv.3.weight", 0)
    take("pos_hidden", pe + "pos_embed.0.weight", 0)
    take("point_mlp", pe + "blocks.blocks.0.mlp.fc1.weight", 0)
    take("embed_dim", "pc_projection", -1)
    take("vision_width", "visual.cls_token", -1)
    take("patch_size", "visual.patch_embed.proj.weight", -1)
    take("vision_mlp", "visual.blocks.0.mlp.fc1.weight", 0)
    take("vocab_size", "token_embedding.weight", 0)
    take("text_width", "token_embedding.weight", 1)
    take("context_length", "positional_embedding", 0)
    take("text_mlp", "transformer.resblocks.0.mlp.c_fc.weight", 0)
    for field, prefix in (
        ("point_depth", pe + "blocks.blocks."),
        ("vision_depth", "visual.blocks."),
        ("text_depth", "transformer.resblocks."),
    ):
        d = _depth(state_dict, prefix)
        if d is not None:
            v[field] = d
    s = shape("visual.pos_embed")
    if s is not None and len(s) == 3 and s[1] > 1:
        grid = math.isqrt(s[1] - 1)
        if grid * grid == s[1] - 1:
            v["image_size"] = grid * v.get("patch_size", ULIP2Config.patch_size)

    if args is not None:
        for field in _FROM_ARGS:
            val = getattr(args, field, None)
            if isinstance(val, int) and not isinstance(val, bool):
                v[field] = val
    v.update(overrides)
    default = ULIP2Config()
    for width, heads in _HEADS.items():
        if heads not in v:
            w = v.get(width, getattr(default, width))
            if w % 64:
                raise ULIP2CheckpointError(
                    f"cannot tell the head count of a {width}={w} tower from the checkpoint (not a multiple "
                    f"of the official head width 64): pass {heads}=... or save it in args.{heads}"
                )
            v[heads] = w // 64
    return ULIP2Config(**v)


def _fmt(shape: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_state_dict(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], path: str, limit: int = 5
) -> None:
    """Raise `ULIP2CheckpointError` listing missing, unexpected and mis-shaped tensors (first `limit` of each)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or mis):
        return
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} missing: " + ", ".join(f"{k} (expected {_fmt(expected[k])})" for k in missing[:limit])
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} unexpected: "
            + ", ".join(f"{k} (found {_fmt(found[k].shape)})" for k in unexpected[:limit])
        )
    if mis:
        parts.append(
            f"{len(mis)} with the wrong shape: "
            + ", ".join(f"{k} (expected {_fmt(expected[k])}, found {_fmt(found[k].shape)})" for k in mis[:limit])
        )
    raise ULIP2CheckpointError(
        f"{path}: does not match the ULIP-2 PointBERT architecture ({len(expected)} tensors): " + "; ".join(parts)
    )


def load_ulip2(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **overrides: int,
) -> ULIP2:
    """Build the architecture the checkpoint describes, load it strictly, eval mode, no grad."""
    path = os.fspath(path)
    sd, args = read_ulip2_checkpoint(path)
    try:
        cfg = infer_config(sd, args, **overrides)
    except ValueError as e:
        raise ULIP2CheckpointError(f"{path}: {e}") from e
    with torch.device("meta"):
        model = ULIP2(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, sd, path)
    model.load_state_dict(sd, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.checkpoint_path = path
    model.checkpoint_args = dict(vars(args)) if args is not None else {}
    return model
