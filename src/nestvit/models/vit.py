"""ViT / DeiT: the plain (non-nested) vision transformer baseline.

Papers: Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021 (arXiv:2010.11929); Touvron et al., "Training data-efficient image transformers &
distillation through attention", ICML 2021 (arXiv:2012.12877).
Official code: https://github.com/google-research/vision_transformer (JAX/Flax) and
https://github.com/facebookresearch/deit (PyTorch, on timm's ``VisionTransformer``). Parameter names
follow timm (``patch_embed.proj``, ``cls_token``, ``dist_token``, ``pos_embed``, ``blocks.i.*``, ``norm``,
``head``, ``head_dist``), so DeiT state dicts from timm load by name.

A conv with kernel = stride = patch size embeds the image into a ``gh x gw`` grid of tokens; a class
token (and for DeiT's distilled models a distillation token) is prepended, a learned position
embedding added, and ``depth`` pre-norm transformer layers run over all tokens. Head: LayerNorm ->
class token (or the mean of the patch tokens) -> linear. A distilled model has a second head on the
distillation token; it returns both logits while training (for DeiT's hard-distillation loss) and
their average in eval mode.

Deviations (all options; the defaults follow the official code):
- ``global_pool="avg"`` applies the final norm to every token and then averages the patch tokens, as
  the original JAX code's ``classifier="gap"``; timm instead averages first and normalizes after
  (``fc_norm``). Prefix tokens are excluded from the average in both.
- ``attn="mqa"`` (one shared K/V head) is offered for comparison with NesT's CIFAR models; ViT and
  DeiT use ``"mha"``.
- Class / distillation tokens and the position embedding are initialized with a truncated normal
  (std 0.02), except the class token (normal, std 1e-6, as timm); the JAX code zero-initializes tokens.
- Rectangular images work wherever the patch size divides both sides; the token grid ``(gh, gw)`` is
  carried explicitly, never recovered with a square root.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (
    Attention,
    ModelBase,
    TransformerLayer,
    attention_probs,
    check_divisible,
    checkpoint_call,
    drop_path_rates,
    init_weights,
    intermediate_plan,
    run_layers,
    split_qkv,
    to_2tuple,
    tokens_as,
)
from ..registry import build_config, register_model


@dataclass(frozen=True)
class ViTConfig:
    img_size: int | tuple[int, int] = 224  # (H, W); both must be multiples of patch_size
    in_chans: int = 3
    num_classes: int = 1000  # 0: no head (forward returns pooled features)
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attn: str = "mha"  # "mha" | "mqa" (one shared K/V head)
    act: str = "gelu"  # "gelu" (exact, as ViT/DeiT) | "gelu_tanh" | "relu" | "silu"
    norm_eps: float = 1e-6
    global_pool: str = "token"  # "token" (class token) | "avg" (mean of the patch tokens)
    class_token: bool = True
    distilled: bool = False  # DeiT: add a distillation token and a second head ``head_dist``
    drop_rate: float = 0.0  # dropout before the head(s)
    pos_drop_rate: float = 0.0  # dropout after adding the position embedding
    proj_drop_rate: float = 0.0  # dropout in MLPs and after attention proj
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over the layers

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        choices = {"attn": ("mha", "mqa"), "global_pool": ("token", "avg")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; "
                             "use global_pool='avg' without a class token")
        if self.distilled and not self.class_token:
            raise ValueError("distilled=True (DeiT) needs class_token=True")
        if self.depth < 1 or self.patch_size < 1:
            raise ValueError(f"depth and patch_size must be positive, got {self.depth} and {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per axis ``(gh, gw)``."""
        return check_divisible("ViT patch embedding", self.img_size, self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled)


def explicit_attention(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``layers.Attention`` computed step by step, for explanations (no dropout).

    ``x (..., N, C) -> (output (..., N, C), probabilities (..., H, N, N))``; leading dims (NesT's
    blocks) are kept. The output equals ``attn(x)`` in eval mode up to float rounding. Multi-query
    attention broadcasts its one K/V head.
    """
    *lead, N, C = x.shape
    q, k, v = split_qkv(attn.qkv(x.reshape(-1, N, C)), attn.num_heads, attn.kv_heads)  # k, v: 1 or H heads
    probs = attention_probs(q, k)  # (B, H, N, N)
    o = (probs @ v).transpose(1, 2).reshape(*lead, N, C)
    return attn.proj(o), probs.reshape(*lead, attn.num_heads, N, N)


class ViT(ModelBase):
    """ViT / DeiT classifier. ``forward_features`` returns the normalized tokens ``(B, prefix + N, C)``."""

    family = "vit"

    def __init__(self, cfg: ViTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or ViTConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans, self.num_classes = cfg.img_size, cfg.in_chans, cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.grid = cfg.grid  # (gh, gw), validated here
        self.num_prefix_tokens = cfg.num_prefix_tokens
        dim = cfg.embed_dim

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        num_tokens = self.num_prefix_tokens + self.grid[0] * self.grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        dpr = drop_path_rates(cfg.drop_path_rate, [cfg.depth])[0]
        self.blocks = nn.Sequential(*[
            TransformerLayer(dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
                             kv_heads=1 if cfg.attn == "mqa" else None, qkv_bias=cfg.qkv_bias, act=cfg.act,
                             norm_eps=cfg.norm_eps, drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                             drop_path=p)
            for p in dpr])
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.head_dist = (nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()) \
            if cfg.distilled else None
        self.feature_info = [dict(num_chs=dim, reduction=cfg.patch_size, module=f"blocks.{i}")
                             for i in range(cfg.depth)]
        init_weights(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02, a=-0.04, b=0.04)

    def no_weight_decay(self) -> set[str]:
        """Position embedding and the class / distillation tokens (those that exist)."""
        names = {n for n, _ in self.named_parameters()}
        return {n for n in ("pos_embed", "cls_token", "dist_token") if n in names}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if self.head_dist is not None:  # the distillation head too
            self.head_dist = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, prefix + gh*gw, C)`` tokens with position embedding, row-major patches."""
        self.check_input(x)
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)
        prefix = [t for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, prefix + gh*gw, C)`` normalized tokens (class token first)."""
        return self.norm(run_layers(self.blocks, self._embed(x), checkpoint=self.grad_checkpointing))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, stop_early: bool = False,
                              ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """``(features (B, prefix + N, C), [intermediates])``, or only the list with ``intermediates_only``.

        An intermediate is one block's output, its patch tokens without the class / distillation tokens
        (as timm's ViT), as a map ``(B, C, gh, gw)`` (stride ``patch_size``, ``feature_info[i]``). With every
        argument at its default: all blocks, raw (before the final norm), as views of the block outputs.

        - ``indices``: ``None`` all blocks; an int ``n`` the last ``n``; a list those (negative from the
          end). Returned in block order.
        - ``norm``: apply the final LayerNorm to every intermediate.
        - ``output_fmt``: ``"NCHW"``, or ``"NLC"``: the patch tokens ``(B, gh*gw, C)``, row-major.
        - ``stop_early`` (with ``intermediates_only``): skip the blocks after the last one asked for.
        """
        take, stop = intermediate_plan(len(self.blocks), indices, output_fmt,
                                       intermediates_only=intermediates_only, stop_early=stop_early)
        x = self._embed(x)
        maps = []
        for i, block in enumerate(self.blocks):
            x = checkpoint_call(block, x, enabled=self.grad_checkpointing)
            if i in take:
                y = self.norm(x) if norm else x
                maps.append(tokens_as(y[:, self.num_prefix_tokens:], self.grid, output_fmt))
            if i == stop:
                break
        if intermediates_only:
            return maps
        return self.norm(x), maps

    def forward_attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's softmax attention ``[(B, heads, T, T)]`` with ``T = prefix + gh*gw`` (token order
        as ``forward_features``), for attention rollout. Computed explicitly (slow, ``O(T^2)`` memory per
        layer); dropout and stochastic depth are not applied."""
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            o, probs = explicit_attention(block.attn, block.norm1(x))
            x = x + o
            x = x + block.mlp(block.norm2(x))
            maps.append(probs)
        return maps

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor,
                     pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(B, prefix + N, C) -> (B, num_classes)`` (or pooled ``(B, C)`` if ``pre_logits``).

        Distilled (DeiT): ``(cls_logits, dist_logits)`` while training, their average in eval mode;
        ``pre_logits`` then gives the average of the pooled and distillation-token features (as timm).
        """
        feat = self._pool(x)
        if self.head_dist is None:
            feat = self.head_drop(feat)
            return feat if pre_logits else self.head(feat)
        dist = x[:, 1]
        if pre_logits:
            return (feat + dist) / 2
        logits, logits_dist = self.head(self.head_drop(feat)), self.head_dist(self.head_drop(dist))
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


# --------------------------------------------------------------------------------------------------
# Registry: CIFAR-size baselines and DeiT's ImageNet configurations
# --------------------------------------------------------------------------------------------------

def _cifar(overrides: dict, **kwargs) -> ViT:
    cfg = ViTConfig(img_size=32, num_classes=10, **kwargs)
    return ViT(cfg, **overrides)


@register_model("vit")
def vit_tiny_patch4_32(**overrides) -> ViT:
    """ViT-Ti for 32x32: 8x8 patches of 4px (+ class token), width 192, 12 layers, 3 heads.

    5.36M params, 0.73 GFLOPs."""
    return _cifar(overrides, patch_size=4, embed_dim=192, depth=12, num_heads=3)


@register_model("vit")
def vit_small_patch4_32(**overrides) -> ViT:
    """ViT-S for 32x32: 8x8 patches of 4px, width 384, 12 layers, 6 heads (21.34M params, 2.84 GFLOPs)."""
    return _cifar(overrides, patch_size=4, embed_dim=384, depth=12, num_heads=6)


@register_model("vit")
def vit_nest_matched_32(**overrides) -> ViT:
    """ViT for 32x32 matched to ``nest_tiny_cifar`` in both parameters and forward FLOPs.

    16x16 patches of 2px (257 tokens with the class token), width 192, 14 layers, 3 heads:
    6.28M params and 3.89 GFLOPs (multiply-add = 2, ``nestvit.flops``) vs NesT-T's 6.01M and 4.15
    GFLOPs (+4.6% / -6.2%). Patch 4 (65 tokens) would need ~4x the parameters for the same FLOPs, patch 1
    ~4x the FLOPs for the same parameters; NesT reaches both because its 1024 level-0 tokens attend
    only inside 4x4 blocks.
    """
    return _cifar(overrides, patch_size=2, embed_dim=192, depth=14, num_heads=3)


def _deit(dim: int, heads: int, overrides: dict) -> ViT:
    cfg = ViTConfig(img_size=224, num_classes=1000, patch_size=16, embed_dim=dim, depth=12, num_heads=heads,
                    qkv_bias=True, act="gelu", norm_eps=1e-6)
    return ViT(cfg, **overrides)


@register_model("vit")
def deit_tiny_patch16_224(**overrides) -> ViT:
    """DeiT-Ti (224x224, 16px patches, width 192, 12 layers, 3 heads): 5.72M params.
    ``distilled=True`` adds DeiT's distillation token and head."""
    return _deit(192, 3, overrides)


@register_model("vit")
def deit_small_patch16_224(**overrides) -> ViT:
    """DeiT-S (width 384, 6 heads): 22.05M params."""
    return _deit(384, 6, overrides)


@register_model("vit")
def deit_base_patch16_224(**overrides) -> ViT:
    """DeiT-B / ViT-B/16 (width 768, 12 heads): 86.57M params."""
    return _deit(768, 12, overrides)

