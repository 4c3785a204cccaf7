"""RTNT: Recursive Transformer in Transformer, the N-level generalisation of TNT.

Papers: Han et al., "Transformer in Transformer", NeurIPS 2021 (arXiv:2103.00112), official code
https://github.com/huawei-noah/Efficient-AI-Backbones (tnt_pytorch) and its timm port; and the RTNT
extension, which nests one level deeper: an image splits into *sentences*, each sentence into
*words*, each word into *letters* (and so on).

Levels are numbered outermost first: level 0 holds the sentences (plus a class token), level
``L-1`` the smallest tokens. Every level has its own transformer (width, heads, MLP ratio) and its
own learnable 1-D position embedding. The innermost tokens are embedded from pixels; every other
level starts as ``LN -> Linear -> LN`` of its children's flattened tokens (TNT's stem). In each
block, from the innermost level outwards, a level runs one transformer layer on its tokens (all of
a level's groups folded into the batch) and is then projected into its parent,
``parent += LN(Linear_nobias(LN(flatten(children))))`` (not into the class token).

With two levels and ``embed="conv"`` this is exactly TNT (``nestvit.models.tnt`` registers those
configs and converts timm's weights); with one level it is a ViT with TNT's stem.

Deviations and options:
- ``embed="linear"`` (the RTNT paper: a linear projection of each innermost token's pixels) or
  ``"conv"`` (TNT's code: a 7x7 convolution with stride ``token_sizes[-1]`` inside each outermost
  patch, zero-padded at the patch border).
- ``level_blocks`` switches a level off in chosen blocks (its transformer layer and its projection
  into the parent are skipped there); ``innermost=False`` switches the innermost level off in every
  block, the paper's "inner-most level in none" ablation. A level that is off everywhere still forms
  its parent's initial tokens through the stem.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import (
    ModelBase,
    TransformerLayer,
    check_divisible,
    checkpoint_call,
    init_weights,
    intermediate_plan,
    to_2tuple,
    tokens_as,
)
from ..registry import build_config, register_model


@dataclass(frozen=True)
class RTNTConfig:
    img_size: int | tuple[int, int] = 32
    in_chans: int = 3
    num_classes: int = 10
    token_sizes: tuple[int, ...] = (4, 2, 1)  # pixel edge of one token per level, outermost first
    dims: tuple[int, ...] = (96, 24, 6)  # width per level
    num_heads: tuple[int, ...] = (3, 2, 1)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0)
    depth: int = 12
    embed: str = "linear"  # "linear" (RTNT paper) | "conv" (TNT code: 7x7 conv inside each outer patch)
    innermost: bool = True  # False: the innermost level runs in no block (the RTNT paper's ablation)
    level_blocks: tuple[tuple[bool, ...], ...] | None = None  # per level, per block on/off (None: all on)
    qkv_bias: bool = False  # TNT's default
    act: str = "gelu"
    norm_eps: float = 1e-5  # TNT uses nn.LayerNorm's default
    global_pool: str = "token"  # "token" | "avg"
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "img_size", to_2tuple(self.img_size))
        L = len(self.token_sizes)
        for name in ("dims", "num_heads", "mlp_ratios"):
            if len(getattr(self, name)) != L:
                raise ValueError(f"{name} needs one entry per level ({L} levels from token_sizes), "
                                 f"got {getattr(self, name)}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for outer, inner in zip(self.token_sizes, self.token_sizes[1:]):
            if outer % inner:
                raise ValueError(f"token_sizes {self.token_sizes}: {inner} does not divide {outer}")
        if self.embed not in ("linear", "conv"):
            raise ValueError(f"embed must be 'linear' or 'conv', got {self.embed!r}")
        if self.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.level_blocks is not None:
            lb = tuple(tuple(bool(b) for b in row) for row in self.level_blocks)
            if len(lb) != L or any(len(row) != self.depth for row in lb):
                raise ValueError(f"level_blocks must be {L} rows of {self.depth} booleans")
            object.__setattr__(self, "level_blocks", lb)
        check_divisible("RTNT", self.img_size, self.token_sizes[0])

    @property
    def num_levels(self) -> int:
        return len(self.token_sizes)

    @property
    def grid(self) -> tuple[int, int]:
        """Outermost tokens (sentences) per axis."""
        return self.img_size[0] // self.token_sizes[0], self.img_size[1] // self.token_sizes[0]

    @property
    def tokens_per_parent(self) -> tuple[int, ...]:
        """``n_l``: tokens per group at each level (level 0: all sentences of an image)."""
        gh, gw = self.grid
        return (gh * gw,) + tuple((o // i) ** 2 for o, i in zip(self.token_sizes, self.token_sizes[1:]))

    def active(self, level: int, block: int) -> bool:
        if self.level_blocks is not None:
            return self.level_blocks[level][block]
        return self.innermost or level < self.num_levels - 1 or self.num_levels == 1


class Projection(nn.Module):
    """``LN -> Linear -> LN`` from a group's flattened children ``(M, n*D_child)`` to ``(M, D)``."""

    def __init__(self, in_dim: int, out_dim: int, *, bias: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=eps)
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        self.norm2 = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.norm1(x)))


class RTNTBlock(nn.Module):
    """One block: each active level's transformer layer, innermost first, each projected into its parent."""

    def __init__(self, cfg: RTNTConfig, index: int, drop_path: float) -> None:
        super().__init__()
        L, n = cfg.num_levels, cfg.tokens_per_parent
        self.active = [cfg.active(level, index) for level in range(L)]
        self.layers = nn.ModuleList([
            TransformerLayer(cfg.dims[level], num_heads=cfg.num_heads[level], mlp_ratio=cfg.mlp_ratios[level],
                             qkv_bias=cfg.qkv_bias, act=cfg.act, norm_eps=cfg.norm_eps, drop=cfg.proj_drop_rate,
                             attn_drop=cfg.attn_drop_rate, drop_path=drop_path)
            if self.active[level] else nn.Identity() for level in range(L)])
        # projs[l-1] projects level l into level l-1
        self.projs = nn.ModuleList([
            Projection(n[level] * cfg.dims[level], cfg.dims[level - 1], bias=False, eps=cfg.norm_eps)
            if self.active[level] else nn.Identity() for level in range(1, L)])

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """``tokens[l]``: ``(B * n_0 * ... * n_{l-1}, n_l (+1 at level 0), D_l)``."""
        tokens = list(tokens)
        for level in reversed(range(len(tokens))):
            if not self.active[level]:
                continue
            x = self.layers[level](tokens[level])
            tokens[level] = x
            if level > 0:
                parent = tokens[level - 1]
                prefix = 1 if level == 1 else 0  # the class token gets no update
                M, n, _ = parent.shape
                up = self.projs[level - 1](x.reshape(M, n - prefix, -1))  # (M, n_{l-1}, D_{l-1})
                tokens[level - 1] = torch.cat([parent[:, :prefix], parent[:, prefix:] + up], dim=1) if prefix \
                    else parent + up
        return tokens


class RTNT(ModelBase):
    """RTNT classifier; ``forward_features`` returns the normalized level-0 tokens ``(B, 1 + N, D_0)``."""

    family = "rtnt"

    def __init__(self, cfg: RTNTConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or RTNTConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans, self.num_classes = cfg.img_size, cfg.in_chans, cfg.num_classes
        self.num_features = cfg.dims[0]
        L, n, s = cfg.num_levels, cfg.tokens_per_parent, cfg.token_sizes

        # pixels -> innermost tokens
        if cfg.embed == "conv":
            self.pixel_embed = nn.Conv2d(cfg.in_chans, cfg.dims[-1], 7, stride=s[-1], padding=3)
        else:
            self.pixel_embed = nn.Conv2d(cfg.in_chans, cfg.dims[-1], s[-1], stride=s[-1])  # = linear per token
        # stems[l] forms level l's initial tokens from level l+1's
        self.stems = nn.ModuleList([Projection(n[level + 1] * cfg.dims[level + 1], cfg.dims[level], bias=True,
                                               eps=cfg.norm_eps) for level in range(L - 1)])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dims[0]))
        self.pos_embed = nn.ParameterList([nn.Parameter(torch.zeros(1, n[level] + (level == 0), cfg.dims[level]))
                                           for level in range(L)])
        self.pos_drop = nn.Dropout(cfg.proj_drop_rate)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([RTNTBlock(cfg, i, dpr[i]) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dims[0], eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.dims[0], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [dict(num_chs=cfg.dims[0], reduction=s[0], module=f"blocks.{i}") for i in range(cfg.depth)]
        init_weights(self)
        for p in [self.cls_token, *self.pos_embed]:
            nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)

    def _pixels_to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B * n_0 * ... * n_{L-2}, n_{L-1}, D_{L-1})`` innermost tokens, nested row-major."""
        cfg, B = self.cfg, x.shape[0]
        s = cfg.token_sizes
        gh, gw = cfg.grid
        if cfg.embed == "conv":  # convolve inside each outermost patch, as TNT: patches folded into the batch
            p = s[0]
            x = x.reshape(B, cfg.in_chans, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
            x = self.pixel_embed(x.reshape(B * gh * gw, cfg.in_chans, p, p))  # (B*N0, D, p/s, p/s)
            q = p // s[-1]
            x = x.reshape(B, gh, gw, -1, q, q).permute(0, 1, 4, 2, 5, 3)  # (B, gh, q, gw, q, D)
            x = x.reshape(B, gh * q, gw * q, -1)
        else:
            x = self.pixel_embed(x).permute(0, 2, 3, 1)  # (B, H/s, W/s, D)
        # split each axis into (outer grid, r_1, ..., r_{L-1}) and interleave the h/w factors
        ratios = [o // i for o, i in zip(s, s[1:])]
        D, k = x.shape[-1], len(ratios)
        x = x.reshape(B, gh, *ratios, gw, *ratios, D)
        order = [0]
        for j in range(k + 1):
            order += [1 + j, 2 + k + j]
        x = x.permute(*order, x.ndim - 1)  # (B, gh, gw, r1, r1, ..., D)
        return x.reshape(-1, cfg.tokens_per_parent[-1], D)

    def _embed(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        n = self.cfg.tokens_per_parent
        t = self._pixels_to_tokens(x)  # innermost tokens (M, n_{L-1}, D_{L-1})
        inner: list[torch.Tensor] = []
        for level in reversed(range(self.cfg.num_levels - 1)):  # each stem builds the level above
            t = t + self.pos_embed[level + 1]
            inner.insert(0, t)
            t = self.stems[level](t.reshape(-1, n[level], n[level + 1] * t.shape[-1]))  # (M', n_l, D_l)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)  # (B, 1 + n_0, D_0)
        return [self.pos_drop(t + self.pos_embed[0])] + inner

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, 1 + N_0, D_0)`` normalized class + sentence tokens."""
        tokens = self._embed(x)
        for block in self.blocks:
            tokens = checkpoint_call(block, tokens, enabled=self.grad_checkpointing)
        return self.norm(tokens[0])

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, stop_early: bool = False,
                              ) -> tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        """``(features (B, 1 + N_0, D_0), [intermediates])``, or only the list with ``intermediates_only``.

        An intermediate is one block's output at the outermost level: its sentence (patch) tokens without the
        class token (as timm's TNT), as a map ``(B, D_0, gh, gw)`` (stride ``token_sizes[0]``,
        ``feature_info[i]``). The inner levels (words, letters) are not returned. With every argument at its
        default: all blocks, raw (before the final norm), as views of the block outputs.

        - ``indices``: ``None`` all blocks; an int ``n`` the last ``n``; a list those (negative from the
          end). Returned in block order.
        - ``norm``: apply the final LayerNorm to every intermediate.
        - ``output_fmt``: ``"NCHW"``, or ``"NLC"``: the sentence tokens ``(B, gh*gw, D_0)``, row-major.
        - ``stop_early`` (with ``intermediates_only``): skip the blocks after the last one asked for.
        """
        take, stop = intermediate_plan(len(self.blocks), indices, output_fmt,
                                       intermediates_only=intermediates_only, stop_early=stop_early)
        tokens, maps = self._embed(x), []
        for i, block in enumerate(self.blocks):
            tokens = checkpoint_call(block, tokens, enabled=self.grad_checkpointing)
            if i in take:
                t = self.norm(tokens[0]) if norm else tokens[0]
                maps.append(tokens_as(t[:, 1:], self.cfg.grid, output_fmt))
            if i == stop:
                break
        if intermediates_only:
            return maps
        return self.norm(tokens[0]), maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.cfg.global_pool == "token" else x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


# --------------------------------------------------------------------------------------------------
# Registry: the RTNT paper's Table 1 for 32x32 input.
# Pixel sizes chosen here: sentence 4x4 px, word 2x2 px (4 per sentence), letter 1 px (4 per word).
# They divide both 28 (MNIST: 49 sentences) and 32 (CIFAR: 64 sentences), and give 1.572M / 6.228M
# parameters at 32x32 with 10 classes (paper: 1.57M / 6.2M). (8, 4, 2) would also match the counts
# but cannot take 28x28 digits.
# --------------------------------------------------------------------------------------------------

@register_model("rtnt")
def rtnt_nano(**overrides) -> RTNT:
    """RTNT-nano: depth 12, sentence/word/letter widths 96/24/6, heads 3/2/1 (1.57M params in the paper)."""
    cfg = RTNTConfig(token_sizes=(4, 2, 1), dims=(96, 24, 6), num_heads=(3, 2, 1))
    return RTNT(cfg, **overrides)


@register_model("rtnt")
def rtnt_tiny(**overrides) -> RTNT:
    """RTNT-tiny: depth 12, widths 192/48/12, heads 3/4/2 (6.2M params in the paper)."""
    cfg = RTNTConfig(token_sizes=(4, 2, 1), dims=(192, 48, 12), num_heads=(3, 4, 2))
    return RTNT(cfg, **overrides)
