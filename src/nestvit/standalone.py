"""Classify images with a nestvit ONNX export where nestvit is not installed: numpy, Pillow and onnxruntime only.

Copy this one file into your service. It reads the run contract that ``nestvit export`` stores in the ONNX file's
metadata (``nestvit.contract``: class names and the input transform) and prepares each image as nestvit's
``InputTransform.read`` does: the same decoding (a JPEG decoded at a reduced scale first, as training's image
folders do; turned upright as its EXIF orientation tag says; 16-bit greyscale scaled, not clipped), resize, centre
crop or zero padding, and normalisation. ``upright``, ``to_mode`` and ``center_crop`` are nestvit's own (its data
pipeline imports them from here), so centre-cropped inputs are the very same pixels; ``stretch`` resizes with
Pillow where nestvit uses torch, within one grey level.
Its probabilities are ``nestvit predict``'s to 1e-3 (nestvit's ``tests/test_standalone.py``).

    python standalone.py model.onnx photo.jpg [more.png photos/ ...]   # an unreadable file is skipped

    from standalone import Classifier
    clf = Classifier("model.onnx", threads=1)
    clf.predict(["photo.jpg"], top_k=3)  # per image: [(class name, probability), ...], most likely first

Only what nestvit itself writes is read: an ONNX file, which onnxruntime runs without executing Python.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

CONTRACT_KEY = "nestvit.contract"
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how a camera held the picture: 1 upright, 2-8 mirrored or turned


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned and mirrored as its EXIF orientation tag says (a phone photo stored sideways), as image
    viewers show it; ``img`` itself when it has no such tag or a damaged EXIF block (its stored pixels).
    A file whose pixels cannot be decoded raises Pillow's error here (``OSError``), as decoding it would."""
    img.load()  # the pixels first, outside the try: a damaged image must fail, not pass half-decoded
    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # a damaged EXIF block (cameras and editors write odd ones): the pixels as stored
        return img


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as ``"L"`` or ``"RGB"``; 16-bit greyscale scaled by 255/65535 and float greyscale in [0, 1] by 255
    (Pillow's own conversion clips them to 0..255)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I"):
            a = a * (255 / 65535)
        elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return img.convert(mode)


def center_crop(img: Image.Image, size: int, side: int, interpolation: str = "bilinear") -> Image.Image:
    """``img`` with its shorter side resized to ``side`` (Pillow's ``interpolation`` filter, bilinear or bicubic,
    ``reducing_gap=3``) and the centre ``size x size`` cropped: the evaluation view of image-folder training
    (bilinear) and of published ImageNet weights (bicubic, as timm evaluates them)."""
    w, h = img.size
    scale = side / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[interpolation]
    img = img.resize((new_w, new_h), resample, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _stretch(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """uint8 ``(H, W, C)`` resized to ``(h, w, C)``: antialiased bilinear on floats, rounded half to even."""
    if a.shape[:2] == (h, w):
        return a
    planes = [np.asarray(Image.fromarray(a[..., c].astype(np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR)) for c in range(a.shape[2])]
    return np.clip(np.rint(np.stack(planes, axis=-1)), 0, 255).astype(np.uint8)


def prepare(path: str, transform: dict[str, Any]) -> np.ndarray:
    """float32 ``(C, H, W)``: the model's input for one image file, as the contract's ``transform`` says."""
    channels, (H, W) = transform["channels"], transform["size"]
    mode = "L" if channels == 1 else "RGB"
    ch, cw = transform.get("content") or (H, W)
    if ch > H or cw > W:
        raise ValueError(f"input transform: content {ch}x{cw} is larger than the input size {H}x{W}")
    turn = upright if transform.get("exif_orientation", False) else (lambda img: img)  # older contracts: as stored
    with Image.open(os.path.expanduser(path)) as img:
        if transform["resize"] == "center-crop":  # image folders: shorter side to size / crop_pct, centre crop
            side = round(H / transform["crop_pct"])
            img.draft(mode, (side, side))  # a JPEG decodes at a reduced scale, as in training
            a = np.asarray(center_crop(to_mode(turn(img), mode), H, side, transform.get("interpolation", "bilinear")),
                           dtype=np.uint8)
            a = a[..., None] if a.ndim == 2 else a
        else:  # "stretch" (in-memory data sets): resized to content, whatever the aspect ratio, zero-padded
            a = np.asarray(to_mode(turn(img), mode), dtype=np.uint8)
            a = a[..., None] if a.ndim == 2 else a
            a = _stretch(a, ch, cw)
            top, left = (H - ch) // 2, (W - cw) // 2
            a = np.pad(a, ((top, H - ch - top), (left, W - cw - left), (0, 0)))
    mean = np.asarray(transform["mean"], dtype=np.float32)
    std = np.asarray(transform["std"], dtype=np.float32)
    x = (a.astype(np.float32) / np.float32(255) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


class Classifier:
    """A nestvit ONNX export with its contract: ``predict(paths)`` -> each image's top classes."""

    def __init__(self, onnx_path: str, *, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default, every core
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if CONTRACT_KEY not in meta:
            raise ValueError(f"{onnx_path}: no {CONTRACT_KEY} metadata; export it with `nestvit export`")
        contract = json.loads(meta[CONTRACT_KEY])
        if contract.get("kind", "classifier") != "classifier" or not contract.get("transform"):
            raise ValueError(f"{onnx_path}: holds a {contract.get('kind')} without an input transform; this file runs "
                             "classifiers")
        self.transform = contract["transform"]
        n = self.session.get_outputs()[0].shape[-1]
        self.classes = contract.get("classes") or [f"class{k}" for k in range(int(n))]
        self.input_name = self.session.get_inputs()[0].name

    def probabilities(self, paths: Sequence[str], batch: int = 64) -> np.ndarray:
        """float32 ``(N, classes)`` softmax probabilities of the image files, ``batch`` at a time."""
        return np.concatenate([self.run(np.stack([prepare(p, self.transform) for p in paths[i:i + batch]]))
                               for i in range(0, len(paths), batch)])

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """float32 ``(B, classes)`` softmax probabilities of prepared inputs ``(B, C, H, W)`` (:func:`prepare`)."""
        logits = self.session.run(None, {self.input_name: inputs})[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, paths: Sequence[str], top_k: int = 1) -> list[list[tuple[str, float]]]:
        """Each image's ``top_k`` ``(class name, probability)`` pairs, most likely first."""
        out = []
        for p in self.probabilities(paths):
            order = np.argsort(-p, kind="stable")[:top_k]
            out.append([(self.classes[i], float(p[i])) for i in order])
        return out


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def main(argv: Sequence[str]) -> int:
    """The command line: the top 3 classes of each image file given (a folder: its image files, any depth); a
    file that cannot be read is skipped with a line on stderr. Exit status 0, or 1 when no image could be read."""
    if len(argv) < 2:
        print("usage: python standalone.py MODEL.onnx IMAGE_OR_FOLDER [...]", file=sys.stderr)
        return 2
    clf = Classifier(argv[0])
    paths: list[str] = []
    for arg in argv[1:]:
        if os.path.isdir(arg):  # hidden files and folders (.ipynb_checkpoints) left out, as nestvit does
            for root, dirs, files in os.walk(arg):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                paths += sorted(os.path.join(root, f) for f in files
                                if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
        else:
            paths.append(arg)
    read = 0
    for i in range(0, len(paths), 64):
        ready: list[tuple[str, np.ndarray]] = []
        for path in paths[i:i + 64]:
            try:
                ready.append((path, prepare(path, clf.transform)))
            except (OSError, ValueError, SyntaxError) as e:  # missing, not an image, damaged
                print(f"skipped {path}: {e}", file=sys.stderr)
        if ready:
            for (path, _), p in zip(ready, clf.run(np.stack([x for _, x in ready]))):
                top = np.argsort(-p, kind="stable")[:3]
                print(path + ": " + ", ".join(f"{clf.classes[k]} {100 * p[k]:.2f}%" for k in top))
            read += len(ready)
    if not read:
        print("no image could be read", file=sys.stderr)
    return 0 if read else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
