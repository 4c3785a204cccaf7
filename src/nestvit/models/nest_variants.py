"""NesT with options from other papers: the research variants of the best-model study (not NesT).

``models/nest.py`` stays the paper's model and its own ablations. The options here come from other papers;
each is off by default, so a variant with none of them set is NesT (same layers, same state-dict keys):

- ``stem_dim > 0``, ``stem_depth``: ``stem_depth`` x ``conv3x3 -> LayerNorm -> activation`` (``stem_dim``
  channels, full resolution) before the patch embedding, an early convolutional stem as in Xiao et al.
  2021, "Early Convolutions Help Transformers See Better" (NeurIPS 2021, arXiv:2106.14881). The
  Fashion-MNIST results recipe (``results_best_fashion_mnist``) uses ``stem_dim=32, stem_depth=2``.
- ``patch_overlap=True``: the patch embedding conv gets kernel ``2p-1`` (stride ``p``, padding ``p-1``), so
  neighbouring patches overlap: PVTv2's overlapping patch embedding, Wang et al. 2022, "PVT v2: Improved
  Baselines with Pyramid Vision Transformer" (Computational Visual Media, arXiv:2106.13797).
- ``patch_blur=True``: a fixed binomial 3x3 filter ([1, 2, 1]^2 / 16, depthwise, zero padding) low-passes the
  patch embedding's input, so the stride-``p`` embedding subsamples a blurred map: anti-aliasing from Zhang
  2019, "Making Convolutional Networks Shift-Invariant Again" (ICML 2019, arXiv:1904.11486). No weights.
- ``local_conv=True``: ``x + dwconv3x3(x)`` on the image plane before every transformer layer, CMT's local
  perception unit, Guo et al. 2022, "CMT: Convolutional Neural Networks Meet Vision Transformers" (CVPR
  2022, arXiv:2107.06263): locality inside the layers and a path across block borders within a level.

Registry: every NesT entry ``nest_<size>_<input>`` has a twin ``nestv_<size>_<input>`` (``variant_name``)
with the same configuration built as a :class:`NestVariant`, so the options above are overrides of it
(``nestv_tiny_cifar --set stem_dim=32``). State-dict keys are those the options had when they were fields
of ``NestConfig`` (``patch_embed.stem.*``, ``levels.i.local_convs.*``), so weights saved then load into the
twin; :func:`legacy_nest_kwargs` rewrites the ``model`` / ``kwargs`` such files record
(``nestvit.contract.RunContract.build`` calls it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import checkpoint_call, make_act
from ..registry import register_model
from .nest import CONFIGS, ChannelNorm, Nest, NestConfig, NestLevel, blockify, deblockify

VARIANT_OPTIONS = ("stem_dim", "stem_depth", "patch_overlap", "patch_blur", "local_conv")
# NestConfig fields of older nestvit versions that are no longer part of any model (dropped on load)
RETIRED_OPTIONS = ("cpu_chunk_tokens",)  # now a runtime setting: nestvit.models.nest.set_cpu_chunk_tokens


@dataclass(frozen=True)
class NestVariantConfig(NestConfig):
    stem_dim: int = 0  # 0: NesT's linear patch embedding; > 0: a conv3x3 stem of this width before it
    stem_depth: int = 1  # conv3x3 -> LayerNorm -> act layers in that stem
    patch_overlap: bool = False  # patch embedding conv of kernel 2p-1 (padding p-1) instead of p: patches overlap
    patch_blur: bool = False  # fixed binomial 3x3 blur before the stride-p patch embedding (anti-aliasing)
    local_conv: bool = False  # x + depthwise conv3x3(x) on the image plane before every transformer layer (CMT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stem_dim < 0:
            raise ValueError(f"stem_dim must be 0 (no stem) or a channel count, got {self.stem_dim}")
        if self.stem_depth < 1:
            raise ValueError(f"stem_depth must be at least 1 (stem_dim=0 turns the stem off), got {self.stem_depth}")

    @classmethod
    def of(cls, cfg: NestConfig, **options: Any) -> NestVariantConfig:
        """``cfg``'s NesT fields with the variant ``options`` (the rest off)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(NestConfig)}, **options)


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


class VariantPatchEmbed(nn.Module):
    """``stem -> blur -> proj``, ``(B, C, H, W) -> (B, H/p, W/p, C')`` channels last; NesT's ``PatchEmbed`` when
    every option is off (``stem`` and ``blur`` are then identities)."""

    def __init__(self, cfg: NestVariantConfig) -> None:
        super().__init__()
        self.stem = nn.Identity() if not cfg.stem_dim else nn.Sequential(*[
            layer for i in range(cfg.stem_depth)
            for layer in (nn.Conv2d(cfg.stem_dim if i else cfg.in_chans, cfg.stem_dim, 3, padding=1),
                          ChannelNorm(cfg.stem_dim, eps=cfg.norm_eps), make_act(cfg.act))])
        self.blur = BinomialBlur(cfg.stem_dim or cfg.in_chans) if cfg.patch_blur else nn.Identity()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.stem_dim or cfg.in_chans, cfg.embed_dims[0], 2 * p - 1 if cfg.patch_overlap else p,
                              stride=p, padding=p - 1 if cfg.patch_overlap else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        x = self.proj(self.blur(x))
        return x.permute(0, 2, 3, 1)  # (B, H/p, W/p, C): channels-last memory, so this view is contiguous


class VariantLevel(NestLevel):
    """A NesT level; with ``local_conv``, ``x + dwconv3x3(x)`` on the image plane before every layer (CMT)."""

    def __init__(self, cfg: NestVariantConfig, level: int, dpr: list[float]) -> None:
        super().__init__(cfg, level, dpr)
        dim = cfg.embed_dims[level]
        self.local_convs = nn.ModuleList([nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in dpr]
                                         if cfg.local_conv else [])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.local_convs:
            return super()._forward(x)
        x = blockify(self.aggregate(x), self.block) + self.pos_embed  # (B, T, N, C)
        for conv, layer in zip(self.local_convs, self.transformer_encoder):  # each step recomputed with checkpointing
            x = checkpoint_call(self._local_step, conv, layer, x, enabled=self.grad_checkpointing)
        return deblockify(x, self.grid)  # (B, H', W', C)

    def _local_step(self, conv: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, N, C) -> (B, T, N, C)``: the local convolution on the image plane, then one transformer layer."""
        x = deblockify(x, self.grid)  # (B, H', W', C)
        x = x + conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # channels-last NCHW view of NHWC
        return layer(blockify(x, self.block))


class NestVariant(Nest):
    """NesT with the options of :class:`NestVariantConfig` (see the module docstring for each option's paper)."""

    def __init__(self, cfg: NestConfig | None = None, **overrides) -> None:
        if not isinstance(cfg, NestVariantConfig):
            cfg = NestVariantConfig.of(cfg or NestConfig())
        super().__init__(cfg, **overrides)

    def make_patch_embed(self, cfg: NestVariantConfig) -> nn.Module:
        return VariantPatchEmbed(cfg)

    def make_level(self, cfg: NestVariantConfig, level: int, dpr: list[float]) -> NestLevel:
        return VariantLevel(cfg, level, dpr)


# --------------------------------------------------------------------------------------------------
# Registry: a ``nestv_*`` twin of every NesT entry, and the rewrite of older files' model arguments
# --------------------------------------------------------------------------------------------------

def variant_name(nest_name: str) -> str:
    """``nest_tiny_cifar -> nestv_tiny_cifar``: the registry entry of a NesT entry's variant twin."""
    return "nestv_" + nest_name.removeprefix("nest_")


def _twin(nest_name: str) -> Callable[..., NestVariant]:
    def entry(**overrides) -> NestVariant:
        return NestVariant(NestVariantConfig.of(CONFIGS[nest_name]), **overrides)

    entry.__name__ = entry.__qualname__ = variant_name(nest_name)
    entry.__doc__ = (f"``{nest_name}`` as a :class:`NestVariant`: the same configuration, plus the options "
                     f"{', '.join(VARIANT_OPTIONS)} (all off by default).")
    return entry


for _name in CONFIGS:
    register_model("nest")(_twin(_name))


def legacy_nest_kwargs(name: str, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(registry name, keyword arguments)`` that build what an older file's ``name`` / ``kwargs`` describe.

    Until the variant options moved out of ``NestConfig``, a file recorded e.g. ``nest_tiny_cifar`` with
    ``stem_dim=32`` and ``cpu_chunk_tokens``: retired keys are dropped, and a NesT entry whose arguments hold
    a variant option becomes its ``nestv_*`` twin (same state-dict keys). Anything else passes unchanged.
    """
    kwargs = dict(kwargs)
    if name not in CONFIGS and name not in {variant_name(n) for n in CONFIGS}:
        return name, kwargs
    for key in RETIRED_OPTIONS:
        kwargs.pop(key, None)
    if name in CONFIGS and any(key in kwargs for key in VARIANT_OPTIONS):
        name = variant_name(name)
    return name, kwargs
