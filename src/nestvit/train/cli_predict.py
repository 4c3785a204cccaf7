"""``nestvit predict CHECKPOINT IMAGE|FOLDER... [--top-k 5] [--out predictions.csv]``: class probabilities.

CHECKPOINT is a run directory or a weights file; ``nestvit.load`` reads the model and its input
transform from it (``nestvit.contract``); an ``.onnx`` file of ``nestvit export`` runs in onnxruntime with
the contract stored in it: each image is decoded to the model's channels, resized (and
zero-padded, or centre-cropped) as the training images were, normalised as in training and classified,
``--batch-size`` images at a time. A folder stands for every image file below it (sorted). Without
``--out`` the top classes are printed per image; with it they are written to a CSV file (``path, class_1,
prob_1, ..., class_k, prob_k``) or a JSON Lines file (one ``{"path", "top": [{"class", "prob"}, ...]}`` per
image), chosen by the file's suffix, written atomically.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import torch

from ..cli_args import add_threads, image_files, positive_int
from ..data.augment import TTA_MODES

OUT_FORMATS = (".csv", ".jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run directory, a save_pretrained folder (or hf-hub:org/name), a "
                                           ".safetensors file written by nestvit, or an .onnx file of nestvit export")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image files (PNG, JPEG, ...) or folders (every image file below them)")
    parser.add_argument("--top-k", type=positive_int, default=5, help="classes per image (default 5)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--tta", default="none", choices=TTA_MODES,
                        help="test-time augmentation, as nestvit eval --tta: the mean of the softmax outputs of "
                             "each image's views (flip 2, shift 9, flip-shift 18); default none")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write the predictions to FILE (.csv or .jsonl) instead of printing them")
    parser.add_argument("--weights", default=None, choices=["best", "last", "ema"],
                        help="which weights of a run directory (default: best, else last)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add_threads(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..cli_args import SkippedImages, note_weights_of_a_file, writable_dir
    from ..contract import load
    from ..fileio import atomic_write_text
    from .distributed import resolve_device
    from .loop import view_logits

    if args.out is not None and args.out.suffix.lower() not in OUT_FORMATS:
        raise ValueError(f"--out {args.out}: write a .csv or a .jsonl file")
    if args.out is not None and args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a folder; give a file name such as {args.out / 'predictions.csv'}")
    if args.out is not None:
        writable_dir(args.out.parent)  # fail now, not after every image has been classified
    loaded = load(args.checkpoint, note_weights_of_a_file(args.checkpoint, args.weights))
    if loaded.contract.kind != "classifier":
        raise ValueError(f"{loaded.weights} holds a {loaded.contract.kind}, not a classifier; predict needs one")
    print(f"weights: {loaded.describe()}")
    run_tta = getattr(loaded.config, "tta", "none") or "none"
    if run_tta != "none" and args.tta == "none":
        print(f"note: this run's results include {run_tta} test-time augmentation (summary.json test_top1_tta); "
              f"--tta {run_tta} predicts that way", file=sys.stderr)
    paths = image_files(args.images)
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    classes = loaded.classes
    k = min(args.top_k, len(classes))
    rows: list[tuple[Path, list[tuple[str, float]]]] = []
    skipped = SkippedImages()  # an unreadable file does not cost the others their predictions
    starts = range(0, len(paths), args.batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=len(starts) < 2 or None, leave=False):
        kept, batch = skipped.read(loaded.transform, paths[start:start + args.batch_size])
        if not kept:
            continue
        chunk = [paths[start + i] for i in kept]
        with torch.no_grad():
            out = view_logits(model, batch.to(device), loaded.transform.mean, loaded.transform.std, args.tta)
            probs = out.float().softmax(dim=1).cpu()
        for path, p in zip(chunk, probs):
            top = p.topk(k)
            rows.append((path, [(classes[i], v) for v, i in zip(top.values.tolist(), top.indices.tolist())]))
    skipped.report(len(rows))
    if args.out is None:
        width = max((len(name) for _, top in rows for name, _ in top), default=0)  # of the names shown
        for path, top in rows:
            print(f"{path}:")
            for name, value in top:
                print(f"  {name:>{width}s}  {100 * value:6.2f}%")
        return 0
    if args.out.suffix.lower() == ".csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["path", *[f"{what}_{j}" for j in range(1, k + 1) for what in ("class", "prob")]])
        for path, top in rows:
            writer.writerow([str(path), *[x for name, value in top for x in (name, f"{value:.6f}")]])
        atomic_write_text(args.out, text.getvalue())
    else:
        atomic_write_text(args.out, "".join(json.dumps({"path": str(path), "top": [
            {"class": name, "prob": round(value, 6)} for name, value in top]}) + "\n" for path, top in rows))
    print(f"wrote {args.out} ({len(rows)} images, top {k} of {len(classes)} classes"
          + (f"; {len(skipped)} unreadable skipped" if skipped else "") + ")")
    return 0
