"""TNT: Transformer in Transformer, as RTNT with two levels (sentences = patches, words = pixels).

Paper: Han et al., "Transformer in Transformer", NeurIPS 2021 (arXiv:2103.00112).
Official code: https://github.com/huawei-noah/Efficient-AI-Backbones (tnt_pytorch); timm port
``timm.models.tnt.TNT``, whose (non-legacy) layout this follows exactly: each 16x16 patch is unfolded
and a 7x7 convolution with stride ``first_stride`` inside it makes the words; the stem is
``LN -> Linear -> LN`` of the flattened words; every block adds ``LN(Linear_nobias(LN(words)))`` to the
patch tokens (not the class token); the head reads the class token.

The model itself is ``nestvit.models.rtnt.RTNT`` (``embed="conv"``, two levels); this file holds the
registry entries and the conversion of timm's TNT weights. Deviations: timm's separate ``qk`` and ``v``
projections are one fused ``qkv`` here (concatenated on load; identical maths). timm's ``legacy=True``
layout (conv over the whole image, block projection with bias and no second LN) is refused with a
clear message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..registry import register_model
from .rtnt import RTNT, RTNTConfig


def tnt_config(*, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
               num_classes: int = 1000, embed_dim: int = 768, inner_dim: int = 48, depth: int = 12,
               num_heads_inner: int = 4, num_heads_outer: int = 12, mlp_ratio: float = 4.0,
               qkv_bias: bool = False, first_stride: int = 4, **rest: Any) -> RTNTConfig:
    """An ``RTNTConfig`` from timm ``TNT`` constructor arguments (same names and defaults)."""
    if patch_size % first_stride:
        raise ValueError(f"first_stride {first_stride} must divide patch_size {patch_size}")
    return RTNTConfig(img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                      token_sizes=(patch_size, first_stride), dims=(embed_dim, inner_dim),
                      num_heads=(num_heads_outer, num_heads_inner), mlp_ratios=(mlp_ratio, 4.0), depth=depth,
                      embed="conv", qkv_bias=qkv_bias, act="gelu", norm_eps=1e-5, **rest)


class TNT(RTNT):
    """A two-level RTNT with TNT's convolutional word embedding; ``family = "tnt"``."""

    family = "tnt"


_TIMM_ONLY = {"drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate", "global_pool"}


def tnt_from_timm(kwargs: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> tuple[TNT, dict[str, torch.Tensor]]:
    """Build a ``TNT`` for timm ``TNT(**kwargs)`` and convert its state dict."""
    kw = dict(kwargs)
    if kw.pop("legacy", False):
        raise ValueError("timm's legacy TNT layout (legacy=True) is not supported; use the non-legacy weights")
    rest = {k: kw.pop(k) for k in list(kw) if k in _TIMM_ONLY}
    if kw.pop("norm_layer", None) is not None:
        raise ValueError("custom norm_layer cannot be translated; nestvit's TNT uses nn.LayerNorm")
    cfg = tnt_config(**kw)
    overrides = {"drop_rate": rest.get("drop_rate", 0.0), "proj_drop_rate": rest.get("proj_drop_rate", 0.0),
                 "attn_drop_rate": rest.get("attn_drop_rate", 0.0), "drop_path_rate": rest.get("drop_path_rate", 0.0)}
    if rest.get("global_pool", "token") == "avg":
        overrides["global_pool"] = "avg"
    model = TNT(cfg, **overrides)
    return model, tnt_state_from_timm(sd, model)


def tnt_state_from_timm(sd: Mapping[str, torch.Tensor], model: RTNT) -> dict[str, torch.Tensor]:
    """Rename timm TNT keys to nestvit's and fuse ``qk`` + ``v`` into ``qkv``."""
    out: dict[str, torch.Tensor] = {}
    top = {"cls_token": "cls_token", "patch_pos": "pos_embed.0", "pixel_embed.proj.weight": "pixel_embed.weight",
           "pixel_embed.proj.bias": "pixel_embed.bias", "norm1_proj.weight": "stems.0.norm1.weight",
           "norm1_proj.bias": "stems.0.norm1.bias", "proj.weight": "stems.0.proj.weight",
           "proj.bias": "stems.0.proj.bias", "norm2_proj.weight": "stems.0.norm2.weight",
           "norm2_proj.bias": "stems.0.norm2.bias", "norm.weight": "norm.weight", "norm.bias": "norm.bias",
           "head.weight": "head.weight", "head.bias": "head.bias"}
    block = {"norm_in": "layers.1.norm1", "attn_in.proj": "layers.1.attn.proj", "norm_mlp_in": "layers.1.norm2",
             "mlp_in.fc1": "layers.1.mlp.fc1", "mlp_in.fc2": "layers.1.mlp.fc2", "norm1_proj": "projs.0.norm1",
             "proj": "projs.0.proj", "norm2_proj": "projs.0.norm2", "norm_out": "layers.0.norm1",
             "attn_out.proj": "layers.0.attn.proj", "norm_mlp": "layers.0.norm2", "mlp.fc1": "layers.0.mlp.fc1",
             "mlp.fc2": "layers.0.mlp.fc2"}
    for k, v in sd.items():
        if k == "pixel_pos":  # (1, D, q, q) added to conv maps == (1, q*q, D) added to word tokens
            out["pos_embed.1"] = v.flatten(2).transpose(1, 2)
        elif k in top:
            out[top[k]] = v
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            name, _, leaf = rest.rpartition(".")
            if name in ("attn_in.qk", "attn_out.qk"):
                lvl = 1 if name == "attn_in.qk" else 0
                out[f"blocks.{i}.layers.{lvl}.attn.qkv.{leaf}"] = torch.cat([v, sd[k.replace(".qk.", ".v.")]])
            elif name in ("attn_in.v", "attn_out.v"):
                continue  # fused above
            elif name in block:
                out[f"blocks.{i}.{block[name]}.{leaf}"] = v
            else:
                out[k] = v  # unknown: reported by the strict loader
        else:
            out[k] = v
    return out


@register_model("tnt")
def tnt_s_patch16_224(**overrides) -> TNT:
    """TNT-S: 224x224, 16x16 patches, widths 384/24, heads 6/4, depth 12 (23.77M)."""
    return TNT(tnt_config(embed_dim=384, inner_dim=24, num_heads_outer=6, num_heads_inner=4), **overrides)


@register_model("tnt")
def tnt_b_patch16_224(**overrides) -> TNT:
    """TNT-B: 224x224, 16x16 patches, widths 640/40, heads 10/4, depth 12 (65.43M)."""
    return TNT(tnt_config(embed_dim=640, inner_dim=40, num_heads_outer=10, num_heads_inner=4), **overrides)


@register_model("tnt")
def tnt_tiny_patch4_32(**overrides) -> TNT:
    """TNT for 32x32 (CIFAR): 4x4 patches with one word per pixel, widths 192/12, heads 3/2, depth 12."""
    cfg = tnt_config(img_size=32, patch_size=4, first_stride=1, num_classes=10, embed_dim=192, inner_dim=12,
                     num_heads_outer=3, num_heads_inner=2)
    return TNT(cfg, **overrides)


@register_model("tnt")
def tnt_tiny_patch4_28(**overrides) -> TNT:
    """TNT for 28x28 grey digits (MNIST / Fashion-MNIST): 49 patches of 4x4, one word per pixel."""
    cfg = tnt_config(img_size=28, in_chans=1, patch_size=4, first_stride=1, num_classes=10, embed_dim=192,
                     inner_dim=12, num_heads_outer=3, num_heads_inner=2)
    return TNT(cfg, **overrides)
