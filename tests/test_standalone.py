"""``nestvit/standalone.py``: an ONNX export classified without nestvit gives ``nestvit predict``'s probabilities.

The file is run as a user's service runs it: imported from its own path, with nestvit's modules hidden from it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nestvit
from nestvit.cli import main
from nestvit.contract import InputTransform, RunContract
from nestvit.interop import save_weights

pytest.importorskip("onnxruntime", reason="install the test extras: pip install -e '.[test]'")
STANDALONE = Path(nestvit.__file__).parent / "standalone.py"
KW = dict(img_size=16, num_classes=3, patch_size=2, num_levels=2, block_size=4, embed_dims=8, num_heads=2, depths=1)


def _images(folder: Path) -> list[Path]:
    """Files that exercise each decoding step: RGB and greyscale PNGs of odd sizes, smaller than the input too
    (upscaled), a JPEG (decoded at a reduced scale), a JPEG stored sideways with its EXIF orientation tag (turned
    upright), a 16-bit PNG (scaled, not clipped), an RGBA PNG, a palette GIF."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    smooth = lambda h, w, c: np.clip(rng.normal(128, 40, (h // 8 + 1, w // 8 + 1, c)).repeat(8, 0).repeat(8, 1)
                                     [:h, :w] + rng.normal(0, 20, (h, w, c)), 0, 255).astype(np.uint8)
    files = {"rgb.png": Image.fromarray(smooth(40, 30, 3)), "grey.png": Image.fromarray(smooth(23, 57, 1)[..., 0]),
             "photo.jpg": Image.fromarray(smooth(257, 300, 3)), "rgba.png": Image.fromarray(smooth(20, 20, 4)),
             "wide16.png": Image.fromarray(rng.integers(0, 65535, (30, 70)).astype(np.uint16)),
             "palette.gif": Image.fromarray(smooth(33, 33, 3)).convert("P"),
             "small.png": Image.fromarray(smooth(7, 9, 3)), "strip.png": Image.fromarray(smooth(5, 40, 1)[..., 0])}
    for name, img in files.items():
        img.save(folder / name, quality=90) if name.endswith(".jpg") else img.save(folder / name)
    tags = Image.Exif()
    tags[0x0112] = 6  # turn 90 degrees clockwise to view
    Image.fromarray(smooth(300, 200, 3)).save(folder / "sideways.jpg", quality=90, exif=tags.tobytes())
    return [folder / n for n in [*files, "sideways.jpg"]]


@pytest.mark.parametrize("transform", [
    InputTransform(channels=3, size=(16, 16), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), resize="center-crop"),
    InputTransform(channels=1, size=(16, 16), mean=(0.3,), std=(0.35,), content=(12, 12)),  # stretch, padded
    InputTransform(channels=3, size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, resize="stretch"),
    InputTransform(channels=3, size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, resize="center-crop", crop_pct=0.9,
                   interpolation="bicubic"),  # published ImageNet weights' evaluation view
], ids=["center-crop-rgb", "stretch-grey-padded", "stretch-rgb", "center-crop-bicubic"])
def test_standalone_matches_predict(transform, tmp_path, capsys):
    torch.manual_seed(0)
    model = nestvit.create_model("nest_tiny_cifar", in_chans=transform.channels, **KW)
    contract = RunContract(model="nest_tiny_cifar", kwargs={**KW, "in_chans": transform.channels},
                           classes=("ant", "bee", "cat"), transform=transform)
    weights = save_weights(model, tmp_path / "run" / "best.safetensors", contract=contract)
    assert main(["export", str(weights.parent), "--format", "onnx"]) == 0
    images = _images(tmp_path / "images")

    spec = importlib.util.spec_from_file_location("standalone", STANDALONE)
    standalone = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(standalone)
    clf = standalone.Classifier(str(weights.parent / "model.onnx"), threads=1)
    assert clf.classes == ["ant", "bee", "cat"]
    loaded = nestvit.load(weights.parent / "model.onnx")
    for path in images:  # the very pixels, then the probabilities
        want = loaded.transform(loaded.transform.read_batch([path]))[0].numpy()
        got = standalone.prepare(str(path), clf.transform)
        step = 1 / 255 / min(transform.std)  # one grey level
        assert got.shape == want.shape and np.abs(got - want).max() <= step * 1.001, path.name
    want = loaded.model(loaded.transform(loaded.transform.read_batch(images))).softmax(-1).numpy()
    assert np.abs(clf.probabilities([str(p) for p in images]) - want).max() < 1e-3
    top = clf.predict([str(images[0])], top_k=2)[0]
    assert [name for name, _ in top] == [loaded.classes[i] for i in np.argsort(-want[0])[:2]]


def test_standalone_runs_without_nestvit(weights, tmp_path, capsys):
    """As a script, in a process where ``import nestvit`` and ``import torch`` fail."""
    assert main(["export", str(weights.parent), "--format", "onnx"]) == 0
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(image)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("nestvit", "torch"):
        (blocker / f"{name}.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    def script(*args):
        return subprocess.run([sys.executable, str(STANDALONE), str(weights.parent / "model.onnx"), *map(str, args)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={"PYTHONPATH": str(blocker), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})

    run = script(image)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"{image}: ") and run.stdout.count("%") == 3
    # a folder: its image files at any depth (hidden ones left out); an unreadable file is skipped, not fatal
    folder = tmp_path / "photos"
    (folder / "sub" / ".ipynb_checkpoints").mkdir(parents=True)
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(folder / "sub" / "y.png")
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(folder / "sub" / ".ipynb_checkpoints" / "y.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not listed")
    run = script(image, folder, tmp_path / "missing.jpg")
    assert run.returncode == 0, run.stderr
    assert [line.split(": ")[0] for line in run.stdout.splitlines()] == [str(image), str(folder / "sub" / "y.png")]
    assert f"skipped {folder / 'broken.png'}: " in run.stderr and f"skipped {tmp_path / 'missing.jpg'}: " in run.stderr
    assert "Traceback" not in run.stderr
    run = script(folder / "broken.png")
    assert run.returncode == 1 and "no image could be read" in run.stderr
