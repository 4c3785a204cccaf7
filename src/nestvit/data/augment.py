"""Batched, device-side data augmentation (the NesT CIFAR recipe, timm semantics).

Every function works on whole batches ``(B, C, H, W)`` (``C`` = 1 or 3) on whatever device the
images live on; randomness is per image but vectorised over the batch (no Python loop over images).
All random draws come from the ``generator`` passed in (which must live on the images' device), so a
seeded generator gives bit-identical results.

Pieces (each usable alone):

* :func:`random_crop_with_padding`, :func:`random_hflip` -- geometric basics, any dtype.
* :class:`RandAugment` -- timm ``rand-m9-mstd0.5-inc1``: ops drawn per image, each applied with
  probability ``prob``, magnitude ~ N(m, std) clipped to ``[0, 10]``.  The single ops
  (:func:`equalize`, :func:`rotate`, ...) are public and work on float images in ``[0, 255]``.
* :func:`random_erasing` -- timm RandomErasing on normalised float images.
* :func:`mixup_cutmix` -- timm Mixup in ``'batch'`` mode with label smoothing.
* :class:`AugmentConfig` / :class:`BatchAugment` -- the composed training pipeline;
  :func:`eval_transform` for evaluation.

Image value conventions: ``uint8`` images hold 0..255; floating images given to the colour pipeline
(:class:`RandAugment`) hold ``[0, 1]``; the single RandAugment ops take float images in ``[0, 255]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "RAND_INCREASING_OPS",
    "AugmentConfig",
    "BatchAugment",
    "RandAugment",
    "RandAugmentRecord",
    "TTA_MODES",
    "adjust_brightness",
    "adjust_color",
    "adjust_contrast",
    "adjust_sharpness",
    "affine_transform",
    "auto_contrast",
    "equalize",
    "eval_transform",
    "invert",
    "mixup_cutmix",
    "normalize",
    "posterize",
    "rand_bbox",
    "random_crop_with_padding",
    "random_erasing",
    "random_hflip",
    "rotate",
    "rotation_matrix",
    "sample_beta",
    "shear_x",
    "shear_y",
    "shift",
    "smooth_one_hot",
    "soft_target_cross_entropy",
    "solarize",
    "solarize_add",
    "translate_x",
    "translate_y",
    "tta_views",
]

CIFAR10_MEAN: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, ...] = (0.2470, 0.2435, 0.2616)

FILL = 128.0  # timm's _FILL = (128, 128, 128)
_LEVEL_DENOM = 10.0  # timm: magnitude M maps to op strength M / 10

ScalarOrTensor = float | int | Tensor
Interpolation = Literal["nearest", "bilinear"]


# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(tuple(shape), generator=generator, device=device)


def _per_image(v: ScalarOrTensor, x: Tensor) -> Tensor:
    """Scalar or ``(N,)`` parameter -> ``(N, 1, 1, 1)`` float tensor on ``x``'s device."""
    t = torch.as_tensor(v, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, 1, 1, 1)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")


def _blend(degenerate: Tensor, x: Tensor, factor: ScalarOrTensor) -> Tensor:
    """PIL ``Image.blend(degenerate, x, factor)``, clipped to [0, 255]."""
    f = _per_image(factor, x)
    return (degenerate + f * (x - degenerate)).clamp_(0.0, 255.0)


def _grayscale(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma like PIL ``convert('L')``: ``(N, C, H, W) -> (N, 1, H, W)``."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


# --------------------------------------------------------------------------------------------------
# crop / flip
# --------------------------------------------------------------------------------------------------


def random_crop_with_padding(
    x: Tensor,
    *,
    padding: int = 2,
    padding_mode: Literal["constant", "reflect"] = "constant",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pad by ``padding`` pixels and crop back to ``H x W`` at an independent random offset per image.

    ``x``: ``(B, C, H, W)`` of any dtype -> same shape and dtype.  ``padding_mode='constant'`` pads
    with zeros.  Offsets are uniform in ``[0, 2 * padding]`` on each axis.
    """
    _check_images(x)
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding), mode=padding_mode)
    hp, wp = h + 2 * padding, w + 2 * padding
    offs = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)
    rows = offs[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offs[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    idx = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, idx).reshape(b, c, h, w)


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Move every image ``dy`` pixels down and ``dx`` right, zeros coming in at the edges.

    ``(B, C, H, W)`` -> same. One fixed offset of :func:`random_crop_with_padding` (constant mode): the
    views of shift test-time augmentation.
    """
    _check_images(x)
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    h, w = x.shape[-2:]
    return F.pad(x, (p, p, p, p))[..., p - dy:p - dy + h, p - dx:p - dx + w]


TTA_MODES = {  # test-time augmentation: mode -> the views of each image (see tta_views)
    "none": "the image alone",
    "flip": "the image and its mirror image",
    "shift": "the image moved by every offset of at most one pixel",
    "flip-shift": "the image and its mirror image, each moved by every offset of at most one pixel",
}


def tta_views(mode: str) -> list[tuple[bool, int, int]]:
    """``(mirrored, dy, dx)`` of each test-time view: ``none`` 1, ``flip`` 2, ``shift`` 9, ``flip-shift`` 18.

    ``shift`` moves the image by every offset of at most one pixel on each axis (the 3x3 neighbourhood,
    zeros coming in, as training's constant-padded crops do); ``flip-shift`` adds their mirror images.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r}; choose one of {', '.join(TTA_MODES)}")
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] if "shift" in mode else [(0, 0)]
    offsets.sort(key=lambda o: o != (0, 0))  # the plain view first
    return [(m, dy, dx) for m in ((False, True) if "flip" in mode else (False,)) for dy, dx in offsets]


def random_hflip(x: Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image left-right with probability ``p``.  ``(B, C, H, W)`` -> same."""
    _check_images(x)
    if p <= 0:
        return x
    flip = _rand((x.shape[0],), generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# --------------------------------------------------------------------------------------------------
# single RandAugment ops: float images in [0, 255], shape (N, C, H, W), per-image parameters
# given as a Python scalar or an (N,) tensor
# --------------------------------------------------------------------------------------------------


def invert(x: Tensor) -> Tensor:
    """PIL ``ImageOps.invert``: ``255 - x``."""
    return 255.0 - x


def posterize(x: Tensor, bits: ScalarOrTensor) -> Tensor:
    """PIL ``ImageOps.posterize``: keep the ``bits`` (0..8) most significant bits of each value."""
    q = torch.exp2(8.0 - _per_image(bits, x).clamp(0.0, 8.0))
    return torch.floor(x.clamp(0.0, 255.0).floor() / q) * q


def solarize(x: Tensor, threshold: ScalarOrTensor) -> Tensor:
    """PIL ``ImageOps.solarize``: values ``>= threshold`` become ``255 - x``."""
    return torch.where(x >= _per_image(threshold, x), 255.0 - x, x)


def solarize_add(x: Tensor, add: ScalarOrTensor, threshold: ScalarOrTensor = 128) -> Tensor:
    """timm ``solarize_add``: values ``< threshold`` get ``+add`` (clipped at 255)."""
    return torch.where(x < _per_image(threshold, x), (x + _per_image(add, x)).clamp(max=255.0), x)


def adjust_brightness(x: Tensor, factor: ScalarOrTensor) -> Tensor:
    """PIL ``ImageEnhance.Brightness``: blend with black."""
    return _blend(torch.zeros_like(x), x, factor)


def adjust_color(x: Tensor, factor: ScalarOrTensor) -> Tensor:
    """PIL ``ImageEnhance.Color`` (saturation): blend with the grayscale image.  No-op for C=1."""
    if x.shape[1] == 1:
        return x
    return _blend(_grayscale(x).expand_as(x), x, factor)


def adjust_contrast(x: Tensor, factor: ScalarOrTensor) -> Tensor:
    """PIL ``ImageEnhance.Contrast``: blend with a constant image of the rounded mean gray level."""
    mean = torch.floor(_grayscale(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def adjust_sharpness(x: Tensor, factor: ScalarOrTensor) -> Tensor:
    """PIL ``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (border pixels kept)."""
    if x.shape[2] < 3 or x.shape[3] < 3:
        return x
    # SMOOTH kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 = (9 * mean3x3 + 4 * centre) / 13
    smooth = (9.0 * F.avg_pool2d(x, 3, stride=1) + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


def auto_contrast(x: Tensor) -> Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch each channel of each image to 0..255."""
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    ok = hi > lo
    scale = 255.0 / torch.where(ok, hi - lo, torch.ones_like(hi))
    return torch.where(ok, ((x - lo) * scale).clamp(0.0, 255.0), x)


def equalize(x: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize``: per-channel histogram equalisation (vectorised over the batch).

    As Pillow: ``step = (n_pixels - count(max value)) // 255``; channels with ``step == 0`` are left
    unchanged; ``lut[i] = (step // 2 + #pixels below i) // step`` clipped at 255.
    """
    n, c, h, w = x.shape
    xi = x.floor().clamp(0, 255).long().reshape(n * c, h * w)
    offsets = torch.arange(n * c, device=x.device).unsqueeze(1) * 256
    hist = torch.bincount((xi + offsets).reshape(-1), minlength=n * c * 256).reshape(n * c, 256)
    last = hist.gather(1, xi.amax(dim=1, keepdim=True))  # count of the highest non-empty bin
    step = torch.div(h * w - last, 255, rounding_mode="floor")  # (N*C, 1)
    below = hist.cumsum(1) - hist
    lut = torch.div(step // 2 + below, step.clamp(min=1), rounding_mode="floor").clamp(max=255)
    out = torch.where(step > 0, lut.gather(1, xi), xi)
    return out.reshape(n, c, h, w).to(x.dtype)


def affine_transform(
    x: Tensor,
    matrix: Tensor,
    *,
    fill: float = FILL,
    interpolation: Interpolation = "nearest",
) -> Tensor:
    """Batched PIL ``Image.transform(AFFINE)``: one ``grid_sample`` for the whole batch.

    ``matrix``: ``(N, 2, 3)`` in PIL's convention -- it maps *output* pixel coordinates ``(x, y)``
    (origin at the top-left corner, pixel centres at ``+0.5``) to *input* coordinates.  Pixels that
    map outside the input get ``fill``.  ``x``: ``(N, C, H, W)`` float -> same.
    """
    n, c, h, w = x.shape
    dt = torch.float32
    m = matrix.to(device=x.device, dtype=dt)
    # normalised coords u = S x - 1, S = diag(2/W, 2/H) (align_corners=False):
    # u_in = S M S^-1 u_out + (S M S^-1 1 + S t - 1)
    s = torch.tensor([2.0 / w, 2.0 / h], device=x.device, dtype=dt)
    lin = m[:, :, :2] * s[:, None] / s[None, :]
    shift = lin.sum(dim=2) + m[:, :, 2] * s - 1.0
    theta = torch.cat([lin, shift[:, :, None]], dim=2)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(x.float() - fill, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    return (out + fill).to(x.dtype)


def _affine_params(x: Tensor, v: ScalarOrTensor) -> Tensor:
    return torch.as_tensor(v, dtype=torch.float32, device=x.device).expand(x.shape[0])


def _matrix(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    return torch.stack([a, b, c, d, e, f], dim=1).reshape(-1, 2, 3)


def rotation_matrix(degrees: Tensor, h: int, w: int) -> Tensor:
    """PIL ``Image.rotate(degrees)`` (counter-clockwise about the centre) as ``(N, 2, 3)`` matrices."""
    t = torch.deg2rad(degrees.float())
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2.0, h / 2.0
    return _matrix(cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)


def rotate(
    x: Tensor, degrees: ScalarOrTensor, *, fill: float = FILL, interpolation: Interpolation = "nearest"
) -> Tensor:
    """PIL ``Image.rotate``: counter-clockwise by ``degrees`` about the image centre."""
    m = rotation_matrix(_affine_params(x, degrees), x.shape[2], x.shape[3])
    return affine_transform(x, m, fill=fill, interpolation=interpolation)


def _shear_translate_matrix(kind: str, v: Tensor) -> Tensor:
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if kind == "shear_x":
        return _matrix(one, v, zero, zero, one, zero)
    if kind == "shear_y":
        return _matrix(one, zero, zero, v, one, zero)
    if kind == "translate_x":
        return _matrix(one, zero, v, zero, one, zero)
    return _matrix(one, zero, zero, zero, one, v)


def shear_x(
    x: Tensor, factor: ScalarOrTensor, *, fill: float = FILL, interpolation: Interpolation = "nearest"
) -> Tensor:
    """timm ``shear_x``: input x = out x + factor * out y (about the top-left corner)."""
    m = _shear_translate_matrix("shear_x", _affine_params(x, factor))
    return affine_transform(x, m, fill=fill, interpolation=interpolation)


def shear_y(
    x: Tensor, factor: ScalarOrTensor, *, fill: float = FILL, interpolation: Interpolation = "nearest"
) -> Tensor:
    """timm ``shear_y``: input y = out y + factor * out x."""
    m = _shear_translate_matrix("shear_y", _affine_params(x, factor))
    return affine_transform(x, m, fill=fill, interpolation=interpolation)


def translate_x(
    x: Tensor, pixels: ScalarOrTensor, *, fill: float = FILL, interpolation: Interpolation = "nearest"
) -> Tensor:
    """timm ``translate_x_abs``: output pixel ``(x, y)`` = input ``(x + pixels, y)`` (content moves left)."""
    m = _shear_translate_matrix("translate_x", _affine_params(x, pixels))
    return affine_transform(x, m, fill=fill, interpolation=interpolation)


def translate_y(
    x: Tensor, pixels: ScalarOrTensor, *, fill: float = FILL, interpolation: Interpolation = "nearest"
) -> Tensor:
    """timm ``translate_y_abs``: output pixel ``(x, y)`` = input ``(x, y + pixels)`` (content moves up)."""
    m = _shear_translate_matrix("translate_y", _affine_params(x, pixels))
    return affine_transform(x, m, fill=fill, interpolation=interpolation)


# --------------------------------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------------------------------

RAND_INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
"""timm's ``_RAND_INCREASING_TRANSFORMS`` (the ``inc1`` op list), in timm's order."""

_GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _enhance_increasing_factor(mag: Tensor, sign: Tensor) -> Tensor:
    # timm _enhance_increasing_level_to_arg: max(0.1, 1 + (+-) level / 10 * 0.9)
    return (1.0 + sign * mag / _LEVEL_DENOM * 0.9).clamp(min=0.1)


# colour ops: (x [0,255], magnitude (N,), sign (N,)) -> x
_COLOR_OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "AutoContrast": lambda x, m, s: auto_contrast(x),
    "Equalize": lambda x, m, s: equalize(x),
    "Invert": lambda x, m, s: invert(x),
    # 4 - int(level / 10 * 4) bits
    "PosterizeIncreasing": lambda x, m, s: posterize(x, 4.0 - torch.floor(m / _LEVEL_DENOM * 4.0)),
    # 256 - min(256, int(level / 10 * 256))
    "SolarizeIncreasing": lambda x, m, s: solarize(
        x, 256.0 - torch.floor(m / _LEVEL_DENOM * 256.0).clamp(max=256)
    ),
    # min(128, int(level / 10 * 110)), threshold 128
    "SolarizeAdd": lambda x, m, s: solarize_add(x, torch.floor(m / _LEVEL_DENOM * 110.0).clamp(max=128), 128),
    "ColorIncreasing": lambda x, m, s: adjust_color(x, _enhance_increasing_factor(m, s)),
    "ContrastIncreasing": lambda x, m, s: adjust_contrast(x, _enhance_increasing_factor(m, s)),
    "BrightnessIncreasing": lambda x, m, s: adjust_brightness(x, _enhance_increasing_factor(m, s)),
    "SharpnessIncreasing": lambda x, m, s: adjust_sharpness(x, _enhance_increasing_factor(m, s)),
}


class RandAugmentRecord(NamedTuple):
    """What :class:`RandAugment` drew, each ``(B, num_ops)``: op index into ``RandAugment.ops``,
    whether the op was applied, its clipped magnitude, and its sign (+1/-1, used by signed ops)."""

    op_idx: Tensor
    applied: Tensor
    magnitude: Tensor
    sign: Tensor


class RandAugment:
    """timm ``rand-m{magnitude}-mstd{magnitude_std}-inc1`` RandAugment on whole batches.

    For each image independently: ``num_ops`` ops are drawn uniformly (with replacement) from
    ``ops``; each is applied with probability ``prob`` at magnitude ~ N(magnitude, magnitude_std)
    clipped to ``[0, magnitude_max]`` (``magnitude_std=inf`` draws uniform in ``[0, magnitude]``);
    signed ops (rotate, shear, translate, enhance) get a random sign.  Ops run in sequence; within
    one sequence step every image has one op, so all geometric ops of a step share one
    ``affine_grid``/``grid_sample`` call (nearest, fill 128 like timm's ``_FILL``).

    ``strategy``: ``'index'`` runs each op on the sub-batch that uses it (cheapest on CPU, needs a
    host sync per op on GPU); ``'where'`` runs every op on the full batch and blends with
    ``torch.where`` (no host syncs; best on GPU); ``'auto'`` = ``'where'`` on CUDA else ``'index'``.
    Both give identical results.

    Against Pillow (what timm runs) the geometric and LUT ops (equalize, posterize, solarize,
    invert) are exact; blend-type ops and autocontrast differ by at most one level (Pillow
    truncates, we round).
    """

    def __init__(
        self,
        *,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        prob: float = 0.5,
        magnitude_max: float = _LEVEL_DENOM,
        ops: Sequence[str] = RAND_INCREASING_OPS,
        translate_pct: float = 0.45,
        fill: float = FILL,
        interpolation: Interpolation = "nearest",
        strategy: Literal["auto", "index", "where"] = "auto",
    ) -> None:
        unknown = [o for o in ops if o not in _COLOR_OPS and o not in _GEOMETRIC_OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {RAND_INCREASING_OPS}")
        if not ops:
            raise ValueError("RandAugment needs at least one op")
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.prob = prob
        self.magnitude_max = magnitude_max
        self.ops = tuple(ops)
        self.translate_pct = translate_pct
        self.fill = fill
        self.interpolation = interpolation
        self.strategy = strategy

    def __repr__(self) -> str:
        return (
            f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"magnitude_std={self.magnitude_std}, prob={self.prob}, n_ops={len(self.ops)})"
        )

    def draw(
        self, batch: int, *, generator: torch.Generator | None, device: torch.device
    ) -> RandAugmentRecord:
        """Draw the per-image op choices, application flags, magnitudes and signs."""
        shape = (batch, self.num_ops)
        op_idx = torch.randint(0, len(self.ops), shape, generator=generator, device=device)
        applied = _rand(shape, generator, device) < self.prob
        noise = torch.randn(shape, generator=generator, device=device)
        if math.isinf(self.magnitude_std):
            mag = _rand(shape, generator, device) * self.magnitude
        elif self.magnitude_std > 0:
            mag = self.magnitude + self.magnitude_std * noise
        else:
            mag = torch.full(shape, float(self.magnitude), device=device)
        mag = mag.clamp(0.0, self.magnitude_max)
        sign = torch.where(_rand(shape, generator, device) < 0.5, -1.0, 1.0)
        return RandAugmentRecord(op_idx, applied, mag, sign)

    def geometric_matrix(self, op_idx: Tensor, mag: Tensor, sign: Tensor, h: int, w: int) -> Tensor:
        """``(N, 2, 3)`` PIL-convention matrices for images whose op is geometric (identity otherwise)."""
        v = mag / _LEVEL_DENOM * sign
        out = torch.eye(2, 3, device=mag.device).repeat(mag.shape[0], 1, 1)
        for name in _GEOMETRIC_OPS:
            if name not in self.ops:
                continue
            sel = (op_idx == self.ops.index(name))[:, None, None]
            if name == "Rotate":
                m = rotation_matrix(v * 30.0, h, w)
            elif name == "ShearX":
                m = _shear_translate_matrix("shear_x", v * 0.3)
            elif name == "ShearY":
                m = _shear_translate_matrix("shear_y", v * 0.3)
            elif name == "TranslateXRel":
                m = _shear_translate_matrix("translate_x", v * self.translate_pct * w)
            else:
                m = _shear_translate_matrix("translate_y", v * self.translate_pct * h)
            out = torch.where(sel, m, out)
        return out

    def _step(
        self, x: Tensor, op_idx: Tensor, applied: Tensor, mag: Tensor, sign: Tensor, use_where: bool
    ) -> Tensor:
        """One sequence step: image ``i`` gets op ``op_idx[i]`` if ``applied[i]``.  ``x``: float [0,255]."""
        geo_ids = torch.tensor([i for i, o in enumerate(self.ops) if o in _GEOMETRIC_OPS], device=x.device)
        geo = applied & torch.isin(op_idx, geo_ids)
        h, w = x.shape[2], x.shape[3]
        if use_where:
            out = x
            if geo_ids.numel():
                theta = self.geometric_matrix(op_idx, mag, sign, h, w)
                moved = affine_transform(x, theta, fill=self.fill, interpolation=self.interpolation)
                out = torch.where(geo[:, None, None, None], moved, out)
            for k, name in enumerate(self.ops):
                if name in _COLOR_OPS:
                    sel = (applied & (op_idx == k))[:, None, None, None]
                    out = torch.where(sel, _COLOR_OPS[name](x, mag, sign), out)
            return out
        out = x.clone()
        idx = geo.nonzero().squeeze(1)
        if idx.numel():
            theta = self.geometric_matrix(op_idx[idx], mag[idx], sign[idx], h, w)
            out[idx] = affine_transform(x[idx], theta, fill=self.fill, interpolation=self.interpolation)
        for k, name in enumerate(self.ops):
            if name in _COLOR_OPS:
                idx = (applied & (op_idx == k)).nonzero().squeeze(1)
                if idx.numel():
                    out[idx] = _COLOR_OPS[name](x[idx], mag[idx], sign[idx])
        return out

    def __call__(
        self, x: Tensor, *, generator: torch.Generator | None = None, return_record: bool = False
    ) -> Tensor | tuple[Tensor, RandAugmentRecord]:
        """``x``: ``(B, C, H, W)`` uint8 (0..255) or float (``[0, 1]``) -> same shape and dtype.

        With ``return_record=True`` also returns the :class:`RandAugmentRecord` of the draws.
        """
        _check_images(x)
        rec = self.draw(x.shape[0], generator=generator, device=x.device)
        if self.num_ops <= 0 or self.prob <= 0 or x.shape[0] == 0:
            return (x, rec) if return_record else x
        is_uint8 = x.dtype == torch.uint8
        if not is_uint8 and not x.is_floating_point():
            raise TypeError(f"RandAugment expects uint8 or floating images, got {x.dtype}")
        use_where = self.strategy == "where" or (self.strategy == "auto" and x.device.type == "cuda")
        xf = x.float() if is_uint8 else x.float() * 255.0
        for j in range(self.num_ops):
            xf = self._step(
                xf, rec.op_idx[:, j], rec.applied[:, j], rec.magnitude[:, j], rec.sign[:, j], use_where
            )
            if is_uint8:
                xf = xf.round()  # PIL keeps 8-bit images between ops
        out = xf.clamp(0, 255).to(torch.uint8) if is_uint8 else (xf / 255.0).to(x.dtype)
        return (out, rec) if return_record else out


# --------------------------------------------------------------------------------------------------
# random erasing
# --------------------------------------------------------------------------------------------------


def random_erasing(
    x: Tensor,
    *,
    p: float = 0.25,
    min_area: float = 0.02,
    max_area: float = 1.0 / 3.0,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    mode: Literal["pixel", "rand", "const"] = "pixel",
    max_attempts: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """timm ``RandomErasing`` (count 1) on normalised float images, vectorised over the batch.

    With probability ``p`` per image: draw up to ``max_attempts`` boxes (area fraction uniform in
    ``[min_area, max_area]``, log-uniform aspect in ``[min_aspect, 1/min_aspect]``,
    ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``); the first with
    ``h < H`` and ``w < W`` is placed uniformly and filled with N(0, 1) noise per pixel
    (``'pixel'``), per channel (``'rand'``) or zeros (``'const'``).  ``(B, C, H, W)`` -> same.
    """
    _check_images(x)
    if p <= 0:
        return x
    if not x.is_floating_point():
        raise TypeError("random_erasing expects normalised float images")
    b, c, h, w = x.shape
    dev = x.device
    max_aspect = max_aspect or 1.0 / min_aspect
    apply = _rand((b,), generator, dev) < p
    u = _rand((2, b, max_attempts), generator, dev)
    area = (min_area + (max_area - min_area) * u[0]) * (h * w)
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    bh = torch.round(torch.sqrt(area * aspect))
    bw = torch.round(torch.sqrt(area / aspect))
    fits = (bh < h) & (bw < w)
    first = fits.int().argmax(dim=1, keepdim=True)  # first fitting attempt (0 if none fits)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    apply = apply & fits.any(dim=1)
    pos = _rand((2, b), generator, dev)
    top = torch.floor(pos[0] * (h - bh + 1)).clamp(max=h - bh)
    left = torch.floor(pos[1] * (w - bw + 1)).clamp(max=w - bw)
    idx = apply.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    t, lft, hh, ww = top[idx, None], left[idx, None], bh[idx, None], bw[idx, None]
    in_rows = (rows >= t) & (rows < t + hh)  # (n, H)
    in_cols = (cols >= lft) & (cols < lft + ww)  # (n, W)
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, H, W)
    n = idx.numel()
    if mode == "pixel":
        fill = torch.randn((n, c, h, w), generator=generator, device=dev, dtype=x.dtype)
    elif mode == "rand":
        fill = torch.randn((n, c, 1, 1), generator=generator, device=dev, dtype=x.dtype)
    else:
        fill = torch.zeros((), device=dev, dtype=x.dtype)
    out = x.clone()
    out[idx] = torch.where(box, fill, x[idx])
    return out


# --------------------------------------------------------------------------------------------------
# mixup / cutmix / label smoothing
# --------------------------------------------------------------------------------------------------


def sample_beta(
    alpha: float | Tensor,
    beta: float | Tensor,
    shape: Sequence[int] = (),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Beta(alpha, beta) samples (float32) of shape ``broadcast(shape, alpha, beta)`` from ``generator``.

    Uses ``X / (X + Y)`` with ``X ~ Gamma(alpha)``, ``Y ~ Gamma(beta)``.
    """
    a = torch.as_tensor(alpha, dtype=torch.float64, device=device)
    b = torch.as_tensor(beta, dtype=torch.float64, device=a.device)
    a, b = torch.broadcast_tensors(a.expand(*shape, *a.shape) if shape else a, b)
    g = torch._standard_gamma(torch.stack([a, b]).contiguous(), generator=generator)
    tot = g[0] + g[1]
    return torch.where(tot > 0, g[0] / tot.clamp(min=1e-300), torch.full_like(tot, 0.5)).float()


def smooth_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """``(B,)`` int labels or ``(B, K)`` probabilities -> ``(B, K)`` smoothed targets.

    As timm: off value ``smoothing / K``, on value ``1 - smoothing + smoothing / K``.
    """
    off = smoothing / num_classes
    if labels.ndim == 2:
        return labels.float() * (1.0 - smoothing) + off
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: Tensor, soft_targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean over the batch of ``-sum_k w_k t_k log softmax(logits)_k`` (``w``: per-class weights ``(K,)``, default
    1; ``F.cross_entropy`` with probability targets and ``weight``).  ``(B, K), (B, K) -> ()``."""
    targets = soft_targets if weight is None else soft_targets * weight
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def rand_bbox(h: int, w: int, lam: float, cy_u: float, cx_u: float) -> tuple[int, int, int, int]:
    """timm ``rand_bbox``: box of side ``sqrt(1 - lam)`` times the image around a random centre.

    ``cy_u``, ``cx_u`` are uniforms in ``[0, 1)`` selecting the centre row/column.  Returns
    ``(y_lo, y_hi, x_lo, x_hi)`` (clipped to the image, half-open).
    """
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    cy, cx = min(int(cy_u * h), h - 1), min(int(cx_u * w), w - 1)
    yl, yh = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    xl, xh = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    return yl, yh, xl, xh


def mixup_cutmix(
    x: Tensor,
    y: Tensor,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    mix_prob: float = 1.0,
    label_smoothing: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, dict]:
    """timm ``Mixup`` in ``'batch'`` mode (one lambda per batch, partner = ``x.flip(0)``).

    With probability ``mix_prob``: if both alphas are > 0, cutmix is chosen with probability
    ``switch_prob`` (else mixup); ``lam ~ Beta(alpha, alpha)`` of the chosen mode.  Cutmix pastes a
    :func:`rand_bbox` box of the flipped batch and sets ``lam = 1 - box_area / image_area``.
    Targets are :func:`smooth_one_hot` targets mixed with the same lambda.

    ``x``: ``(B, C, H, W)`` (float; integer images are mixed in float and rounded back);
    ``y``: ``(B,)`` labels or ``(B, K)`` probabilities.  Returns ``(x_mixed, targets (B, K), info)``
    with ``info = {'lam': float, 'mode': 'mixup' | 'cutmix' | 'none', 'box': tuple | None}``.
    Does not modify ``x`` in place.  One host sync per call (to read the draws).
    """
    _check_images(x)
    targets = smooth_one_hot(y, num_classes, label_smoothing)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or mix_prob <= 0:
        return x, targets, {"lam": 1.0, "mode": "none", "box": None}
    dev = x.device
    # fixed draw sequence: uniforms [gate, switch, cy, cx], then Beta(mixup_alpha), Beta(cutmix_alpha)
    u = _rand((4,), generator, dev).double()
    alphas = torch.tensor([mixup_alpha, cutmix_alpha], dtype=torch.float64, device=dev)
    alphas = torch.where(alphas > 0, alphas, torch.ones_like(alphas))
    betas = sample_beta(alphas, alphas, generator=generator).double()
    gate, switch, cy_u, cx_u, lam_mixup, lam_cutmix = torch.cat([u, betas]).tolist()

    lam, mode, box = 1.0, "none", None
    if gate < mix_prob:
        if mixup_alpha > 0 and cutmix_alpha > 0:
            mode = "cutmix" if switch < switch_prob else "mixup"
        else:
            mode = "mixup" if mixup_alpha > 0 else "cutmix"
        lam = lam_cutmix if mode == "cutmix" else lam_mixup

    if mode == "none" or lam == 1.0:
        return x, targets, {"lam": 1.0, "mode": "none", "box": None}

    h, w = x.shape[-2:]
    if mode == "cutmix":
        box = rand_bbox(h, w, lam, cy_u, cx_u)
        yl, yh, xl, xh = box
        lam = 1.0 - (yh - yl) * (xh - xl) / float(h * w)
        out = x.clone()
        out[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
    else:
        xf = x if x.is_floating_point() else x.float()
        out = xf * lam + xf.flip(0) * (1.0 - lam)
        if not x.is_floating_point():
            out = out.round().clamp(torch.iinfo(x.dtype).min, torch.iinfo(x.dtype).max).to(x.dtype)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return out, targets, {"lam": lam, "mode": mode, "box": box}


# --------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------


def _stats(v: Sequence[float], c: int, x: Tensor, name: str) -> Tensor:
    if len(v) not in (1, c):
        raise ValueError(f"{name} has {len(v)} values but the images have {c} channels")
    return torch.tensor(list(v), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per channel; ``x``: float ``(B, C, H, W)`` in ``[0, 1]``.

    ``mean``/``std`` have 1 or C values.
    """
    c = x.shape[1]
    return (x - _stats(mean, c, x, "mean")) / _stats(std, c, x, "std")


def _to_unit_float(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def eval_transform(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Evaluation preprocessing: ``uint8 (B, C, H, W)`` (or float in [0, 1]) -> normalised float32.

    Anything else is refused rather than normalised wrongly: another type (a numpy array, a PIL image),
    another integer dtype, or float values outside [0, 1] (images in 0..255, or normalised already).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch tensor (uint8 0..255 or float 0..1, (B, C, H, W)), not a "
                        f"{type(images).__name__}; image files, PIL images or arrays of any size: "
                        "InputTransform.read_batch(images) (nestvit.load(RUN).transform) resizes them as in training "
                        "and gives this uint8 batch")
    _check_images(images)
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), not {images.dtype}; convert with "
                        ".to(torch.uint8)")
    if images.is_floating_point() and images.numel():
        lo, hi = images.aminmax()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1]; these span {float(lo):.3g}..{float(hi):.3g} (0..255 "
                             "values: pass them as uint8; normalised already: give them to the model as they are)")
    return normalize(_to_unit_float(images), mean, std)


@dataclass
class AugmentConfig:
    """The NesT CIFAR training recipe (defaults); set a piece to 0 / False to disable it."""

    crop_padding: int = 2
    crop_padding_mode: Literal["constant", "reflect"] = "constant"
    hflip: bool = True
    randaugment: bool = True
    ra_num_ops: int = 2
    ra_magnitude: float = 9.0
    ra_magnitude_std: float = 0.5
    ra_prob: float = 0.5
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_switch_prob: float = 0.5
    mix_prob: float = 1.0
    label_smoothing: float = 0.1
    random_erasing: float = 0.25
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    @classmethod
    def plain(cls, **overrides: object) -> AugmentConfig:
        """The RTNT paper's plain pipeline: normalisation only, hard one-hot targets."""
        cfg = cls(
            crop_padding=0,
            hflip=False,
            randaugment=False,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            mix_prob=0.0,
            label_smoothing=0.0,
            random_erasing=0.0,
        )
        return replace(cfg, **overrides)

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Build from a (recipe) dict, rejecting unknown keys; lists become tuples."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown augmentation keys {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class BatchAugment:
    """Training-time batch augmentation on the images' device.

    ``__call__(images (B, C, H, W) uint8, labels (B,)) -> (normalised float32 images, soft targets
    (B, num_classes))``: crop -> flip -> RandAugment -> /255 -> normalise -> random erasing ->
    mixup/cutmix + label smoothing.
    """

    def __init__(self, config: AugmentConfig | None = None, *, num_classes: int) -> None:
        self.config = config or AugmentConfig()
        self.num_classes = num_classes
        cfg = self.config
        self.randaugment = (
            RandAugment(
                num_ops=cfg.ra_num_ops,
                magnitude=cfg.ra_magnitude,
                magnitude_std=cfg.ra_magnitude_std,
                prob=cfg.ra_prob,
            )
            if cfg.randaugment and cfg.ra_num_ops > 0 and cfg.ra_prob > 0
            else None
        )

    def __repr__(self) -> str:
        return f"BatchAugment({self.config}, num_classes={self.num_classes})"

    def __call__(
        self, images: Tensor, labels: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``images``: uint8 ``(B, C, H, W)`` (or float in [0, 1]); ``labels``: ``(B,)`` ints."""
        _check_images(images)
        cfg = self.config
        x = images
        if cfg.crop_padding > 0:
            x = random_crop_with_padding(
                x, padding=cfg.crop_padding, padding_mode=cfg.crop_padding_mode, generator=generator
            )
        if cfg.hflip:
            x = random_hflip(x, generator=generator)
        if self.randaugment is not None:
            x = self.randaugment(x, generator=generator)  # type: ignore[assignment]
        x = normalize(_to_unit_float(x), cfg.mean, cfg.std)
        if cfg.random_erasing > 0:
            x = random_erasing(x, p=cfg.random_erasing, mode="pixel", generator=generator)
        x, targets, _ = mixup_cutmix(
            x,
            labels.to(x.device),
            num_classes=self.num_classes,
            mixup_alpha=cfg.mixup_alpha,
            cutmix_alpha=cfg.cutmix_alpha,
            switch_prob=cfg.mix_switch_prob,
            mix_prob=cfg.mix_prob,
            label_smoothing=cfg.label_smoothing,
            generator=generator,
        )
        return x, targets

    def eval(self, images: Tensor) -> Tensor:
        """Evaluation preprocessing with this config's mean/std (see :func:`eval_transform`)."""
        return eval_transform(images, self.config.mean, self.config.std)
