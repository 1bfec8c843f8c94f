"""Tiny checkpoints written in the upstream formats (transformers CLIP, the official ULIP-2 PointBERT
file), shared by the encoder, unified-model and release tests."""

import argparse
import gzip
import json

import torch

from pairfree.encoders.pointbert import ULIP2, ULIP2Config


def write_clip_bpe(directory):
    """vocab.json + merges.txt of OpenAI's CLIP tokenizer, from open_clip's bundled BPE merges."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_tiny_hf_clip(d, projection_dim: int = 16):
    """A randomly initialised 2-layer CLIP (32x32 images) saved with transformers' save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_clip_bpe(d)
    tokenizer = CLIPTokenizer.from_pretrained(d)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    return d


TINY = ULIP2Config(
    num_group=16, group_size=8, enc_conv1=16, enc_conv2=24, enc_conv3=32, encoder_dims=20, pos_hidden=12,
    point_width=32, point_depth=2, point_heads=4, point_mlp=48,
    image_size=32, patch_size=8, vision_width=24, vision_depth=2, vision_heads=2, vision_mlp=48,
    vocab_size=60, context_length=12, text_width=16, text_depth=2, text_heads=2, text_mlp=32,
    embed_dim=10,
)  # fmt: skip
# what tensor shapes cannot tell travels in the checkpoint's args, as the official file's args would
TINY_ARGS = dict(num_group=16, group_size=8, point_heads=4, vision_heads=2, text_heads=2)


def random_state_dict(cfg: ULIP2Config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ULIP2(cfg).state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif any(
            k.endswith(s)
            for s in (
                "norm1.weight",
                "norm2.weight",
                "norm.weight",
                "ln_1.weight",
                "ln_2.weight",
                "ln_final.weight",
                "conv.1.weight",
            )
        ):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # weights ~ 1/sqrt(fan-in), vectors 0.2: activations stay O(1) through the towers
            sd[k] = torch.randn(v.shape, generator=g) * (0.2 if v.dim() < 2 else (v.numel() / v.shape[0]) ** -0.5)
    return sd


def save_official(path, sd, **args):
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "args": argparse.Namespace(**args)}, path)
    return path


def write_tiny_ulip2(path, embed_dim: int = 10, seed: int = 0):
    """A tiny ULIP-2 PointBERT in the official file layout (`state_dict` with `module.` keys + args)."""
    import dataclasses

    cfg = dataclasses.replace(TINY, embed_dim=embed_dim)
    sd = random_state_dict(cfg, seed)
    return save_official(path, sd, model="ULIP_PointBERT", npoints=256, lr=3e-3, betas=(0.9, 0.98), **TINY_ARGS), sd
