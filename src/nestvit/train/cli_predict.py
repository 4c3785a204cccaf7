"""``nestvit predict CHECKPOINT IMAGE... [--top-k 5]``: class probabilities of image files.

Each image is opened with Pillow, converted to grayscale or RGB to match the model's input
channels, resized (bilinear) to the size the model was trained on (and zero-padded as the training
images were, for runs with ``data.pad_to``), normalised as in training and classified.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory or a .safetensors file written by nestvit train")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--weights", default="best", choices=["best", "last", "ema"],
                        help="which weights of a run directory (default: best, else last)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def load_image(path: Path, *, channels: int, size: tuple[int, int], pad_to: int | None = None,
               unpadded: tuple[int, int] | None = None) -> torch.Tensor:
    """``(channels, H, W)`` uint8 of an image file, resized (and padded) to what the model expects."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    h, w = unpadded if (pad_to and unpadded) else size
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels}-channel input; predict handles 1 (grayscale) or 3 (RGB)")
    x = torch.from_numpy(array.copy())
    x = x[None] if channels == 1 else x.permute(2, 0, 1)
    if pad_to and unpadded:
        top, left = (size[0] - h) // 2, (size[1] - w) // 2
        x = torch.nn.functional.pad(x, (left, size[1] - w - left, top, size[0] - h - top))
    return x.contiguous()


def run(args: argparse.Namespace) -> int:
    from ..data.augment import eval_transform
    from .distributed import resolve_device
    from .runs import load_trained

    if args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    trained = load_trained(args.checkpoint, args.weights)
    device = resolve_device(args.device)
    model = trained.model.to(device)
    size = tuple(model.img_size)
    batch = torch.stack([load_image(Path(p), channels=model.in_chans, size=size, pad_to=trained.pad_to,
                                    unpadded=trained.unpadded) for p in args.images])
    with torch.no_grad():
        out = model(eval_transform(batch.to(device), trained.mean, trained.std))
        if isinstance(out, tuple):
            out = (out[0] + out[1]) / 2
        probs = out.float().softmax(dim=1).cpu()
    k = min(args.top_k, probs.shape[1])
    width = max(len(c) for c in trained.classes)
    for path, p in zip(args.images, probs):
        top = p.topk(k)
        print(f"{path}:")
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {trained.classes[index]:>{width}s}  {100 * value:6.2f}%")
    return 0
