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
- ``aggregation`` and ``aggregation_plane`` implement the paper's Figure 5 / A1 ablations (see
  ``BlockAggregation``); ``num_levels``, ``block_size`` and ``patch_size`` its hierarchy and patch-size
  studies (Figure 6); rectangular images work wherever the block grid divides (the top level then has
  more than one block).

``NestConfig`` holds NesT and the paper's own ablations only. Options from other papers (an early conv
stem, overlapping or blurred patch embeddings, local convolutions inside the levels) live in
``nest_variants.py`` (``NestVariant``, registry entries ``nestv_*``), which uses two hooks of ``Nest``:
``make_patch_embed`` and ``make_level``. On the CPU a level runs on groups of images for speed
(``set_cpu_chunk_tokens``, see ``NestLevel``): a runtime setting, not part of the model or its checkpoints.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import (
    ModelBase,
    TransformerLayer,
    check_divisible,
    drop_path_rates,
    init_weights,
    intermediate_plan,
    nhwc_as,
    run_layers,
    to_2tuple,
)
from ..registry import build_config, register_model


@dataclass(frozen=True)
class NestConfig:
    img_size: int | tuple[int, int] = 224  # (H, W); every level's block grid must divide it
    in_chans: int = 3
    num_classes: int = 1000
    patch_size: int = 4  # 1 for CIFAR, 4 for ImageNet (the paper's Figure 6 also tries 2)
    num_levels: int = 3  # hierarchies T_d; level l has 4**(num_levels-1-l) blocks for square input
    block_size: int | None = None  # block edge in patches; None: grid / 2**(num_levels-1) (top = 1 block)
    embed_dims: int | tuple[int, ...] = (128, 256, 512)
    num_heads: int | tuple[int, ...] = (4, 8, 16)
    depths: int | tuple[int, ...] = (2, 2, 20)
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


class PatchEmbed(nn.Module):
    """Linear patch embedding, ``(B, C, H, W) -> (B, H/p, W/p, C')`` channels last: a conv, kernel = stride = p."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        return x.permute(0, 2, 3, 1)  # channels-last memory, so this view is contiguous


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


# CPU only: a level runs on groups of whole images of about this many tokens (0: the whole batch at once).
# A runtime speed setting, not part of the model: change it with ``set_cpu_chunk_tokens``.
CPU_CHUNK_TOKENS = 8192


@contextmanager
def _restore_cpu_chunk_tokens(previous: int):
    try:
        yield
    finally:
        set_cpu_chunk_tokens(previous)


def set_cpu_chunk_tokens(tokens: int):
    """Set ``CPU_CHUNK_TOKENS`` (0: no grouping); as a context manager, restore the previous value on exit.

    ``set_cpu_chunk_tokens(0)`` changes it for the process; ``with set_cpu_chunk_tokens(256): ...`` for a block.
    """
    global CPU_CHUNK_TOKENS
    if int(tokens) < 0:
        raise ValueError(f"cpu chunk tokens must be 0 (off) or a positive token count, got {tokens}")
    previous, CPU_CHUNK_TOKENS = CPU_CHUNK_TOKENS, int(tokens)
    return _restore_cpu_chunk_tokens(previous)


class NestLevel(nn.Module):
    """Optional block aggregation, then ``depth`` transformer layers local to each block.

    On the CPU a level runs on groups of images (``CPU_CHUNK_TOKENS`` of its tokens per group).
    Why: at batch 64 on 32x32 input, level 0 holds 65536 tokens, so its MLP activations are 200 MB
    tensors. glibc serves every allocation above 32 MB with fresh ``mmap`` pages (about 50k page
    faults, ~60 ms, per tensor and per step) and such tensors stream through DRAM between operators;
    groups of ~8k tokens stay below that size (the heap reuses their memory) and largely inside the
    L3 cache. Attention never crosses a block, so grouping images changes nothing but the rounding
    of the matrix products: measured in ``docs/benchmarks.md`` (training 55% -> 86% MFU at batch 64).
    """

    grad_checkpointing = False  # set by Nest.set_grad_checkpointing: recompute each layer in backward

    def __init__(self, cfg: NestConfig, level: int, dpr: list[float]) -> None:
        super().__init__()
        dim = cfg.embed_dims[level]
        self.block = cfg.block
        self.grid = cfg.block_grid(level)  # (gh, gw) blocks
        self.plane = cfg.aggregation_plane
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
        chunk_tokens = CPU_CHUNK_TOKENS
        images = max(1, chunk_tokens // self.tokens_per_image)  # images per group
        if x.device.type != "cpu" or chunk_tokens <= 0 or x.shape[0] <= images:
            return self._forward(x)
        return torch.cat([self._forward(group) for group in x.split(images)])  # (B, H', W', C)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.aggregate(x)
        x = blockify(x, self.block) + self.pos_embed  # (B, T, N, C)
        x = run_layers(self.transformer_encoder, x, checkpoint=self.grad_checkpointing)  # T folded into the batch
        return deblockify(x, self.grid)


class Nest(ModelBase):
    """NesT classifier. ``forward_features`` returns the normalized final map ``(B, C, H, W)``."""

    family = "nest"
    # recorded in every state dict (``state_dict()._metadata``, kept by torch.save): nestvit's attn.proj column
    # order, which timm's NesT (version 1) does not share; nestvit.interop.load_weights reads it
    _version = 2

    def __init__(self, cfg: NestConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or NestConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans, self.num_classes = cfg.img_size, cfg.in_chans, cfg.num_classes
        self.num_features = cfg.embed_dims[-1]
        cfg.block_grid(cfg.num_levels - 1)  # validate the whole hierarchy up front

        self.patch_embed = self.make_patch_embed(cfg)
        dprs = drop_path_rates(cfg.drop_path_rate, cfg.depths)
        self.levels = nn.ModuleList([self.make_level(cfg, i, dprs[i]) for i in range(cfg.num_levels)])
        self.norm = nn.LayerNorm(cfg.embed_dims[-1], eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=d, reduction=cfg.patch_size * 2 ** i, module=f"levels.{i}")
                             for i, d in enumerate(cfg.embed_dims)]
        init_weights(self)
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-0.04, b=0.04)

    def make_patch_embed(self, cfg: NestConfig) -> nn.Module:
        """``(B, C_in, H, W) -> (B, H/p, W/p, C)`` channels last (a hook for ``NestVariant``)."""
        return PatchEmbed(cfg.in_chans, cfg.embed_dims[0], cfg.patch_size)

    def make_level(self, cfg: NestConfig, level: int, dpr: list[float]) -> NestLevel:
        """Level ``level`` with stochastic-depth rates ``dpr`` (a hook for ``NestVariant``)."""
        return NestLevel(cfg, level, dpr)

    def no_weight_decay(self) -> set[str]:
        """The official NesT excludes only the position embeddings."""
        return {f"levels.{i}.pos_embed" for i in range(len(self.levels))}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, H/p, W/p, C)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, stop_early: bool = False,
                              ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """``(features (B, C, H, W), [intermediates])``, or only the list with ``intermediates_only``.

        An intermediate is one level's output on the image plane, ``(B, C_l, H/r_l, W/r_l)`` with
        ``r_l = patch_size * 2**l`` (``feature_info[l]``): the raw output of ``levels.l`` (before the final
        norm), as timm's NesT. With every argument at its default, all levels as views of the level outputs,
        so GradCAT and CAM can index blocks by pixel position.

        - ``indices``: ``None`` all levels; an int ``n`` the last ``n``; a list those (negative from the
          end). Returned in level order.
        - ``norm``: the final LayerNorm is applied to the last level's map, the one it belongs to (as timm:
          with ``norm`` that map is the features); the other levels have no norm and are returned raw.
        - ``output_fmt``: ``"NCHW"``, or ``"NLC"``: the map's pixels as tokens ``(B, H_l*W_l, C_l)``, row-major.
        - ``stop_early`` (with ``intermediates_only``): skip the levels after the last one asked for.
        """
        take, stop = intermediate_plan(len(self.levels), indices, output_fmt,
                                       intermediates_only=intermediates_only, stop_early=stop_early)
        last = len(self.levels) - 1
        x = self._embed(x)
        maps = []
        for i, level in enumerate(self.levels):
            x = level(x)  # (B, H_l, W_l, C_l)
            if i in take:
                maps.append(nhwc_as(self.norm(x) if norm and i == last else x, output_fmt))
            if i == stop:
                break
        if intermediates_only:
            return maps
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

def _cifar(dim: int, heads: int) -> NestConfig:
    return NestConfig(img_size=32, num_classes=10, patch_size=1, num_levels=4, block_size=4, embed_dims=dim,
                      num_heads=heads, depths=3, attn="mqa", act="gelu_tanh", pool_pad="same")


def _imagenet(dims: tuple[int, ...], heads: tuple[int, ...], depths: tuple[int, ...]) -> NestConfig:
    return NestConfig(img_size=224, num_classes=1000, patch_size=4, num_levels=3, block_size=14, embed_dims=dims,
                      num_heads=heads, depths=depths, attn="mha", act="gelu", pool_pad="same", drop_path_rate=0.0)


# every entry's configuration by registry name (``nest_variants.py`` registers a ``nestv_*`` twin of each)
CONFIGS: dict[str, NestConfig] = {
    "nest_tiny_cifar": _cifar(192, 3),
    "nest_small_cifar": _cifar(384, 6),
    "nest_base_cifar": _cifar(768, 12),
    "nest_tiny_224": _imagenet((96, 192, 384), (3, 6, 12), (2, 2, 8)),
    "nest_small_224": _imagenet((96, 192, 384), (3, 6, 12), (2, 2, 20)),
    "nest_base_224": _imagenet((128, 256, 512), (4, 8, 16), (2, 2, 20)),
}


@register_model("nest")
def nest_tiny_cifar(**overrides) -> Nest:
    """NesT-T for 32x32 (official CIFAR config): 4 levels x 3 layers, width 192, 3 heads, MQA."""
    return Nest(CONFIGS["nest_tiny_cifar"], **overrides)


@register_model("nest")
def nest_small_cifar(**overrides) -> Nest:
    """NesT-S for 32x32: width 384, 6 heads."""
    return Nest(CONFIGS["nest_small_cifar"], **overrides)


@register_model("nest")
def nest_base_cifar(**overrides) -> Nest:
    """NesT-B for 32x32: width 768, 12 heads."""
    return Nest(CONFIGS["nest_base_cifar"], **overrides)


@register_model("nest")
def nest_tiny_224(**overrides) -> Nest:
    """NesT-T for 224x224 ImageNet (loads timm's ``nest_tiny_jx`` weights)."""
    return Nest(CONFIGS["nest_tiny_224"], **overrides)


@register_model("nest")
def nest_small_224(**overrides) -> Nest:
    """NesT-S for 224x224 ImageNet (loads timm's ``nest_small_jx`` weights)."""
    return Nest(CONFIGS["nest_small_224"], **overrides)


@register_model("nest")
def nest_base_224(**overrides) -> Nest:
    """NesT-B for 224x224 ImageNet (loads timm's ``nest_base_jx`` weights)."""
    return Nest(CONFIGS["nest_base_224"], **overrides)
