"""Generators and discriminators for the NesT GAN (paper Section 4.5, Table A4) and its baselines.

Generators map a latent ``z (B, latent_dim)`` to images ``(B, C, H, W)`` in ``[-1, 1]`` (``tanh``
output, the default; ``output_act="none"`` leaves them unbounded):

- :class:`NestGenerator` - the NesT decoder. ``z -> Linear ->`` the top level's block(s) (one block
  of ``block_size x block_size`` tokens for square output); every level runs ``depth`` transformer
  layers *local to each block* (blocks folded into the batch, a learned position embedding
  ``(1, T, N, C)`` per level); between levels *block de-aggregation* (:class:`BlockDeaggregation`)
  un-blocks to the image plane, upsamples x2 (pixel shuffle by default) with a channel change, and
  re-blocks into 4x as many blocks of the same size. The last level -> LayerNorm -> 1x1 conv
  (a per-pixel linear map) to ``out_chans`` -> tanh.
- :class:`TransGanGenerator` - the same network with **global** self-attention over all tokens at each
  resolution (TransGAN's vanilla generator: stages that double the resolution by pixel shuffle).
  Parameter counts are identical to the NesT generator of the same config (position embeddings are
  ``(1, 1, H*W, C)`` instead of ``(1, T, N, C)``), so the two differ only in the attention scope.
- :class:`ConvGenerator` - a DCGAN/SNGAN-like baseline: ``Linear -> s x s -> [nearest x2 -> conv3x3 ->
  BN -> ReLU] x n -> conv3x3 -> tanh``.

Discriminators return one logit per image, ``(B,)``:

- :class:`ResNetDiscriminator` - StyleGAN2-style residual blocks (two conv3x3 with leaky ReLU then
  average-pool downsampling, skip 1x1 conv, sum scaled by 1/sqrt(2)), optional minibatch-stddev,
  then conv3x3 -> flatten -> linear -> linear. (No equalised learning rate or modulated convs.)
- :class:`NestDiscriminator` - a small :class:`~nestvit.models.nest.Nest` classifier with one output.

Named presets (``GENERATORS``/``DISCRIMINATORS``, built by :func:`build_generator` /
:func:`build_discriminator`): ``nest_64`` is Table A4 (latent -> 1 block of 8x8 tokens at dim 1024;
4 levels, dims 1024/256/64/16, 4 heads, depths 5/3/3/2; 64 blocks of 8x8 at the end). ``nest_32``
is its first three levels (8x8 -> 16x16 -> 32x32, dims 1024/256/64, depths 5/3/3, i.e. TransGAN's
CIFAR stage layout with local attention). ``nest_28`` is a CPU-sized generator for 28x28 data (one
7x7 block -> 4 blocks -> 16 blocks). ``transgan_*`` and ``conv_*`` are the baselines at the same
output sizes with parameter counts close to ``nest_*`` (see ``docs/generation.md`` for the counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TransformerLayer, init_weights
from ..models.nest import Nest, NestConfig, blockify, deblockify
from ..registry import build_config, register_model

__all__ = [
    "DEAGGREGATIONS",
    "DISCRIMINATORS",
    "GENERATORS",
    "BlockDeaggregation",
    "ConvDiscriminatorConfig",
    "ConvGenerator",
    "ConvGeneratorConfig",
    "NestDiscriminator",
    "NestDiscriminatorConfig",
    "NestGenerator",
    "NestGeneratorConfig",
    "ResNetDiscriminator",
    "TransGanGenerator",
    "build_discriminator",
    "build_generator",
    "deaggregate_layout",
]

DEAGGREGATIONS = ("pixel_shuffle", "nearest")


def _tuple(value, n: int, name: str) -> tuple:
    value = (value,) * n if isinstance(value, (int, float)) else tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} has {len(value)} entries but num_levels={n}")
    return value


# --------------------------------------------------------------------------------------------------
# NesT generator
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NestGeneratorConfig:
    img_size: int = 64  # square output; must equal block_size * 2**(num_levels - 1)
    out_chans: int = 3
    latent_dim: int = 128
    block_size: int = 8  # block edge in tokens, the same at every level (the top level is one block)
    num_levels: int = 4
    embed_dims: int | tuple[int, ...] = (1024, 256, 64, 16)
    num_heads: int | tuple[int, ...] = 4
    depths: int | tuple[int, ...] = (5, 3, 3, 2)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    act: str = "gelu"
    norm_eps: float = 1e-6
    deaggregation: str = "pixel_shuffle"  # "pixel_shuffle" | "nearest" (Figure 7 middle)
    deagg_conv: bool = False  # a 3x3 conv after the upsampling
    # LayerNorm + Linear (channel change) before the upsampling; False: the paper's bare pixel shuffle, whose
    # x2 upsampling itself takes C to C/4 channels (Table A4's 1024 -> 256 -> 64 -> 16)
    deagg_proj: bool = True
    output_act: str = "tanh"  # "tanh" | "none"
    attention: str = "local"  # "local" (NesT blocks) | "global" (all tokens: TransGAN-like)
    # "linear": z -> Linear -> the top level's tokens (TransGAN's stem; the default here); "reshape": the paper's
    # Table A4, the noise itself reshaped to the top level's 1 x n x d tokens (latent_dim = n * d, no stem weights)
    noise_input: str = "linear"

    def __post_init__(self) -> None:
        for name in ("embed_dims", "num_heads", "depths"):
            object.__setattr__(self, name, _tuple(getattr(self, name), self.num_levels, name))
        if self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}")
        if self.img_size != self.block_size * 2 ** (self.num_levels - 1):
            raise ValueError(f"img_size {self.img_size} must equal block_size * 2**(num_levels-1) = "
                             f"{self.block_size} * {2 ** (self.num_levels - 1)}; e.g. 64 = 8 * 2**3, 28 = 7 * 2**2")
        for name, allowed in (("deaggregation", DEAGGREGATIONS), ("output_act", ("tanh", "none")),
                              ("attention", ("local", "global")), ("noise_input", ("linear", "reshape"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for d, h in zip(self.embed_dims, self.num_heads):
            if d % h:
                raise ValueError(f"embed dim {d} is not divisible by {h} heads")
        if not self.deagg_proj:
            if self.deaggregation != "pixel_shuffle" or any(a != 4 * b for a, b in zip(self.embed_dims,
                                                                                          self.embed_dims[1:])):
                raise ValueError("deagg_proj=False (the paper's bare pixel shuffle) needs deaggregation="
                                 f"'pixel_shuffle' and each level 4x narrower than the one before, got "
                                 f"{self.deaggregation!r} and embed_dims {self.embed_dims}")
        tokens = self.block_size ** 2 * self.embed_dims[0]
        if self.noise_input == "reshape" and self.latent_dim != tokens:
            raise ValueError(f"noise_input='reshape' reshapes the noise to the top level's {self.block_size ** 2} "
                             f"tokens of width {self.embed_dims[0]}: set latent_dim={tokens}")

    def side(self, level: int) -> int:
        """Tokens per image side at ``level``."""
        return self.block_size * 2 ** level

    def block(self, level: int) -> int:
        """Attention-block edge at ``level``: ``block_size`` (local) or the whole side (global)."""
        return self.block_size if self.attention == "local" else self.side(level)

    def grid(self, level: int) -> tuple[int, int]:
        g = self.side(level) // self.block(level)
        return (g, g)


class GeneratorLevel(nn.Module):
    """``depth`` transformer layers inside every block of a ``(B, T, N, C)`` tensor, plus ``pos_embed``."""

    def __init__(self, dim: int, *, depth: int, num_heads: int, grid: tuple[int, int], block: int,
                 mlp_ratio: float, qkv_bias: bool, act: str, norm_eps: float) -> None:
        super().__init__()
        self.grid, self.block = grid, block
        self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], block * block, dim))
        self.layers = nn.Sequential(*[
            TransformerLayer(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, act=act,
                             norm_eps=norm_eps) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x + self.pos_embed)


class BlockDeaggregation(nn.Module):
    """``(B, T, N, C) -> (B, 4T, N, C')``: the inverse of NesT's block aggregation.

    Un-block to the image plane (``deblockify``), LayerNorm, then (``proj=False``: the paper's bare pixel
    shuffle, no LayerNorm and no linear map, ``C -> C/4``)

    - ``pixel_shuffle``: linear (a 1x1 conv) ``C -> 4 C'`` and ``F.pixel_shuffle(2)``;
    - ``nearest``: linear ``C -> C'`` and nearest-neighbour upsampling x2;

    optionally a 3x3 conv ``C' -> C'``, and re-block into blocks of ``out_block`` tokens per side. With
    ``out_block == in_block`` (NesT) block ``t`` at grid position ``(r, c)`` becomes the four blocks
    ``(2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)`` of the next level: the quadrants of its region.
    """

    def __init__(self, dim: int, out_dim: int, *, kind: str = "pixel_shuffle", conv: bool = False,
                 in_grid: tuple[int, int], out_block: int, norm_eps: float = 1e-6, proj: bool = True) -> None:
        super().__init__()
        if kind not in DEAGGREGATIONS:
            raise ValueError(f"deaggregation {kind!r} is not one of {DEAGGREGATIONS}")
        self.kind, self.in_grid, self.out_block = kind, in_grid, out_block
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if proj else nn.Identity()
        self.proj = nn.Linear(dim, out_dim * (4 if kind == "pixel_shuffle" else 1)) if proj else nn.Identity()
        self.conv = nn.Conv2d(out_dim, out_dim, 3, padding=1) if conv else None

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C) -> (B, 2H, 2W, C')`` on the image plane."""
        x = self.proj(self.norm(x)).permute(0, 3, 1, 2)  # (B, C'', H, W)
        if self.kind == "pixel_shuffle":
            x = F.pixel_shuffle(x, 2)
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.conv is not None:
            x = self.conv(x)
        return x.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blockify(self.upsample(deblockify(x, self.in_grid)), self.out_block)


def deaggregate_layout(x: torch.Tensor, grid: tuple[int, int], block: int) -> torch.Tensor:
    """The pure layout part of de-aggregation (no weights): un-block, nearest x2, re-block.

    ``(B, T, N, C) -> (B, 4T, N, C)``; used by the tests to check that children sit in their parent's quadrants.
    """
    img = deblockify(x, grid).permute(0, 3, 1, 2)
    img = F.interpolate(img, scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
    return blockify(img, block)


class NestGenerator(nn.Module):
    """NesT generator (see the module docstring). ``forward(z) -> (B, out_chans, img_size, img_size)``."""

    family = "nest_generator"

    def __init__(self, cfg: NestGeneratorConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or NestGeneratorConfig(), overrides)
        self.cfg = cfg
        self.latent_dim, self.img_size, self.out_chans = cfg.latent_dim, cfg.img_size, cfg.out_chans
        s0 = cfg.side(0)
        self.stem = nn.Linear(cfg.latent_dim, s0 * s0 * cfg.embed_dims[0]) if cfg.noise_input == "linear" \
            else nn.Identity()
        self.levels = nn.ModuleList()
        self.deaggregations = nn.ModuleList()
        for i in range(cfg.num_levels):
            self.levels.append(GeneratorLevel(
                cfg.embed_dims[i], depth=cfg.depths[i], num_heads=cfg.num_heads[i], grid=cfg.grid(i),
                block=cfg.block(i), mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, act=cfg.act,
                norm_eps=cfg.norm_eps))
            if i + 1 < cfg.num_levels:
                self.deaggregations.append(BlockDeaggregation(
                    cfg.embed_dims[i], cfg.embed_dims[i + 1], kind=cfg.deaggregation, conv=cfg.deagg_conv,
                    in_grid=cfg.grid(i), out_block=cfg.block(i + 1), norm_eps=cfg.norm_eps, proj=cfg.deagg_proj))
        self.norm = nn.LayerNorm(cfg.embed_dims[-1], eps=cfg.norm_eps)
        self.to_pixels = nn.Conv2d(cfg.embed_dims[-1], cfg.out_chans, 1)
        init_weights(self)
        for level in self.levels:
            nn.init.trunc_normal_(level.pos_embed, std=0.02, a=-0.04, b=0.04)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_blocks(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Every level's output ``(B, T_l, N_l, C_l)`` (for inspection)."""
        cfg = self.cfg
        s0 = cfg.side(0)
        x = self.stem(z).reshape(z.shape[0], s0, s0, cfg.embed_dims[0])
        x = blockify(x, cfg.block(0))
        outs = []
        for i, level in enumerate(self.levels):
            x = level(x)
            outs.append(x)
            if i < len(self.deaggregations):
                x = self.deaggregations[i](x)
        return outs

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{type(self).__name__} expects latents (B, {self.latent_dim}), got {tuple(z.shape)}")
        x = self.forward_blocks(z)[-1]
        x = deblockify(x, self.cfg.grid(self.cfg.num_levels - 1))  # (B, H, W, C)
        x = self.to_pixels(self.norm(x).permute(0, 3, 1, 2))
        return torch.tanh(x) if self.cfg.output_act == "tanh" else x


class TransGanGenerator(NestGenerator):
    """TransGAN-like generator: :class:`NestGenerator` with global attention over all tokens per level."""

    family = "transgan_generator"

    def __init__(self, cfg: NestGeneratorConfig | None = None, **overrides) -> None:
        cfg = build_config(cfg or NestGeneratorConfig(), overrides)
        super().__init__(replace(cfg, attention="global"))


# --------------------------------------------------------------------------------------------------
# Conv generator (DCGAN / SNGAN-like)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvGeneratorConfig:
    img_size: int = 64  # base_size * 2**(len(channels) - 1)
    out_chans: int = 3
    latent_dim: int = 128
    base_size: int = 4
    channels: tuple[int, ...] = (1024, 512, 256, 128, 64)  # at base_size, then after each x2 upsampling
    convs_per_block: int = 1
    output_act: str = "tanh"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.img_size != self.base_size * 2 ** (len(self.channels) - 1):
            raise ValueError(f"img_size {self.img_size} must equal base_size * 2**(len(channels)-1) = "
                             f"{self.base_size} * {2 ** (len(self.channels) - 1)}")
        if self.output_act not in ("tanh", "none"):
            raise ValueError(f"output_act={self.output_act!r} is not one of ('tanh', 'none')")


class ConvGenerator(nn.Module):
    family = "conv_generator"

    def __init__(self, cfg: ConvGeneratorConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or ConvGeneratorConfig(), overrides)
        self.cfg = cfg
        self.latent_dim, self.img_size, self.out_chans = cfg.latent_dim, cfg.img_size, cfg.out_chans
        c0, s = cfg.channels[0], cfg.base_size
        self.stem = nn.Linear(cfg.latent_dim, c0 * s * s)
        self.stem_norm = nn.BatchNorm2d(c0)
        blocks = []
        for cin, cout in zip(cfg.channels[:-1], cfg.channels[1:]):
            layers: list[nn.Module] = [nn.Upsample(scale_factor=2, mode="nearest")]
            for k in range(cfg.convs_per_block):
                layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1, bias=False),
                           nn.BatchNorm2d(cout), nn.ReLU()]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.to_pixels = nn.Conv2d(cfg.channels[-1], cfg.out_chans, 3, padding=1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"{type(self).__name__} expects latents (B, {self.latent_dim}), got {tuple(z.shape)}")
        s = self.cfg.base_size
        x = self.stem(z).reshape(z.shape[0], -1, s, s)
        x = self.blocks(F.relu(self.stem_norm(x)))
        x = self.to_pixels(x)
        return torch.tanh(x) if self.cfg.output_act == "tanh" else x


# --------------------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvDiscriminatorConfig:
    img_size: int = 64
    in_chans: int = 3
    channels: tuple[int, ...] = (64, 128, 256, 512, 512)  # from-RGB width, then one per residual block (/2 each)
    mbstd_group: int = 4  # minibatch-stddev group size; 0 disables it
    mbstd_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if self.img_size % 2 ** (len(self.channels) - 1):
            raise ValueError(f"ResNetDiscriminator: img_size {self.img_size} cannot be halved "
                             f"{len(self.channels) - 1} times; use fewer channels entries")

    @property
    def final_size(self) -> int:
        return self.img_size // 2 ** (len(self.channels) - 1)


class ResidualDownBlock(nn.Module):
    """StyleGAN2's D block: conv3x3 -> lrelu -> conv3x3 -> lrelu -> avgpool2, plus a 1x1-conv skip, / sqrt(2)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, padding=1)
        self.conv2 = nn.Conv2d(cin, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.conv1(x), 0.2)
        y = F.avg_pool2d(F.leaky_relu(self.conv2(y), 0.2), 2)
        return (y + self.skip(F.avg_pool2d(x, 2))) * (1 / math.sqrt(2))


def minibatch_stddev(x: torch.Tensor, group: int, channels: int = 1) -> torch.Tensor:
    """StyleGAN's minibatch-stddev feature: append ``channels`` maps of the mean std over groups of images.

    The group is ``min(group, B)`` reduced until it divides ``B``.
    """
    B, C, H, W = x.shape
    g = min(group, B)
    while B % g:
        g -= 1
    y = x.reshape(g, -1, channels, C // channels, H, W)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # (B/g, F, C/F, H, W)
    y = y.mean(dim=(2, 3, 4)).reshape(-1, channels, 1, 1)  # (B/g, F, 1, 1)
    y = y.repeat(g, 1, H, W)
    return torch.cat([x, y], dim=1)


class ResNetDiscriminator(nn.Module):
    family = "resnet_discriminator"

    def __init__(self, cfg: ConvDiscriminatorConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or ConvDiscriminatorConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans = cfg.img_size, cfg.in_chans
        ch = cfg.channels
        self.from_rgb = nn.Conv2d(cfg.in_chans, ch[0], 1)
        self.blocks = nn.Sequential(*[ResidualDownBlock(a, b) for a, b in zip(ch[:-1], ch[1:])])
        extra = cfg.mbstd_channels if cfg.mbstd_group else 0
        self.conv = nn.Conv2d(ch[-1] + extra, ch[-1], 3, padding=1)
        self.fc = nn.Linear(ch[-1] * cfg.final_size ** 2, ch[-1])
        self.out = nn.Linear(ch[-1], 1)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.leaky_relu(self.from_rgb(x), 0.2))
        if self.cfg.mbstd_group:
            x = minibatch_stddev(x, self.cfg.mbstd_group, self.cfg.mbstd_channels)
        x = F.leaky_relu(self.conv(x), 0.2)
        x = F.leaky_relu(self.fc(x.flatten(1)), 0.2)
        return self.out(x).squeeze(1)


@dataclass(frozen=True)
class NestDiscriminatorConfig:
    img_size: int = 32
    in_chans: int = 3
    patch_size: int = 2
    num_levels: int = 3
    block_size: int | None = None
    embed_dims: int | tuple[int, ...] = (64, 128, 256)
    num_heads: int | tuple[int, ...] = 4
    depths: int | tuple[int, ...] = (1, 1, 2)


class NestDiscriminator(nn.Module):
    """A :class:`Nest` classifier with ``num_classes=1``; returns ``(B,)`` logits.

    Note: R1 needs a double backward through attention, which the fused CPU SDPA kernels lack;
    :func:`nestvit.generate.train.r1_penalty` runs the discriminator on the math SDPA path.
    """

    family = "nest_discriminator"

    def __init__(self, cfg: NestDiscriminatorConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = build_config(cfg or NestDiscriminatorConfig(), overrides)
        self.cfg = cfg
        self.img_size, self.in_chans = cfg.img_size, cfg.in_chans
        self.net = Nest(NestConfig(img_size=cfg.img_size, in_chans=cfg.in_chans, num_classes=1,
                                   patch_size=cfg.patch_size, num_levels=cfg.num_levels, block_size=cfg.block_size,
                                   embed_dims=cfg.embed_dims, num_heads=cfg.num_heads, depths=cfg.depths))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

_TABLE_A4 = dict(latent_dim=128, embed_dims=(1024, 256, 64, 16), num_heads=4, depths=(5, 3, 3, 2))
_CFG_64 = NestGeneratorConfig(img_size=64, block_size=8, num_levels=4, **_TABLE_A4)
_CFG_32 = NestGeneratorConfig(img_size=32, block_size=8, num_levels=3, latent_dim=128, embed_dims=(1024, 256, 64),
                              num_heads=4, depths=(5, 3, 3))
# CPU-sized, for 28x28 grey data: one 7x7 block -> 4 blocks (14x14) -> 16 blocks (28x28)
_CFG_28 = NestGeneratorConfig(img_size=28, out_chans=1, block_size=7, num_levels=3, latent_dim=64,
                              embed_dims=(96, 48, 24), num_heads=(3, 3, 2), depths=(2, 1, 1), mlp_ratio=2.0)
_CFG_TINY = NestGeneratorConfig(img_size=16, out_chans=3, block_size=4, num_levels=3, latent_dim=16,
                                embed_dims=(32, 16, 8), num_heads=2, depths=(1, 1, 1))

# conv baselines: channels chosen so parameter counts are close to the NesT generator of the same size
_CONV_64 = ConvGeneratorConfig(img_size=64, latent_dim=128, base_size=4, channels=(2048, 1536, 768, 384, 192),
                               convs_per_block=2)
_CONV_32 = ConvGeneratorConfig(img_size=32, latent_dim=128, base_size=4, channels=(2048, 1536, 768, 384),
                               convs_per_block=2)
_CONV_28 = ConvGeneratorConfig(img_size=28, out_chans=1, latent_dim=64, base_size=7, channels=(96, 48, 24),
                               convs_per_block=2)
_CONV_TINY = ConvGeneratorConfig(img_size=16, out_chans=3, latent_dim=16, base_size=4, channels=(32, 16, 8))

GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "nest_64": lambda **kw: NestGenerator(_CFG_64, **kw),
    "nest_32": lambda **kw: NestGenerator(_CFG_32, **kw),
    "nest_28": lambda **kw: NestGenerator(_CFG_28, **kw),
    "nest_tiny": lambda **kw: NestGenerator(_CFG_TINY, **kw),
    "transgan_64": lambda **kw: TransGanGenerator(_CFG_64, **kw),
    "transgan_32": lambda **kw: TransGanGenerator(_CFG_32, **kw),
    "transgan_28": lambda **kw: TransGanGenerator(_CFG_28, **kw),
    "transgan_tiny": lambda **kw: TransGanGenerator(_CFG_TINY, **kw),
    "conv_64": lambda **kw: ConvGenerator(_CONV_64, **kw),
    "conv_32": lambda **kw: ConvGenerator(_CONV_32, **kw),
    "conv_28": lambda **kw: ConvGenerator(_CONV_28, **kw),
    "conv_tiny": lambda **kw: ConvGenerator(_CONV_TINY, **kw),
}

DISCRIMINATORS: dict[str, Callable[..., nn.Module]] = {
    "resnet_64": lambda **kw: ResNetDiscriminator(ConvDiscriminatorConfig(img_size=64), **kw),
    "resnet_32": lambda **kw: ResNetDiscriminator(
        ConvDiscriminatorConfig(img_size=32, channels=(128, 256, 256, 256)), **kw),
    "resnet_28": lambda **kw: ResNetDiscriminator(
        ConvDiscriminatorConfig(img_size=28, in_chans=1, channels=(16, 32, 64)), **kw),
    "resnet_tiny": lambda **kw: ResNetDiscriminator(
        ConvDiscriminatorConfig(img_size=16, channels=(8, 16, 16)), **kw),
    "nest_64": lambda **kw: NestDiscriminator(NestDiscriminatorConfig(img_size=64, patch_size=4), **kw),
    "nest_32": lambda **kw: NestDiscriminator(NestDiscriminatorConfig(img_size=32), **kw),
    "nest_28": lambda **kw: NestDiscriminator(NestDiscriminatorConfig(
        img_size=28, in_chans=1, patch_size=2, num_levels=2, block_size=7, embed_dims=(64, 128), depths=(2, 2)), **kw),
    "nest_tiny": lambda **kw: NestDiscriminator(NestDiscriminatorConfig(
        img_size=16, patch_size=2, num_levels=2, embed_dims=(16, 16), num_heads=2, depths=(1, 1)), **kw),
}


for _name, _fn in GENERATORS.items():
    register_model("gan", kind="generator", name=f"generator_{_name}")(_fn)
for _name, _fn in DISCRIMINATORS.items():
    register_model("gan", kind="discriminator", name=f"discriminator_{_name}")(_fn)


def _build(table: dict[str, Callable[..., nn.Module]], what: str, name: str, overrides: dict) -> nn.Module:
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    from ..registry import create_model

    try:
        return create_model(f"{what}_{name}", **overrides)
    except TypeError as e:
        from ..registry import ModelOptionError

        raise ModelOptionError(f"{what} {name!r}: {e}") from None


def build_generator(name: str, **overrides) -> nn.Module:
    """The registry's ``generator_<name>`` (a preset of ``GENERATORS``) with config fields overridden
    (``build_generator("nest_28", depths=(1, 1, 1))``)."""
    return _build(GENERATORS, "generator", name, overrides)


def build_discriminator(name: str, **overrides) -> nn.Module:
    """The registry's ``discriminator_<name>`` (a preset of ``DISCRIMINATORS``) with config fields overridden."""
    return _build(DISCRIMINATORS, "discriminator", name, overrides)
