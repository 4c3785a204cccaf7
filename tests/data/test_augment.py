"""Tests for nestvit.data.augment (batched device-side augmentation, timm semantics)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from nestvit.data import augment as A
except ImportError:  # package not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
    from nestvit.data import augment as A


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_u8(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen(seed))


SHAPES = st.tuples(
    st.sampled_from([1, 7]),
    st.sampled_from([1, 3]),
    st.sampled_from([(28, 28), (32, 32), (24, 40)]),
)


# --------------------------------------------------------------------------------------------------
# shapes, dtypes, ranges
# --------------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(shape=SHAPES, is_uint8=st.booleans(), seed=st.integers(0, 2**16))
def test_pieces_keep_shape_dtype_range(shape, is_uint8, seed):
    b, c, (h, w) = shape
    x = rand_u8((b, c, h, w), seed)
    if not is_uint8:
        x = x.float() / 255.0
    g = gen(seed)
    for out in (
        A.random_crop_with_padding(x, padding=2, generator=g),
        A.random_crop_with_padding(x, padding=3, padding_mode="reflect", generator=g),
        A.random_hflip(x, generator=g),
        A.RandAugment(prob=1.0)(x, generator=g),
    ):
        assert out.shape == x.shape and out.dtype == x.dtype
        if not is_uint8:
            assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    xn = A.normalize(x.float() / 255 if is_uint8 else x, (0.5,), (0.25,))
    erased = A.random_erasing(xn, p=1.0, generator=g)
    assert erased.shape == x.shape and erased.dtype == torch.float32 and torch.isfinite(erased).all()
    mixed, t, info = A.mixup_cutmix(xn, torch.arange(b) % 5, num_classes=5, generator=g)
    assert mixed.shape == x.shape and torch.isfinite(mixed).all()
    assert t.shape == (b, 5) and torch.allclose(t.sum(1), torch.ones(b))
    assert info["mode"] in ("mixup", "cutmix", "none") and 0.0 <= info["lam"] <= 1.0


@settings(max_examples=10, deadline=None)
@given(shape=SHAPES, seed=st.integers(0, 2**16))
def test_batch_augment_shapes(shape, seed):
    b, c, (h, w) = shape
    x = rand_u8((b, c, h, w), seed)
    y = torch.randint(0, 10, (b,), generator=gen(seed))
    cfg = A.AugmentConfig(mean=(0.5,) * c, std=(0.25,) * c, hflip=c == 3)
    out, t = A.BatchAugment(cfg, num_classes=10)(x, y, generator=gen(seed))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert t.shape == (b, 10) and (t >= 0).all() and torch.allclose(t.sum(1), torch.ones(b))


def test_mean_std_channel_mismatch_raises():
    x = rand_u8((2, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        A.eval_transform(x, A.CIFAR10_MEAN, A.CIFAR10_STD)


# --------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------


def test_seeded_determinism():
    x = rand_u8((16, 3, 32, 32))
    y = torch.randint(0, 10, (16,), generator=gen(1))
    aug = A.BatchAugment(A.AugmentConfig(), num_classes=10)
    a1, t1 = aug(x, y, generator=gen(123))
    a2, t2 = aug(x, y, generator=gen(123))
    b1, _ = aug(x, y, generator=gen(124))
    assert torch.equal(a1, a2) and torch.equal(t1, t2)
    assert not torch.equal(a1, b1)
    ra = A.RandAugment(prob=1.0)
    assert torch.equal(ra(x, generator=gen(5)), ra(x, generator=gen(5)))
    assert not torch.equal(ra(x, generator=gen(5)), ra(x, generator=gen(6)))


def test_randaugment_index_and_where_strategies_agree():
    x = rand_u8((48, 3, 20, 24), 3)
    a = A.RandAugment(prob=1.0, strategy="index")(x, generator=gen(9))
    b = A.RandAugment(prob=1.0, strategy="where")(x, generator=gen(9))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# crop / flip
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_crop_is_shifted_window_of_padded_input(mode):
    pad = 2
    x = torch.rand(64, 2, 9, 11, generator=gen(0))
    out = A.random_crop_with_padding(x, padding=pad, padding_mode=mode, generator=gen(1))
    padded = F.pad(x, (pad,) * 4, mode=mode)
    offsets = []
    for i in range(x.shape[0]):
        hits = [
            (oy, ox)
            for oy in range(2 * pad + 1)
            for ox in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, oy : oy + 9, ox : ox + 11])
        ]
        assert len(hits) == 1, f"image {i}: {hits}"
        offsets.append(hits[0])
    assert len(set(offsets)) >= 10  # independent offsets per image
    assert {o[0] for o in offsets} == set(range(5)) and {o[1] for o in offsets} == set(range(5))


def test_crop_uint8_and_zero_padding_disabled():
    x = rand_u8((4, 3, 8, 8))
    assert A.random_crop_with_padding(x, padding=0, generator=gen()) is x
    out = A.random_crop_with_padding(x, padding=2, generator=gen())
    assert out.dtype == torch.uint8


@given(dy=st.integers(-3, 3), dx=st.integers(-3, 3))
@settings(max_examples=30, deadline=None)
def test_shift_is_the_crop_at_that_offset(dy, dx):
    x = rand_u8((2, 3, 5, 7))
    out = A.shift(x, dy, dx)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = F.pad(x, (3, 3, 3, 3))  # the window of the zero-padded image the crop with offset (3-dy, 3-dx) takes
    assert torch.equal(out, padded[..., 3 - dy:3 - dy + 5, 3 - dx:3 - dx + 7])
    assert A.shift(x, 0, 0) is x


def test_hflip_fraction_and_exactness():
    x = torch.rand(2000, 1, 3, 5, generator=gen(0))
    out = A.random_hflip(x, p=0.5, generator=gen(1))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    same = (out == x).flatten(1).all(1)
    assert (flipped ^ same).all()  # every image is either untouched or exactly flipped
    assert abs(flipped.float().mean().item() - 0.5) < 0.05
    assert torch.equal(A.random_hflip(x, p=0.0, generator=gen()), x)
    assert torch.equal(A.random_hflip(x, p=1.0, generator=gen()), x.flip(-1))


# --------------------------------------------------------------------------------------------------
# single RandAugment ops against hand-computed references
# --------------------------------------------------------------------------------------------------


def test_invert_posterize_solarize():
    x = torch.tensor([0.0, 1.0, 100.0, 127.0, 128.0, 200.0, 255.0]).view(1, 1, 1, 7)
    assert torch.equal(A.invert(x), 255 - x)
    xi = x.long()
    for bits in range(0, 9):
        mask = (0xFF << (8 - bits)) & 0xFF
        assert torch.equal(A.posterize(x, bits), (xi & mask).float()), bits
    assert torch.equal(
        A.solarize(x, 128), torch.tensor([0.0, 1.0, 100.0, 127.0, 127.0, 55.0, 0.0]).view(1, 1, 1, 7)
    )
    assert torch.equal(A.solarize(x, 256), x)
    assert torch.equal(
        A.solarize_add(x, 50), torch.tensor([50.0, 51.0, 150.0, 177.0, 128.0, 200.0, 255.0]).view(1, 1, 1, 7)
    )
    assert A.solarize_add(x, 200)[0, 0, 0, 2].item() == 255.0  # clipped
    # per-image parameters
    x2 = x.repeat(2, 1, 1, 1)
    out = A.posterize(x2, torch.tensor([8.0, 1.0]))
    assert torch.equal(out[0], x2[0]) and torch.equal(out[1, 0, 0], (xi[0, 0, 0] & 0x80).float())


def test_enhance_ops():
    x = rand_u8((3, 3, 6, 7)).float()
    for fn in (A.adjust_brightness, A.adjust_color, A.adjust_contrast, A.adjust_sharpness):
        assert torch.allclose(fn(x, 1.0), x, atol=1e-4), fn.__name__
    assert torch.equal(A.adjust_brightness(x, 0.0), torch.zeros_like(x))
    assert torch.allclose(A.adjust_brightness(x, 0.5), x / 2)
    assert torch.equal(A.adjust_brightness(x, 2.0), (2 * x).clamp(max=255))
    gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(A.adjust_color(x, 0.0), gray[:, None].expand_as(x), atol=1e-4)
    g1 = x[:, :1]
    assert torch.equal(A.adjust_color(g1, 0.3), g1)  # colour is a no-op for C=1
    mean = torch.floor(gray.mean(dim=(1, 2)) + 0.5)
    assert torch.allclose(A.adjust_contrast(x, 0.0), mean.view(3, 1, 1, 1).expand_as(x))
    # sharpness factor 0 = PIL SMOOTH filter on the interior, border kept
    s = torch.zeros(1, 1, 3, 3)
    s[0, 0, 1, 1] = 13.0
    s[0, 0, 0, 0] = 26.0
    out = A.adjust_sharpness(s, 0.0)
    expected = s.clone()
    expected[0, 0, 1, 1] = (5 * 13 + 26) / 13
    assert torch.allclose(out, expected)
    # per-image factors
    out = A.adjust_brightness(x, torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(out[0], torch.zeros_like(x[0])) and torch.allclose(out[1], x[1])


def test_autocontrast():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = torch.linspace(50, 100, 16).view(4, 4)
    x[0, 1] = 77.0  # constant channel: unchanged
    x[0, 2] = torch.linspace(0, 255, 16).view(4, 4)
    x[1] = torch.linspace(10, 20, 48).view(3, 4, 4)
    out = A.auto_contrast(x)
    assert torch.allclose(out[0, 0], torch.linspace(0, 255, 16).view(4, 4), atol=1e-3)
    assert torch.equal(out[0, 1], x[0, 1])
    assert torch.allclose(out[0, 2], x[0, 2], atol=1e-3)
    for ch in range(3):  # per channel
        assert out[1, ch].min().item() == pytest.approx(0.0)
        assert out[1, ch].max().item() == pytest.approx(255.0)


def _pil_equalize_channel(values: list[int]) -> list[int]:
    """Pure-Python transcription of PIL ImageOps.equalize for one channel."""
    h = [0] * 256
    for v in values:
        h[v] += 1
    histo = [c for c in h if c]
    if len(histo) <= 1:
        return values
    step = (sum(histo) - histo[-1]) // 255
    if not step:
        return values
    lut, n = [], step // 2
    for i in range(256):
        lut.append(min(n // step, 255))
        n += h[i]
    return [lut[v] for v in values]


def test_equalize_known_histogram():
    x = torch.cat([torch.full((512,), 10.0), torch.full((256,), 50.0), torch.full((256,), 200.0)])
    x = x[torch.randperm(1024, generator=gen())].view(1, 1, 32, 32)
    out = A.equalize(x)
    # step = (1024 - 256) // 255 = 3; lut[10] = 1 // 3, lut[50] = (1 + 512) // 3, lut[200] = 769 // 3 -> 255
    assert torch.equal(out, torch.where(x == 10, 0.0, torch.where(x == 50, 171.0, 255.0)))
    # 1020 pixels below the top bin: step = 1020 // 255 = 4 (not 1020 // 256 = 3)
    x = torch.cat([torch.full((510,), 10.0), torch.full((510,), 60.0), torch.full((4,), 250.0)])
    out = A.equalize(x.view(1, 1, 32, 32))
    assert torch.equal(out.flatten(), torch.where(x == 10, 0.0, torch.where(x == 60, 128.0, 255.0)))
    small = rand_u8((2, 3, 8, 8)).float()  # <= 256 pixels: step == 0 -> unchanged (as PIL)
    assert torch.equal(A.equalize(small), small)


def test_equalize_matches_pil_reference():
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=gen(2)).float()
    x[1] = (x[1] / 4).floor() + 30  # narrow histogram
    x[2, 0] = 7.0  # constant channel
    out = A.equalize(x)
    for i in range(3):
        for ch in range(3):
            ref = _pil_equalize_channel(x[i, ch].long().flatten().tolist())
            assert out[i, ch].long().flatten().tolist() == ref, (i, ch)


def test_geometric_ops():
    x = torch.arange(1, 1 + 2 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    for fn in (A.rotate, A.shear_x, A.shear_y, A.translate_x, A.translate_y):
        assert torch.equal(fn(x, 0.0), x), fn.__name__
    assert torch.equal(A.rotate(x, 90.0), torch.rot90(x, 1, dims=(-2, -1)))  # counter-clockwise
    assert torch.equal(A.rotate(x, 180.0), x.flip(-1).flip(-2))
    tx = A.translate_x(x, 1.0)
    assert torch.equal(tx[..., :-1], x[..., 1:]) and (tx[..., -1] == 128).all()
    ty = A.translate_y(x, -2.0)
    assert torch.equal(ty[..., 2:, :], x[..., :-2, :]) and (ty[..., :2, :] == 128).all()
    # shear_x(2): output (row j, col i) = input (row j, col i + 2 j + 1), fill outside
    sx = A.shear_x(x, 2.0)
    for j in range(5):
        for i in range(5):
            src = i + 2 * j + 1
            expected = x[:, 0, j, src] if src < 5 else torch.full((2,), 128.0)
            assert torch.equal(sx[:, 0, j, i], expected)
    sy = A.shear_y(x, 2.0)
    assert torch.equal(sy, A.shear_x(x.transpose(-1, -2), 2.0).transpose(-1, -2))
    # per-image parameters: image 0 unchanged, image 1 rotated; fill value configurable
    out = A.rotate(x, torch.tensor([0.0, 90.0]), fill=0.0)
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], torch.rot90(x[1], 1, dims=(-2, -1)))
    assert (A.translate_y(x, 10.0, fill=3.0) == 3.0).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_ops_match_pillow(channels):
    """The ops against Pillow (what timm runs): geometric / LUT ops exact, blends within 1 level
    (Pillow truncates where we round)."""
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    x = rand_u8((4, channels, 24, 30), 7)
    x[1::2] = x[1::2] // 5 + 70  # narrow histograms

    def pil(img: torch.Tensor) -> Image.Image:
        a = img.permute(1, 2, 0).numpy()
        return Image.fromarray(a[..., 0] if channels == 1 else a)

    def back(im: Image.Image) -> torch.Tensor:
        t = torch.from_numpy(np.asarray(im).copy())
        return (t[None] if t.ndim == 2 else t.permute(2, 0, 1)).int()

    fill = 128 if channels == 1 else (128,) * 3
    nearest = Image.Resampling.NEAREST

    def affine(coeffs):
        return lambda im: im.transform(
            im.size, Image.Transform.AFFINE, coeffs, resample=nearest, fillcolor=fill
        )

    exact = [
        (A.equalize, ImageOps.equalize),
        (A.invert, ImageOps.invert),
        (lambda t: A.posterize(t, 3), lambda im: ImageOps.posterize(im, 3)),
        (lambda t: A.solarize(t, 90), lambda im: ImageOps.solarize(im, 90)),
        (lambda t: A.rotate(t, 23.5), lambda im: im.rotate(23.5, resample=nearest, fillcolor=fill)),
        (lambda t: A.rotate(t, -11.0), lambda im: im.rotate(-11.0, resample=nearest, fillcolor=fill)),
        (lambda t: A.shear_x(t, 0.27), affine((1, 0.27, 0, 0, 1, 0))),
        (lambda t: A.shear_y(t, -0.21), affine((1, 0, 0, -0.21, 1, 0))),
        (lambda t: A.translate_x(t, 5.4), affine((1, 0, 5.4, 0, 1, 0))),
        (lambda t: A.translate_y(t, -7.3), affine((1, 0, 0, 0, 1, -7.3))),
    ]
    close = [(A.auto_contrast, ImageOps.autocontrast)]
    enhancers = [
        (A.adjust_color, ImageEnhance.Color),
        (A.adjust_contrast, ImageEnhance.Contrast),
        (A.adjust_brightness, ImageEnhance.Brightness),
        (A.adjust_sharpness, ImageEnhance.Sharpness),
    ]
    for f in (0.3, 1.6):
        for fn, cls in enhancers:
            close.append((lambda t, fn=fn, f=f: fn(t, f), lambda im, cls=cls, f=f: cls(im).enhance(f)))
    for k, (ours, theirs) in enumerate(exact + close):
        out = ours(x.float()).round().int()
        ref = torch.stack([back(theirs(pil(img))) for img in x])
        tol = 0 if k < len(exact) else 1
        assert (out - ref).abs().max().item() <= tol, k


# --------------------------------------------------------------------------------------------------
# RandAugment sampling
# --------------------------------------------------------------------------------------------------


def _reference_op(name: str, x: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """timm level->argument mapping, applied with the single public ops on one image (1, C, H, W)."""
    h, w = x.shape[-2:]
    lvl = m / 10.0
    enhance = (1.0 + s * m / 10.0 * 0.9).clamp(min=0.1)
    v = m / 10.0 * s
    table = {
        "AutoContrast": lambda: A.auto_contrast(x),
        "Equalize": lambda: A.equalize(x),
        "Invert": lambda: A.invert(x),
        "Rotate": lambda: A.rotate(x, v * 30.0),
        "PosterizeIncreasing": lambda: A.posterize(x, 4 - int(lvl * 4)),
        "SolarizeIncreasing": lambda: A.solarize(x, 256 - min(256, int(lvl * 256))),
        "SolarizeAdd": lambda: A.solarize_add(x, min(128, int(lvl * 110)), 128),
        "ColorIncreasing": lambda: A.adjust_color(x, enhance),
        "ContrastIncreasing": lambda: A.adjust_contrast(x, enhance),
        "BrightnessIncreasing": lambda: A.adjust_brightness(x, enhance),
        "SharpnessIncreasing": lambda: A.adjust_sharpness(x, enhance),
        "ShearX": lambda: A.shear_x(x, v * 0.3),
        "ShearY": lambda: A.shear_y(x, v * 0.3),
        "TranslateXRel": lambda: A.translate_x(x, v * 0.45 * w),
        "TranslateYRel": lambda: A.translate_y(x, v * 0.45 * h),
    }
    return table[name]()


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_matches_per_image_reference(channels):
    x = rand_u8((60, channels, 32, 32), 4)
    # a few images with a narrow histogram and > 256 pixels so that equalize / autocontrast do work
    x[:20] = (x[:20] // 8) + 100
    ra = A.RandAugment(num_ops=2, prob=0.7)
    out, rec = ra(x, generator=gen(11), return_record=True)
    assert rec.op_idx.shape == (60, 2)
    for i in range(60):
        xi = x[i : i + 1].float()
        for j in range(2):
            if rec.applied[i, j]:
                name = ra.ops[int(rec.op_idx[i, j])]
                xi = _reference_op(name, xi, rec.magnitude[i, j], rec.sign[i, j]).clamp(0, 255).round()
        assert torch.equal(out[i], xi[0].to(torch.uint8)), (i, rec.op_idx[i], rec.applied[i])


def test_randaugment_draws_per_image():
    ra = A.RandAugment(num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5)
    rec = ra.draw(6000, generator=gen(0), device=torch.device("cpu"))
    counts = torch.bincount(rec.op_idx.flatten(), minlength=15).float() / rec.op_idx.numel()
    assert len(ra.ops) == 15 and torch.allclose(counts, torch.full((15,), 1 / 15), atol=0.01)
    assert abs(rec.applied.float().mean().item() - 0.5) < 0.02
    assert rec.magnitude.min() >= 0 and rec.magnitude.max() <= 10
    assert abs(rec.magnitude.mean().item() - 9.0) < 0.02 and abs(rec.magnitude.std().item() - 0.5) < 0.03
    assert abs((rec.sign > 0).float().mean().item() - 0.5) < 0.02
    # different images in one batch get different op sets
    x = rand_u8((32, 3, 16, 16))
    _, rec = ra(x, generator=gen(1), return_record=True)
    assert len({tuple(r) for r in rec.op_idx.tolist()}) > 20
    # magnitude above the cap is clipped to 10
    capped = A.RandAugment(magnitude=15.0).draw(100, generator=gen(0), device=torch.device("cpu"))
    assert (capped.magnitude == 10.0).all()


def test_randaugment_prob_zero_is_identity_and_float_input():
    x = rand_u8((8, 3, 16, 16))
    assert torch.equal(A.RandAugment(prob=0.0)(x, generator=gen()), x)
    assert torch.equal(A.RandAugment(num_ops=0)(x, generator=gen()), x)
    xf = x.float() / 255
    out_f = A.RandAugment(prob=1.0)(xf, generator=gen(3))
    out_u = A.RandAugment(prob=1.0)(x, generator=gen(3))
    assert out_f.dtype == torch.float32
    assert (out_f * 255 - out_u.float()).abs().max() <= 1.0 + 1e-3  # same ops; uint8 rounds in between
    with pytest.raises(ValueError):
        A.RandAugment(ops=("Nope",))


# --------------------------------------------------------------------------------------------------
# mixup / cutmix / label smoothing
# --------------------------------------------------------------------------------------------------


def test_sample_beta_moments():
    s = A.sample_beta(0.8, 0.8, (20000,), generator=gen(0))
    assert s.min() >= 0 and s.max() <= 1
    assert abs(s.mean().item() - 0.5) < 0.01
    assert abs(s.var().item() - 1 / (4 * (2 * 0.8 + 1))) < 0.005
    s2 = A.sample_beta(2.0, 5.0, (20000,), generator=gen(1))
    assert abs(s2.mean().item() - 2 / 7) < 0.01


def test_mixup_lambda_distribution_and_mode_balance():
    x = torch.rand(2, 1, 4, 4, generator=gen(0))
    y = torch.tensor([0, 1])
    g = gen(42)
    lams, modes = [], []
    for _ in range(3000):
        _, _, info = A.mixup_cutmix(x, y, num_classes=2, generator=g)
        modes.append(info["mode"])
        if info["mode"] == "mixup":
            lams.append(info["lam"])
    frac_cutmix = modes.count("cutmix") / len(modes)
    assert abs(frac_cutmix - 0.5) < 0.04
    lam = torch.tensor(lams, dtype=torch.float64)
    assert abs(lam.mean().item() - 0.5) < 0.025
    assert abs(lam.var().item() - 1 / (4 * (2 * 0.8 + 1))) < 0.01
    hist = torch.histc(lam, bins=5, min=0, max=1) / len(lams)
    # Beta(0.8, 0.8) is U-shaped: outer bins heavier than the middle one
    assert hist[0] > hist[2] and hist[4] > hist[2]


def test_mixup_images_and_targets():
    x = torch.rand(6, 3, 8, 8, generator=gen(0))
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    out, t, info = A.mixup_cutmix(x, y, num_classes=5, cutmix_alpha=0.0, generator=gen(1))
    lam = info["lam"]
    assert info["mode"] == "mixup" and info["box"] is None
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    ref = A.smooth_one_hot(y, 5, 0.1)
    assert torch.allclose(t, lam * ref + (1 - lam) * ref.flip(0))
    assert torch.allclose(t.sum(1), torch.ones(6))
    assert not torch.equal(out, x)  # input not modified in place, output mixed
    assert torch.equal(x, torch.rand(6, 3, 8, 8, generator=gen(0)))


def test_cutmix_box_and_lambda():
    x = torch.rand(4, 2, 12, 16, generator=gen(0))
    y = torch.tensor([0, 1, 2, 3])
    seen = 0
    for seed in range(20):
        out, t, info = A.mixup_cutmix(x, y, num_classes=4, mixup_alpha=0.0, generator=gen(seed))
        assert info["mode"] in ("cutmix", "none")
        if info["mode"] == "none":
            continue
        seen += 1
        yl, yh, xl, xh = info["box"]
        assert info["lam"] == pytest.approx(1 - (yh - yl) * (xh - xl) / (12 * 16))
        inside = torch.zeros(12, 16, dtype=torch.bool)
        inside[yl:yh, xl:xh] = True
        assert torch.equal(out[..., inside], x.flip(0)[..., inside])
        assert torch.equal(out[..., ~inside], x[..., ~inside])
        ref = A.smooth_one_hot(y, 4, 0.1)
        assert torch.allclose(t, info["lam"] * ref + (1 - info["lam"]) * ref.flip(0))
    assert seen >= 15


def test_label_smoothing_values_and_disabled_mixing():
    y = torch.tensor([3, 0, 9])
    x = torch.rand(3, 1, 4, 4)
    out, t, info = A.mixup_cutmix(x, y, num_classes=10, mixup_alpha=0.0, cutmix_alpha=0.0, generator=gen())
    assert out is x and info["mode"] == "none" and info["lam"] == 1.0
    expected = torch.full((3, 10), 0.01)
    expected[torch.arange(3), y] = 0.91
    assert torch.allclose(t, expected, atol=1e-7)
    _, t0, info0 = A.mixup_cutmix(x, y, num_classes=10, mix_prob=0.0, label_smoothing=0.0, generator=gen())
    assert info0["mode"] == "none" and torch.equal(t0, F.one_hot(y, 10).float())
    soft = torch.tensor([[0.5, 0.5, 0.0]])
    assert torch.allclose(A.smooth_one_hot(soft, 3, 0.3), torch.tensor([[0.45, 0.45, 0.1]]))


def test_soft_target_cross_entropy():
    logits = torch.randn(5, 7, generator=gen(0), requires_grad=True)
    y = torch.tensor([0, 6, 2, 2, 1])
    t = A.smooth_one_hot(y, 7, 0.1)
    loss = A.soft_target_cross_entropy(logits, t)
    assert torch.allclose(loss, F.cross_entropy(logits, y, label_smoothing=0.1))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------------------------------
# random erasing
# --------------------------------------------------------------------------------------------------


def test_random_erasing_fraction_and_identity():
    x = torch.full((4000, 1, 8, 8), 100.0)  # noise never equals 100 exactly
    out = A.random_erasing(x, p=0.25, generator=gen(0))
    erased = (out != x).flatten(1).any(1)
    assert abs(erased.float().mean().item() - 0.25) < 0.025
    assert torch.equal(A.random_erasing(x, p=0.0, generator=gen()), x)
    assert torch.equal(x, torch.full((4000, 1, 8, 8), 100.0))  # not modified in place


def test_random_erasing_box_area_and_shape():
    h = w = 100
    x = torch.full((300, 2, h, w), 100.0)
    out = A.random_erasing(x, p=1.0, generator=gen(1))
    changed = (out != x).any(1)  # (B, H, W)
    rows, cols = changed.any(2), changed.any(1)  # (B, H), (B, W)
    bh, bw = rows.sum(1), cols.sum(1)
    ar = torch.arange(h)
    first_r = torch.where(rows, ar, h).amin(1)
    last_r = torch.where(rows, ar, -1).amax(1)
    first_c = torch.where(cols, ar, w).amin(1)
    last_c = torch.where(cols, ar, -1).amax(1)
    assert (bh > 0).all() and (bh < h).all() and (bw < w).all()
    assert torch.equal(last_r - first_r + 1, bh) and torch.equal(last_c - first_c + 1, bw)  # contiguous
    assert torch.equal(changed.sum((1, 2)), bh * bw)  # a filled rectangle
    box = changed.unsqueeze(1).expand_as(out)
    assert (out[box] != 100).all()  # every channel of the box is noise
    aspect = bh / bw
    assert (aspect > 0.3 * 0.8).all() and (aspect < 3.3 / 0.8).all()  # log-uniform aspect (rounding slack)
    areas = (bh * bw).float() / (h * w)
    # target area fraction in [0.02, 1/3]; rounding h, w moves it by at most ~1.2 sqrt(area) pixels
    assert areas.min() >= 0.018 and areas.max() <= 0.341
    assert 0.1 < areas.mean() < 0.25
    noise = out[box]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_random_erasing_const_mode_and_strict_fit():
    x = torch.full((2000, 1, 10, 10), 5.0)
    out = A.random_erasing(x, p=1.0, mode="const", generator=gen())
    assert set(out.unique().tolist()) <= {0.0, 5.0} and (out == 0).any()
    erased = out == 0
    # as timm, a candidate box is only used if h < H and w < W (tall/wide candidates are redrawn)
    assert erased.any(-1).sum(-1).max() < 10 and erased.any(-2).sum(-1).max() < 10
    assert erased.flatten(1).any(1).float().mean() > 0.99


# --------------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------------


def test_plain_pipeline_is_normalisation_only():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    x = rand_u8((9, 3, 32, 32))
    y = torch.randint(0, 10, (9,), generator=gen(1))
    aug = A.BatchAugment(A.AugmentConfig.plain(mean=mean, std=std), num_classes=10)
    out, t = aug(x, y, generator=gen(2))
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(out, A.eval_transform(x, mean, std)) and torch.equal(out, aug.eval(x))
    assert torch.equal(t, F.one_hot(y, 10).float())
    assert aug.randaugment is None
    gray = A.BatchAugment(A.AugmentConfig.plain(mean=(0.5,), std=(0.5,)), num_classes=10)
    out1, _ = gray(x[:, :1], y, generator=gen())
    assert torch.allclose(out1, x[:, :1].float() / 127.5 - 1, atol=1e-6)


def test_each_piece_can_be_disabled():
    x = rand_u8((8, 3, 16, 16))
    y = torch.arange(8)
    off = A.AugmentConfig(
        crop_padding=0,
        hflip=False,
        randaugment=False,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        label_smoothing=0.0,
        random_erasing=0.0,
    )
    out, t = A.BatchAugment(off, num_classes=8)(x, y, generator=gen())
    assert torch.equal(out, A.eval_transform(x, off.mean, off.std)) and torch.equal(t, torch.eye(8))
    # only smoothing on
    _, t = A.BatchAugment(A.AugmentConfig.plain(label_smoothing=0.1), num_classes=8)(x, y, generator=gen())
    assert torch.allclose(t, A.smooth_one_hot(y, 8, 0.1))
    # only the crop on: every pixel of the output is 0 or a pixel of the input image
    crop = A.AugmentConfig.plain(crop_padding=2, mean=(0.0,), std=(1.0,))
    out, _ = A.BatchAugment(crop, num_classes=8)(x, y, generator=gen())
    assert not torch.equal(out, x.float() / 255)
    assert math.isclose(out.max().item(), x.max().item() / 255, rel_tol=1e-6)


def test_config_from_dict():
    cfg = A.AugmentConfig.from_dict({"ra_magnitude": 5.0, "mean": [0.5], "std": [0.5]})
    assert cfg.ra_magnitude == 5.0 and cfg.mean == (0.5,)
    with pytest.raises(ValueError, match="unknown"):
        A.AugmentConfig.from_dict({"nope": 1})
