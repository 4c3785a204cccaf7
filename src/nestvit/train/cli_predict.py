"""``nestvit predict CHECKPOINT IMAGE... [--top-k 5]``: class probabilities of image files.

CHECKPOINT is a run directory or a weights file; ``nestvit.load`` reads the model and its input
transform from it (``nestvit.contract``): each image is decoded to the model's channels, resized (and
zero-padded, or centre-cropped) as the training images were, normalised as in training and classified.
"""

from __future__ import annotations

import argparse

import torch

from ..cli_args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory or a .safetensors file written by nestvit")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--weights", default=None, choices=["best", "last", "ema"],
                        help="which weights of a run directory (default: best, else last)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    from ..contract import load
    from .distributed import resolve_device

    loaded = load(args.checkpoint, args.weights)
    if loaded.contract.kind != "classifier":
        raise ValueError(f"{loaded.weights} holds a {loaded.contract.kind}, not a classifier; predict needs one")
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    batch = loaded.transform.read_batch(args.images)
    with torch.no_grad():
        out = model(loaded.transform(batch.to(device)))
        if isinstance(out, tuple):
            out = (out[0] + out[1]) / 2
        probs = out.float().softmax(dim=1).cpu()
    k = min(args.top_k, probs.shape[1])
    classes = loaded.classes
    width = max(len(c) for c in classes)
    for path, p in zip(args.images, probs):
        top = p.topk(k)
        print(f"{path}:")
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  {classes[index]:>{width}s}  {100 * value:6.2f}%")
    return 0
