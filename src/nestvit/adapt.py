"""Weights of one shape into a model of another: the head, the image size and the input channels adapt.

Fine-tuning loads weights trained on other data; ``adapt_state_dict(model, state_dict)`` makes them fit
the new model instead of failing, and says what it did:

- **another number of classes**: the classifier head (``head.*``, DeiT's ``head_dist.*``) keeps the new
  model's fresh initialisation (``num_classes=0``: the head's weights are dropped);
- **another image size**: position embeddings are resampled (bicubic) on their image plane:
  NesT's per-level ``(1, blocks, tokens per block, C)`` embeddings as one map of the whole level, resampled
  and cut into the new block grid (so the number of blocks may change); ViT's and TNT/RTNT's outermost
  ``(1, prefix + grid tokens, C)`` embeddings as their patch grid, the class (and distillation) tokens kept;
- **another channel count**: the first convolution's weights (the only 4-D weight whose input channels
  are the model's ``in_chans``) are summed over channels for grey input, or repeated and scaled for more
  channels, so that a grey image given as equal RGB channels keeps its features (as timm's
  ``adapt_input_conv``).

Anything else that does not fit stays an error (``nestvit.interop.load_state_strict``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["adapt_state_dict"]

HEADS = ("head.", "head_dist.")


def adapt_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(state dict that fits model, what was changed)``; keys that already fit are untouched."""
    own = model.state_dict()
    out, notes = dict(sd), []
    for key, target in own.items():
        if key not in out or out[key].shape == target.shape:
            continue
        old = out[key]
        if key.startswith(HEADS):
            out[key] = target.clone()
            if key.endswith("weight"):
                notes.append(f"{key.split('.')[0]}: re-initialised for {target.shape[0]} classes (the weights had "
                             f"{old.shape[0]})")
        elif key.endswith("pos_embed") or ".pos_embed." in key or key.startswith("pos_embed."):
            out[key] = resample_pos_embed(model, key, old, target.shape)
            notes.append(f"{key}: resampled {tuple(old.shape)} -> {tuple(target.shape)} for the new image size")
        elif old.ndim == 4 and old.shape[0] == target.shape[0] and old.shape[2:] == target.shape[2:] \
                and target.shape[1] == getattr(model, "in_chans", -1):
            out[key] = adapt_input_conv(old, target.shape[1])
            notes.append(f"{key}: adapted from {old.shape[1]} to {target.shape[1]} input channels")
    dropped = sorted(k for k in out if k.startswith(HEADS) and k not in own)
    for key in dropped:  # a model without a classifier (num_classes=0): a backbone
        del out[key]
    if dropped:
        notes.append(f"{', '.join(dropped)}: dropped (the model has no classifier head)")
    return out, notes


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A conv weight ``(O, I, k, k)`` for ``in_chans`` inputs: summed to 1 channel, or tiled and scaled."""
    out_ch, old_in = weight.shape[:2]
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / old_in), 1, 1)[:, :in_chans] * (old_in / in_chans)
    return w.to(weight.dtype)


def _resample(plane: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, C, H, W)`` -> ``(1, C, *size)`` bicubic, in float32."""
    if tuple(plane.shape[-2:]) == tuple(size):
        return plane
    return F.interpolate(plane.float(), size=size, mode="bicubic", align_corners=False).to(plane.dtype)


def _square(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} positions are not a square grid; cannot resample them")
    return side, side


def resample_pos_embed(model: nn.Module, key: str, old: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Position embeddings ``old`` resampled to ``shape`` (see the module docstring)."""
    if old.ndim == 4:  # NesT (1, T, N, C): the level's whole image plane, re-blocked
        from .models.nest import blockify, deblockify

        _, t_new, n_new, c = shape
        plane = deblockify(old, _square(old.shape[1], key)).permute(0, 3, 1, 2)  # (1, C, H, W)
        gh, gw = _grid_of(model, key) or _square(t_new, key)
        b = math.isqrt(n_new)
        new = _resample(plane, (gh * b, gw * b)).permute(0, 2, 3, 1)  # (1, H', W', C)
        return blockify(new.contiguous(), b)
    if old.ndim == 3:  # (1, prefix + grid, C): ViT's patches, TNT/RTNT's outermost level
        prefix = _prefix_tokens(model, key)
        n_old, n_new = old.shape[1] - prefix, shape[1] - prefix
        gh, gw = _grid_of(model, key) or _square(n_new, key)
        oh, ow = _square(n_old, key)
        grid = old[:, prefix:].reshape(1, oh, ow, -1).permute(0, 3, 1, 2)
        new = _resample(grid, (gh, gw)).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([old[:, :prefix], new.to(old.dtype)], dim=1)
    raise ValueError(f"{key}: position embeddings of shape {tuple(old.shape)} are not resampled")


def _prefix_tokens(model: nn.Module, key: str) -> int:
    """Class / distillation tokens in front of the grid (ViT: 0-2; RTNT/TNT: 1 at level 0, none inside)."""
    if key == "pos_embed":  # ViT / DeiT
        return int(getattr(model, "num_prefix_tokens", 1))
    return 1 if key in ("pos_embed.0",) else 0


def _grid_of(model: nn.Module, key: str) -> tuple[int, int] | None:
    """The block grid (NesT) or patch grid of the new model at ``key``, where the model says it."""
    if key.startswith("levels.") and hasattr(model, "levels"):
        level = model.levels[int(key.split(".")[1])]
        return tuple(level.grid) if hasattr(level, "grid") else None
    grid = getattr(model, "grid", None) or getattr(getattr(model, "cfg", None), "grid", None)
    if key in ("pos_embed", "pos_embed.0") and grid is not None:
        return tuple(grid)
    return None
