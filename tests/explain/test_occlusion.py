"""Occlusion (Zeiler & Fergus 2014): a known answer, a slow reference, every family, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import nestvit
from nestvit.cli import main
from nestvit.explain import occlusion
from tests.conftest import tiny_model
from tests.explain.test_cli import NEST, check_png, save


class TopLeft(nn.Module):
    """Class 0's logit is the mean of the top-left quadrant's pixels (all channels); classes 1, 2 are 0."""

    def forward(self, x):
        H, W = x.shape[-2:]
        s = x[:, :, : H // 2, : W // 2].mean(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s), torch.zeros_like(s)], dim=1)


def positive_images(B=2, C=3, H=16, W=16):
    return torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(0)) + 0.5


def test_map_is_the_top_left_quadrant_only():
    x = positive_images()
    m = occlusion(TopLeft(), x)  # default window 16 // 8 = 2, stride 2: aligned with the quadrant
    assert m.shape == (2, 16, 16) and m.dtype == torch.float32
    assert bool((m[:, :8, :8] > 1e-4).all())  # hiding part of the evidence lowers p(class 0)
    assert bool((m[:, 8:, :] == 0).all()) and bool((m[:, :, 8:] == 0).all())  # elsewhere: no effect at all
    # stride == window: piecewise constant over the 2x2 windows
    torch.testing.assert_close(m, m[:, ::2, ::2].repeat_interleave(2, 1).repeat_interleave(2, 2))
    # exact value of one window: p0(x) - p0(occluded) with p0 = softmax([s, 0, 0])[0]
    p = lambda s: torch.softmax(torch.tensor([s, 0.0, 0.0]), 0)[0]
    s = x[0, :, :8, :8].mean()
    s_occ = (x[0, :, :8, :8].sum() - x[0, :, :2, :2].sum()) / (3 * 64)
    torch.testing.assert_close(m[0, 0, 0], p(float(s)) - p(float(s_occ)))


def test_targets_int_tensor_and_default():
    x = positive_images()
    model = TopLeft()
    default = occlusion(model, x)  # the prediction: class 0 (logit > 0)
    torch.testing.assert_close(default, occlusion(model, x, 0))
    other = occlusion(model, x, 1)  # hiding class 0's evidence raises p(class 1): negative there
    assert bool((other[:, :8, :8] < 0).all()) and bool((other[:, 8:] == 0).all())
    mixed = occlusion(model, x, torch.tensor([1, 0]))
    torch.testing.assert_close(mixed[0], other[0])
    torch.testing.assert_close(mixed[1], default[1])
    with pytest.raises(ValueError, match="0..2"):
        occlusion(model, x, 3)
    with pytest.raises(ValueError, match="rows"):
        occlusion(model, x, torch.tensor([0, 1, 2]))


def slow_reference(model, x, target, window, stride, baseline):
    """An explicit loop over window positions (the library builds them with tensor ops)."""
    B, C, H, W = x.shape
    ys = list(range(0, H - window + 1, stride))
    xs = list(range(0, W - window + 1, stride))
    ys += [H - window] if ys[-1] + window < H else []
    xs += [W - window] if xs[-1] + window < W else []
    fill = x.mean(dim=(2, 3), keepdim=True) if baseline == "mean" else torch.full((B, 1, 1, 1), float(baseline))
    with torch.no_grad():
        p0 = model(x).softmax(1)[torch.arange(B), target]
        total, count = torch.zeros(B, H, W), torch.zeros(H, W)
        for y0 in ys:
            for x0 in xs:
                occ = x.clone()
                occ[:, :, y0:y0 + window, x0:x0 + window] = fill.expand(B, C, 1, 1)
                drop = p0 - model(occ).softmax(1)[torch.arange(B), target]
                total[:, y0:y0 + window, x0:x0 + window] += drop[:, None, None]
                count[y0:y0 + window, x0:x0 + window] += 1
    assert bool((count > 0).all())
    return total / count


@pytest.mark.parametrize("baseline", ["mean", 0.0, -1.5])
def test_overlapping_windows_match_a_slow_reference(baseline):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(16, 5)).eval()
    x = torch.randn(3, 3, 9, 10, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 3, 4])
    # 9 rows: starts 0, 2, 4, 6; 10 columns: 0, 2, 4, 6 and the border-flush 7
    m = occlusion(model, x, target, window=3, stride=2, baseline="zero" if baseline == 0.0 else baseline, batch=7)
    ref = slow_reference(model, x, target, 3, 2, baseline)
    torch.testing.assert_close(m, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, occlusion(model, x, target, window=3, stride=2, baseline=baseline, batch=1000))
    assert m[0].unique().numel() > 20  # smooth: not one value per window


def test_argument_checks():
    x = positive_images(H=16, W=12)
    model = TopLeft()
    for kw, msg in [(dict(window=0), "window"), (dict(window=13), "12"), (dict(window=4, stride=5), "stride"),
                    (dict(batch=0), "batch"), (dict(baseline="median"), "baseline")]:
        with pytest.raises(ValueError, match=msg):
            occlusion(model, x, **kw)
    with pytest.raises(ValueError, match="B, C, H, W"):
        occlusion(model, x[0])
    assert occlusion(model, x, window=12).shape == (2, 16, 12)


FAMILY_MODELS = ["nest_tiny_cifar", "vit_tiny_patch4_32", "deit_tiny_patch16_224", "tnt_tiny_patch4_32",
                 "rtnt_nano"]


@pytest.mark.parametrize("name", [*FAMILY_MODELS, "convnet"])
def test_every_family_and_mode_restored(name):
    if name == "convnet":
        torch.manual_seed(0)
        model = nestvit.create_model("convnet", img_size=16, widths=(4, 8), num_classes=5)
    else:
        model = tiny_model(name)
    model.train()
    h, w = model.img_size
    x = torch.randn(2, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))
    m = occlusion(model, x, window=h // 4, batch=20)  # a 4x4 grid: 32 occluded images in two chunks
    assert model.training and all(mod.training for mod in model.modules())
    assert m.shape == (2, h, w) and bool(torch.isfinite(m).all()) and bool(m.abs().amax() > 0)
    model.eval()
    torch.testing.assert_close(m, occlusion(model, x, window=h // 4))  # always run in eval mode
    assert not model.training


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / "cat.png", tmp_path / "dog.png"]
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(paths[1])
    return paths


def test_cli_writes_png_and_json(tmp_path, images, capsys):
    ckpt = save(tmp_path, NEST, "nest.safetensors")
    out = tmp_path / "out"
    assert main(["explain", str(ckpt), *map(str, images), "--method", "occlusion", "--window", "8", "--stride", "4",
                 "--threshold", "0.5", "--class", "2", "--out", str(out), "--json"]) == 0
    for img in images:
        check_png(out / f"{img.stem}_occlusion.png")
    report = json.loads((out / "explain.json").read_text())
    assert report["method"] == "occlusion" and len(report["images"]) == 2
    e = report["images"][0]
    assert e["class"] == 2 and len(e["box"]) == 4 and len(e["top_classes"]) == 4
    assert "->" in capsys.readouterr().out


def test_cli_bad_window(tmp_path, images, capsys):
    ckpt = save(tmp_path, NEST, "nest.safetensors")
    argv = ["explain", str(ckpt), str(images[0]), "--method", "occlusion", "--out", str(tmp_path / "o")]
    assert main([*argv, "--window", "33"]) == 2  # the model's input is 32x32
    err = capsys.readouterr().err
    assert err.count("error") == 1 and "window 33 does not fit the 32x32 image" in err
    with pytest.raises(SystemExit) as exc:  # argparse refuses 0 before anything runs
        main([*argv, "--window", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--window" in err and "must be at least 1" in err
    assert not (tmp_path / "o" / "cat_occlusion.png").exists()
