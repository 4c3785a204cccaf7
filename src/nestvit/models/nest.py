"""NesT: Nested Hierarchical Transformer.

Paper: Zhang et al., "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and
Interpretable Visual Understanding", AAAI 2022 (arXiv:2105.12723).
Official code (JAX/Flax): https://github.com/google-research/nested-transformer; the timm port
(``timm.models.nest``) holds the converted ImageNet weights, which ``nestvit.interop`` loads.

An image is embedded into patches, cut into non-overlapping blocks, and each level runs plain
transformer layers *inside* every block (blocks folded into the batch). Between levels, *block
aggregation* (conv3x3 -> LayerNorm -> max-pool 3x3/2 on the image plane) merges every 2x2 group of
blocks into one, so the top level is a single block (for square input). Head: LayerNorm -> global
average pool -> linear.

Deviations (all options; the defaults follow the official code):
- Heads are merged ``h * head_dim + d`` before ``proj`` (as every ViT); timm's port merges
  ``d * num_heads + h`` because its weights came from JAX. ``nestvit.interop`` permutes ``proj``'s input
  columns when loading timm weights, so outputs agree to float precision.
- ``attn="mqa"`` (one shared K/V head) is what the official CIFAR configs use; ``"mha"`` is timm's.
- ``act="gelu_tanh"`` is JAX's default GELU (official code); timm's port computes the exact GELU, so
  the 224 entries default to ``"gelu"`` to reproduce timm's published weights exactly.
- ``pool_pad="same"`` pads the max-pool 0 before / 1 after (TF SAME, official); ``"symmetric"`` pads 1/1.
- ``stem_dim > 0`` puts ``stem_depth`` x ``conv3x3 -> LayerNorm -> activation`` (``stem_dim`` channels,
  full resolution) before the patch embedding, an early convolution as in Xiao et al. 2021 ("Early
  Convolutions Help Transformers See Better"); not in NesT, off by default, used by the Fashion-MNIST
  results recipe. ``patch_overlap=True`` widens the patch embedding to kernel ``2p-1`` (stride ``p``,
  padding ``p-1``), PVTv2's overlapping patch embedding (Wang et al. 2022); not in NesT, off by default.
- ``patch_blur=True`` low-passes the patch embedding's input with a fixed binomial 3x3 filter ([1, 2, 1]^2 / 16,
  depthwise, zero padding) so that the stride-``p`` embedding subsamples a blurred map, Zhang 2019's
  anti-aliasing ("Making Convolutional Networks Shift-Invariant Again"); not in NesT, off by default.
- ``local_conv=True`` adds ``x + dwconv3x3(x)`` on the image plane before every transformer layer, CMT's
  local perception unit (Guo et al. 2022): locality inside the layers and a path across block borders
  within a level; not in NesT, off by default.
- ``aggregation`` and ``aggregation_plane`` implement the paper's Figure 5 / A1 ablations (see
  ``BlockAggregation``); rectangular images work wherever the block grid divides (the top level then
  has more than one block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ModelBase, TransformerLayer, check_divisible, drop_path_rates, init_weights, make_act, to_2tuple
from ..registry import build_config, register_model


@dataclass(frozen=True)
class NestConfig:
    img_size: int | tuple[int, int] = 224  # (H, W); every level's block grid must divide it
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4  # 1 for CIFAR, 4 for ImageNet (the paper's Figure 6 also tries 2)
    stem_dim: int = 0  # 0: the paper's linear patch embedding; > 0: a conv3x3 stem of this width before it
    stem_depth: int = 1  # conv3x3 -> LayerNorm -> act layers in that stem
    patch_overlap: bool = False  # patch embedding conv of kernel 2p-1 (padding p-1) instead of p: patches overlap
    patch_blur: bool = False  # fixed binomial 3x3 blur before the stride-p patch embedding (anti-aliasing)
    local_conv: bool = False  # x + depthwise conv3x3(x) on the image plane before every transformer layer (CMT)
    num_levels: int = 3  # hierarchies T_d; level l has 4**(num_levels-1-l) blocks for square input
    block_size: int | None = None  # block edge in patches; None: grid / 2**(num_levels-1) (top = 1 block)
    embed_dims: tuple[int, ...] = (128, 256, 512)
    num_heads: tuple[int, ...] = (4, 8, 16)
    depths: tuple[int, ...] = (2, 2, 20)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attn: str = "mha"  # "mha" | "mqa" (one shared K/V head)
    act: str = "gelu"  # "gelu" (exact) | "gelu_tanh" (JAX default)
    pool_pad: str = "same"  # "same" (0 before, 1 after) | "symmetric" (1 / 1)
    aggregation: str = "conv_maxpool"  # | conv_avgpool | conv_stride2 | subsample | patch_merge
    aggregation_plane: str = "image"  # "image" | "block" (aggregate inside each block)
    norm_eps: float = 1e-6
    drop_rate: float = 0.0  # dropout before the head
    proj_drop_rate: float = 0.0  # dropout in MLPs and after attention proj
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linear over all layers
    cpu_chunk_tokens: int = 8192  # CPU only: a level runs on groups of images of about this many tokens (0: off)

    def __post_init__(self) -> None:
        for name in ("embed_dims", "num_heads", "depths"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,) * self.num_levels
            object.__setattr__(self, name, tuple(value))
            if len(getattr(self, name)) != self.num_levels:
                raise ValueError(f"{name} has {len(value)} entries but num_levels={self.num_levels}")
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        choices = {"attn": ("mha", "mqa"), "pool_pad": ("same", "symmetric"),
                   "aggregation": AGGREGATIONS, "aggregation_plane": ("image", "block")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.stem_dim < 0:
            raise ValueError(f"stem_dim must be 0 (no stem) or a channel count, got {self.stem_dim}")
        if self.stem_depth < 1:
            raise ValueError(f"stem_depth must be at least 1 (stem_dim=0 turns the stem off), got {self.stem_depth}")
        if not 1 <= self.num_levels <= 6:
            raise ValueError(f"num_levels must be between 1 and 6, got {self.num_levels}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per axis at level 0."""
        return check_divisible("NesT patch embedding", self.img_size, self.patch_size)

    @property
    def block(self) -> int:
        if self.block_size is not None:
            return self.block_size
        scale = 2 ** (self.num_levels - 1)
        side = min(self.grid)
        if side % scale:
            raise ValueError(f"NesT: {side} patches per side cannot be halved {self.num_levels - 1} times; "
                             f"set block_size or change img_size / patch_size / num_levels")
        return side // scale

    def block_grid(self, level: int) -> tuple[int, int]:
        """Blocks per axis at ``level`` (each level halves the patch grid)."""
        unit = self.block * 2 ** level
        gh, gw = self.grid
        for size, axis in ((gh, "height"), (gw, "width")):
            if size % unit:
                raise ValueError(
                    f"NesT: level {level} needs the patch grid ({gh}x{gw} patches of {self.patch_size}px) to be a "
                    f"multiple of block_size*2**level = {unit} along the {axis}; choose img_size as a multiple "
                    f"of {unit * self.patch_size}")
        return gh // unit, gw // unit


AGGREGATIONS = ("conv_maxpool", "conv_avgpool", "conv_stride2", "subsample", "patch_merge")


# --------------------------------------------------------------------------------------------------
# Blocking: (B, H, W, C) image <-> (B, T, N, C) blocks, block index t = row * grid_w + col
# --------------------------------------------------------------------------------------------------

def blockify(x: torch.Tensor, block: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B, T, N, C)`` with ``T = (H/block)*(W/block)``, ``N = block**2``."""
    B, H, W, C = x.shape
    gh, gw = H // block, W // block
    x = x.reshape(B, gh, block, gw, block, C).transpose(2, 3)  # (B, gh, gw, block, block, C)
    return x.reshape(B, gh * gw, block * block, C)


def deblockify(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, T, N, C) -> (B, H, W, C)``: the inverse of ``blockify`` for a ``grid = (gh, gw)`` of blocks."""
    B, T, N, C = x.shape
    gh, gw = grid
    block = int(round(N ** 0.5))
    x = x.reshape(B, gh, gw, block, block, C).transpose(2, 3)  # (B, gh, block, gw, block, C)
    return x.reshape(B, gh * block, gw * block, C)


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over C of a ``(B, C, H, W)`` tensor (computed in NHWC, no copy for channels-last input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BinomialBlur(nn.Module):
    """Fixed depthwise ``[1, 2, 1]^2 / 16`` filter, ``(B, C, H, W) -> (B, C, H, W)`` (zero padding 1).

    The filter is a buffer, not a parameter, and is not saved: state dicts are those of the model without it.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).expand(channels, 1, 3, 3).clone(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, padding=1, groups=x.shape[1])


class BlockAggregation(nn.Module):
    """Merge 2x2 neighbourhoods, ``(B, C, H, W) -> (B, C', H/2, W/2)`` (the paper's Figure 5 variants).

    - ``conv_maxpool`` (default, official): conv3x3 -> LN -> max-pool 3x3 stride 2
    - ``conv_avgpool``: conv3x3 -> LN -> avg-pool 3x3 stride 2
    - ``conv_stride2``: conv3x3 stride 2 -> LN
    - ``subsample``: conv3x3 -> LN -> keep every second pixel (2x2 sub-sampling, no pooling)
    - ``patch_merge``: Swin-style: concatenate each 2x2 group (4C) -> LN -> linear to C'
    """

    def __init__(self, dim: int, out_dim: int, *, kind: str, pool_pad: str, norm_eps: float) -> None:
        super().__init__()
        self.kind, self.pool_pad = kind, pool_pad
        if kind == "patch_merge":
            self.norm = ChannelNorm(4 * dim, eps=norm_eps)
            self.conv = nn.Conv2d(4 * dim, out_dim, kernel_size=1, bias=False)
        else:
            self.conv = nn.Conv2d(dim, out_dim, kernel_size=3, stride=2 if kind == "conv_stride2" else 1, padding=1)
            self.norm = ChannelNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"block aggregation needs an even feature map, got {tuple(x.shape[-2:])}")
        if self.kind == "patch_merge":
            x = F.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
            return self.conv(self.norm(x))
        x = self.norm(self.conv(x))
        if self.kind == "conv_maxpool":
            if self.pool_pad == "same":
                return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
            return F.max_pool2d(x, 3, 2, padding=1)
        if self.kind == "conv_avgpool":
            if self.pool_pad == "same":
                return F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2)
            return F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)
        if self.kind == "subsample":
            return x[..., ::2, ::2]
        return x  # conv_stride2


class NestLevel(nn.Module):
    """Optional block aggregation, then ``depth`` transformer layers local to each block.

    On the CPU a level runs on groups of images (``cpu_chunk_tokens`` of its tokens per group).
    Why: at batch 64 on 32x32 input, level 0 holds 65536 tokens, so its MLP activations are 200 MB
    tensors. glibc serves every allocation above 32 MB with fresh ``mmap`` pages (about 50k page
    faults, ~60 ms, per tensor and per step) and such tensors stream through DRAM between operators;
    groups of ~8k tokens stay below that size (the heap reuses their memory) and largely inside the
    L3 cache. Attention never crosses a block, so grouping images changes nothing but the rounding
    of the matrix products: measured in ``docs/benchmarks.md`` (training 55% -> 86% MFU at batch 64).
    """

    def __init__(self, cfg: NestConfig, level: int, dpr: list[float]) -> None:
        super().__init__()
        dim = cfg.embed_dims[level]
        self.block = cfg.block
        self.grid = cfg.block_grid(level)  # (gh, gw) blocks
        self.plane = cfg.aggregation_plane
        self.chunk_tokens = cfg.cpu_chunk_tokens
        self.tokens_per_image = self.grid[0] * self.grid[1] * self.block ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], self.block ** 2, dim))
        self.pool = (BlockAggregation(cfg.embed_dims[level - 1], dim, kind=cfg.aggregation,
                                      pool_pad=cfg.pool_pad, norm_eps=cfg.norm_eps)
                     if level > 0 else nn.Identity())
        self.transformer_encoder = nn.Sequential(*[
            TransformerLayer(dim, num_heads=cfg.num_heads[level], mlp_ratio=cfg.mlp_ratio,
                             kv_heads=1 if cfg.attn == "mqa" else None, qkv_bias=cfg.qkv_bias, act=cfg.act,
                             norm_eps=cfg.norm_eps, drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                             drop_path=p)
            for p in dpr])
        self.local_convs = nn.ModuleList([nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in dpr]
                                         if cfg.local_conv else [])

    def aggregate(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H/2, W/2, C')`` on the image plane, or per block on the block plane."""
        if isinstance(self.pool, nn.Identity):
            return x
        if self.plane == "image":
            return self.pool(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # NHWC <-> channels-last NCHW views
        # block plane: each block of the previous level is aggregated on its own (its borders zero-padded)
        B, H, W, C = x.shape
        pb = self.block  # previous level's block edge == this level's block edge
        pgh, pgw = H // pb, W // pb
        xb = blockify(x, pb).reshape(B * pgh * pgw, pb, pb, C)  # (B*T', pb, pb, C)
        yb = self.pool(xb.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B*T', pb/2, pb/2, C')
        yb = yb.reshape(B, pgh * pgw, (pb // 2) ** 2, yb.shape[-1])
        return deblockify(yb, (pgh, pgw))  # (B, H/2, W/2, C')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_prev) -> (B, H', W', C)``, channels last throughout.

        On the CPU, groups of whole images at a time (see the class docstring); stochastic depth stays
        per image because groups only split the image axis.
        """
        images = max(1, self.chunk_tokens // self.tokens_per_image)  # images per group
        if x.device.type != "cpu" or self.chunk_tokens <= 0 or x.shape[0] <= images:
            return self._forward(x)
        return torch.cat([self._forward(group) for group in x.split(images)])  # (B, H', W', C)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.aggregate(x)
        x = blockify(x, self.block) + self.pos_embed  # (B, T, N, C)
        if not self.local_convs:
            return deblockify(self.transformer_encoder(x), self.grid)  # attention folds T into the batch
        for conv, layer in zip(self.local_convs, self.transformer_encoder):
            x = deblockify(x, self.grid)  # (B, H', W', C)
            x = x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # channels-last NCHW view of NHWC
            x = layer(blockify(x, self.block))
        return deblockify(x, self.grid)  # (B, H', W', C)


class Nest(ModelBase):
    """NesT classifier. ``forward_features`` returns the normalized final map ``(B, C, H, W)``."""

    family = "nest"

    def __init__(self, cfg: NestConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or NestConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans, self.num_classes = cfg.img_size, cfg.in_chans, cfg.num_classes
        self.num_features = cfg.embed_dims[-1]
        cfg.block_grid(cfg.num_levels - 1)  # validate the whole hierarchy up front

        self.patch_embed = nn.Module()
        self.patch_embed.stem = nn.Identity() if not cfg.stem_dim else nn.Sequential(*[
            layer for i in range(cfg.stem_depth)
            for layer in (nn.Conv2d(cfg.stem_dim if i else cfg.in_chans, cfg.stem_dim, 3, padding=1),
                          ChannelNorm(cfg.stem_dim, eps=cfg.norm_eps), make_act(cfg.act))])
        self.patch_embed.blur = BinomialBlur(cfg.stem_dim or cfg.in_chans) if cfg.patch_blur else nn.Identity()
        p = cfg.patch_size
        self.patch_embed.proj = nn.Conv2d(cfg.stem_dim or cfg.in_chans, cfg.embed_dims[0],
                                          2 * p - 1 if cfg.patch_overlap else p, stride=p,
                                          padding=p - 1 if cfg.patch_overlap else 0)
        dprs = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        self.levels = nn.ModuleList([NestLevel(cfg, i, dprs[i]) for i in range(cfg.num_levels)])
        self.norm = nn.LayerNorm(cfg.embed_dims[-1], eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=d, reduction=cfg.patch_size * 2 ** i, module=f"levels.{i}")
                             for i, d in enumerate(cfg.embed_dims)]
        init_weights(self)
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-0.04, b=0.04)

    def no_weight_decay(self) -> set[str]:
        """The official NesT excludes only the position embeddings."""
        return {f"levels.{i}.pos_embed" for i in range(len(self.levels))}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.patch_embed.stem(x.contiguous(memory_format=torch.channels_last))
        x = self.patch_embed.proj(self.patch_embed.blur(x))
        return x.permute(0, 2, 3, 1)  # (B, H/p, W/p, C): channels-last memory, so this view is contiguous

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(features (B, C, H, W), [level l output (B, C_l, H_l, W_l) for every level])``.

        Level maps are the raw outputs of each level (before the final norm), in image layout, so
        GradCAT and CAM can index blocks by pixel position.
        """
        x = self._embed(x)
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x.permute(0, 3, 1, 2))
        return self.norm(x).permute(0, 3, 1, 2), maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W) -> (B, C, H', W')`` normalized final map."""
        x = self._embed(x)
        for level in self.levels:
            x = level(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` by global average pooling (or ``(B, C)`` if ``pre_logits``)."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)


# --------------------------------------------------------------------------------------------------
# Registry: the official CIFAR and ImageNet configurations
# --------------------------------------------------------------------------------------------------

def _cifar(dim: int, heads: int, overrides: dict) -> Nest:
    cfg = NestConfig(img_size=32, num_classes=10, patch_size=1, num_levels=4, block_size=4, embed_dims=dim,
                     num_heads=heads, depths=3, attn="mqa", act="gelu_tanh", pool_pad="same")
    return Nest(cfg, **overrides)


@register_model("nest")
def nest_tiny_cifar(**overrides) -> Nest:
    """NesT-T for 32x32 (official CIFAR config): 4 levels x 3 layers, width 192, 3 heads, MQA."""
    return _cifar(192, 3, overrides)


@register_model("nest")
def nest_small_cifar(**overrides) -> Nest:
    """NesT-S for 32x32: width 384, 6 heads."""
    return _cifar(384, 6, overrides)


@register_model("nest")
def nest_base_cifar(**overrides) -> Nest:
    """NesT-B for 32x32: width 768, 12 heads."""
    return _cifar(768, 12, overrides)


def _imagenet(dims: tuple[int, ...], heads: tuple[int, ...], depths: tuple[int, ...], overrides: dict) -> Nest:
    cfg = NestConfig(img_size=224, num_classes=1000, patch_size=4, num_levels=3, block_size=14, embed_dims=dims,
                     num_heads=heads, depths=depths, attn="mha", act="gelu", pool_pad="same",
                     drop_path_rate=0.0)
    return Nest(cfg, **overrides)


@register_model("nest")
def nest_tiny_224(**overrides) -> Nest:
    """NesT-T for 224x224 ImageNet (loads timm's ``nest_tiny_jx`` weights)."""
    return _imagenet((96, 192, 384), (3, 6, 12), (2, 2, 8), overrides)


@register_model("nest")
def nest_small_224(**overrides) -> Nest:
    """NesT-S for 224x224 ImageNet (loads timm's ``nest_small_jx`` weights)."""
    return _imagenet((96, 192, 384), (3, 6, 12), (2, 2, 20), overrides)


@register_model("nest")
def nest_base_224(**overrides) -> Nest:
    """NesT-B for 224x224 ImageNet (loads timm's ``nest_base_jx`` weights)."""
    return _imagenet((128, 256, 512), (4, 8, 16), (2, 2, 20), overrides)
