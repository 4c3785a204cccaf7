"""``nestvit eval CHECKPOINT [--data NAME|FOLDER] [--root PATH] [--split test]``: accuracy of a trained model.

CHECKPOINT is a run directory (its ``best.safetensors`` by default, see ``--weights``), a weights file or
an ONNX file of ``nestvit export``; ``nestvit.load`` reads the model and its input transform from it
(``nestvit.contract``). ``--data`` names a data set, or a folder or CSV file of images: the run's own folder
is evaluated as in training (its hold-out), another folder whole (or its val or test split); image files are
decoded by the model's input transform, as ``nestvit predict`` decodes them.
Prints loss, top-1, top-5 and per-class accuracy; ``--out DIR`` also writes the confusion matrix as
JSON and PNG. ``--tta flip|shift|flip-shift`` averages each image's softmax output over its mirror
image and/or its one-pixel shifts (test-time augmentation; ``--flip-tta`` is ``--tta flip``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..cli_args import add_threads, output_stems, positive_int, writable_dir
from ..contract import InputTransform
from ..data.augment import TTA_MODES, tta_views
from ..data.folders import Layout
from ..fileio import atomic_write_text, json_text
from ..system import resolve_precision, slow_bf16
from .config import PRECISIONS, DataSection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="a run directory, a save_pretrained folder (or hf-hub:org/name), a .safetensors file "
                             "written by nestvit, or an .onnx file of nestvit export (run by onnxruntime); several: "
                             "each evaluated, then a table of all")
    parser.add_argument("--data", help="data set name, or a folder or CSV file of your images (as --data imagefolder "
                                       "--root PATH; a folder of tar shards: webdataset); default: the one the "
                                       "run trained on")
    parser.add_argument("--root", help="data directory (default: the run's data.root, else the default root); "
                                       "without --data, when the run's data.root is gone: the run's own data moved "
                                       "there, its splits, hold-out and class order kept")
    parser.add_argument("--split", default=None, help="split to evaluate (default: the run's eval split, e.g. its "
                             "holdout; else the data's test split; another image folder's val or test split, else "
                             "all of it)")
    parser.add_argument("--weights", default=None, choices=["best", "last", "ema"],
                        help="which weights of a run directory (default: best, else last)")
    parser.add_argument("--batch-size", type=positive_int, default=500, help="images per forward pass (default 500)")
    parser.add_argument("--tta", default="none", choices=TTA_MODES,
                        help="test-time augmentation: average the softmax outputs of each image's views; "
                             + "; ".join(f"{k}: {v} ({len(tta_views(k))})" for k, v in TTA_MODES.items())
                             + ". Moves bring zeros in, as training's padded crops; flip suits mirror-symmetric "
                               "classes. Default: none")
    parser.add_argument("--flip-tta", dest="tta", action="store_const", const="flip", help="the same as --tta flip")
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="fp32, or bf16/fp16 autocast (what such a run's own evaluations use), or auto: bf16 "
                             "where the device has fast bf16 kernels, else fp32; default fp32")
    parser.add_argument("--limit", type=positive_int, help="evaluate only the first N images")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    add_threads(parser)
    parser.add_argument("--out", metavar="DIR", help="write eval.json and confusion.png here (several checkpoints: "
                                                     "in a folder each, and comparison.json)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


def run(args: argparse.Namespace) -> int:
    from .metrics import unequal_sizes

    out = writable_dir(args.out) if args.out else None  # fail now, not after the evaluation
    if len(args.checkpoints) == 1:
        evaluate_one(args, args.checkpoints[0], out)
        return 0
    names = output_stems([Path(c).resolve() for c in args.checkpoints])
    rows = []
    for checkpoint, name in zip(args.checkpoints, names):
        rows.append(evaluate_one(args, checkpoint, out / name if out is not None else None))
        print()
    width = max(len(c) for c in [*args.checkpoints, "checkpoint"])
    ks = [min(5, len(r["classes"])) for r in rows]  # top-5 of fewer classes: top-k of all of them
    same_k = len(set(ks)) == 1
    top_k = f"top-{ks[0]}" if same_k else "top-k"  # runs of 3 and 10 classes: each row says its k
    balanced = any(unequal_sizes(r["per_class_count"].values()) for r in rows)  # classes of unequal size
    print(f"{'checkpoint':<{width}}  {'data':<24}  {'images':>6}  {'top-1':>7}  {top_k:>{7 if same_k else 11}}  "
          f"{'loss':>7}" + (f"  {'balanced':>8}" if balanced else ""))
    for c, r, k in zip(args.checkpoints, rows, ks):
        print(f"{c:<{width}}  {r['data']:<24}  {r['count']:>6}  {r['top1']:>6.2f}%  {r['top5']:>6.2f}%"
              + ("" if same_k else f" (k={k})") + f"  {r['loss']:>7.4f}"
              + ((f"  {r['balanced_top1']:>7.2f}%" if r["balanced_top1"] is not None else f"  {'n/a':>8}")
                 if balanced else ""))
    if len({(r["data"], r["count"], tuple(r["classes"])) for r in rows}) > 1:
        print("note: the checkpoints were evaluated on different data (each on its own run's; --data and --split "
              "put them on the same images)", file=sys.stderr)
    if out is not None:
        table = [{"checkpoint": c, **{k: r[k] for k in ("weights", "data", "count", "top1", "top5", "loss",
                                                         "balanced_top1")},
                  "top_k": k} for c, r, k in zip(args.checkpoints, rows, ks)]  # top5 holds the top-k
        atomic_write_text(out / "comparison.json", json.dumps(table, indent=1) + "\n")
        print(f"wrote {out / 'comparison.json'}")
    return 0


def evaluate_one(args: argparse.Namespace, checkpoint: str, out: Path | None) -> dict:
    """Evaluate one checkpoint as ``args`` say, print its numbers (and write them to ``out``); its record."""
    from ..cli_args import note_weights_of_a_file
    from ..contract import UnreadableImageError, load
    from ..data.datasets import unreadable_summary
    from ..errors import listed
    from ..export import OnnxModel
    from .cli_train import one_line_errors
    from .distributed import DistInfo, resolve_device
    from .inputs import is_streamed, load_split
    from .loop import evaluate
    from .plots import plot_confusion

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    loaded = load(checkpoint, note_weights_of_a_file(checkpoint, args.weights))
    if loaded.contract.kind != "classifier":
        raise ValueError(f"{loaded.weights} holds a {loaded.contract.kind}, not a classifier; eval needs one"
                         + ("; a GAN's FID/KID/IS: nestvit generate eval RUN" if loaded.contract.kind in
                            ("generator", "discriminator") else ""))
    transform = loaded.transform
    run_data = loaded.config.data if loaded.config is not None and hasattr(loaded.config, "data") else None
    name, root = data_and_root(args.data, args.root)
    name = name or (run_data.name if run_data else loaded.contract.info.get("data"))
    if not name:
        raise ValueError(f"{loaded.weights} does not say which data set it was trained on; pass --data NAME (or a "
                         "folder of your images)")
    # the run's own data (its splits, hold-out and class order) when this is the same data set in the same place
    # (--root alone where the run's data is gone: the run's data, moved there)
    moved = args.data is None and run_data is not None and run_data.root is not None \
        and not Path(run_data.root).exists()
    same = run_data if run_data is not None and name == run_data.name and (
        root is None or run_data.root is None or moved
        or Path(root).resolve() == Path(run_data.root).resolve()) else None
    split = args.split or (same.eval_split if same is not None else None)  # None: the data's evaluation split
    root = root or (same.root if same is not None else None)
    if name in ("imagefolder", "webdataset") and root is None:
        raise ValueError(f"{loaded.weights}: which {name} to evaluate on? pass --data FOLDER (or --data {name} "
                         "--root PATH)")
    section = eval_section(name, root, transform, same)
    if same is None and name in ("imagefolder", "webdataset"):
        # another folder of images than the run's: all of it is evaluation data (its val or test split if it has one)
        from ..data.folders import HOLDOUT, eval_split_of, split_folder

        layout = _layout(name, root, "train")
        if split is None:
            split = eval_split_of(layout, "train") or split_folder(layout, "train")
            if loaded.config is None and split == split_folder(layout, "train"):  # a model without its run
                print(f"note: all of {root} is scored: {loaded.weights} alone does not say which of its images it "
                      f"trained on. If they are among them, score its hold-out: its run folder does (nestvit eval "
                      f"RUN), or --split {HOLDOUT} (each class's {DataSection.holdout:g} share drawn from the file "
                      "names, as training's data.holdout default draws it)", file=sys.stderr)
        share = run_data.holdout if run_data is not None else DataSection.holdout  # the run's, else the default
        holdout = share if args.split == HOLDOUT else 0.0  # drawn from the file names, as training draws it
        section = dataclasses.replace(section, holdout=holdout, eval_split=split)
    if args.split is not None and name in ("imagefolder", "webdataset"):  # said with the flag's name
        from ..data.folders import HOLDOUT, check_split, split_folder

        layout = _layout(name, root, section.train_split)
        check_split(layout, split_folder(layout, args.split), section.holdout, key="--split", name=name)
        if split_folder(layout, args.split) == HOLDOUT and layout.split_folders and same is not None \
                and same.eval_split != HOLDOUT:  # the run trained on every image of its train split
            trained = split_folder(layout, section.train_split)
            raise ValueError(f"--split {HOLDOUT}: {loaded.weights} trained on all of {root}'s {trained} split (it "
                             f"was evaluated on {same.eval_split}), so it held no images out; evaluate --split "
                             f"{same.eval_split}, or train with data.eval_split={HOLDOUT} to keep a hold-out")
    if isinstance(loaded.model, OnnxModel) and args.precision != "fp32":
        raise ValueError(f"--precision {args.precision}: {loaded.weights} is an ONNX file; onnxruntime runs it in "
                         "float32 as exported")
    device = resolve_device(args.device)
    model = loaded.model.to(device)
    precision = resolve_precision(args.precision, device)
    if precision == "bf16" and (warning := slow_bf16(device, "--precision auto (fp32 here)")):
        print(warning, file=sys.stderr)
    classes = loaded.classes
    if is_streamed(name):  # files are decoded to the model's channels (below), not to what the folder's look like
        section = dataclasses.replace(section, channels=transform.channels)
    named = loaded.contract.classes is not None  # else: the folder's classes, by position
    if is_streamed(name) and not named:
        print(f"note: {loaded.describe()} records no class names: the folder's classes, sorted, are its outputs "
              f"0..{len(classes) - 1} in that order", file=sys.stderr)
    ids = _wordnet_ids(loaded, name, section, split)  # ImageNet's class folders n01440764, ...: by id, not by name
    with one_line_errors():
        data = load_split(section, split, device, classes=ids or (classes if is_streamed(name) and named else None),
                          limit=args.limit, model_classes=True)
    if ids:  # the same classes, in the same order: said by name
        data = dataclasses.replace(data, classes=classes)
    for note in data.notes:  # classes of the data the model does not have, or the reverse
        print(note, file=sys.stderr)
    if same is not None and same.limit_eval is not None and args.limit is None and len(data) > same.limit_eval:
        print(f"note: the run was evaluated on the first {same.limit_eval} images of {data.name} (data.limit_eval); "
              f"this is all {len(data)} of them, so its numbers differ; --limit {same.limit_eval} repeats the run's",
              file=sys.stderr)
    if data.folder is not None:  # image files: decoded as the model's contract says, as `nestvit predict` does
        data.folder.reader = transform.read
        data = dataclasses.replace(data, channels=transform.channels, size=transform.size)
    if data.stream is not None:  # tar shards: centre-cropped and turned upright (or not) as the contract says
        data.stream.resize_size = round(data.stream.size / transform.crop_pct)
        data.stream.exif_orientation = transform.exif_orientation
        data.stream.interpolation = transform.interpolation
    if len(data.classes) != len(classes):
        raise ValueError(f"{name} has {len(data.classes)} classes but the model was trained on {len(classes)}")
    if data.folder is None and data.stream is None and loaded.contract.classes is not None:
        _check_same_classes(loaded, name, data.classes)
    try:
        result = evaluate(model, data, mean=transform.mean, std=transform.std, batch=args.batch_size,
                          info=DistInfo(device=device), precision=precision, tta=args.tta)
    except UnreadableImageError as e:  # every unreadable file of the folder, not the first one only
        if data.folder is None:
            raise
        _, said = unreadable_summary([path for path, _ in data.folder.samples])
        also = f"; {said}" if said else ""
        raise UnreadableImageError(f"{e}{also}; replace {'them' if also else 'it'} or remove "
                                   f"{'them' if also else 'it'} from {data.folder.root}, then evaluate again") from None
    tta = f", {args.tta} TTA ({len(tta_views(args.tta))} views)" if args.tta != "none" else ""
    tta += f", {precision}" if precision != "fp32" else ""
    print(f"{loaded.describe()} on {data.name} ({result.count} images{tta}): loss {result.loss:.4f}  "
          f"top-1 {result.top1:.2f}%" + (f"  top-5 {result.top5:.2f}%" if len(data.classes) > 5 else ""))
    print("per-class accuracy:")
    counts = result.per_class_count
    empty = [c for c, acc in result.per_class.items() if math.isnan(acc)]
    folded = set(empty) if len(empty) > 10 else set()  # a few of many classes (Imagenette's 10 of ImageNet's
    width = max((len(c) for c in data.classes if c not in folded), default=0)  # 1,000): the others on one line
    for cls, acc in result.per_class.items():
        if cls not in folded:
            print(f"  {cls:>{width}s}  " + ("   n/a  (no images)" if math.isnan(acc) else
                                            f"{acc:6.2f}%  of {counts[cls]:,} image{'s' if counts[cls] != 1 else ''}"))
    if folded:
        print(f"  n/a (no images): {len(empty):,} classes ({listed(empty, 4)})")
    if result.unequal:  # classes of unequal size: top-1 favours the large ones
        print(f"balanced accuracy (the mean of the per-class accuracies, each class counting the same): "
              f"{result.balanced_top1:.2f}%")
    record = {"weights": str(loaded.weights), "data": data.name, "tta": args.tta, "precision": precision,
              **result.to_json()}
    if out is not None:
        atomic_write_text(out / "eval.json", json_text(record) + "\n")
        shown = [i for i, c in enumerate(result.classes) if c not in folded]  # many classes: those with images
        elsewhere = sum(sum(row) - sum(row[j] for j in shown) for row in (result.confusion[i] for i in shown))
        plot_confusion([[result.confusion[i][j] for j in shown] for i in shown], [result.classes[i] for i in shown],
                       out / "confusion.png", title=f"{data.name}: top-1 {result.top1:.2f}%" + (
                           f"\n{len(shown)} classes with images; {elsewhere} predicted as others" if folded else ""))
        print(f"wrote {out / 'eval.json'} and {out / 'confusion.png'}")
    return record


def _check_same_classes(loaded: Any, name: str, have: list[str]) -> None:
    """A built-in data set is scored by label index: refuse one whose classes are not the model's (another data
    set's digits scored as clothes), warn where only some names differ."""
    from ..data.datasets import same_name
    from ..errors import listed

    want = list(loaded.contract.classes)
    if [same_name(c) for c in want] == [same_name(c) for c in have]:
        return
    trained = loaded.contract.info.get("data")
    want_at = {same_name(c): i for i, c in enumerate(want)}
    have_at = {same_name(c): i for i, c in enumerate(have)}
    shared = want_at.keys() & have_at.keys()
    if not shared or any(want_at[c] != have_at[c] for c in shared):  # other classes, or shared ones at other outputs
        raise ValueError(f"{name}'s classes ({listed(have, 4)}) are not the model's ({listed(want, 4)}"
                         + (f", of {trained}" if trained else "") + "): its scores would compare other classes"
                         + (f"; evaluate it on --data {trained}" if trained and trained != name else ""))
    differ = [c for c in want if same_name(c) not in have_at]
    print(f"warning: the model's classes {listed(differ, 4)} are not among {name}'s; images are scored by label "
          "index", file=sys.stderr)


def _wordnet_ids(loaded: Any, name: str, section: DataSection, split: str | None) -> list[str] | None:
    """ImageNet-1k weights (published ones, or saved from them) scored on class folders named by WordNet id, as
    ImageNet's own layout and its subsets (Imagenette) name them: the ids in the model's output order, which
    number the folders' classes (other folders' images are skipped, with a warning); else None (folders are
    matched to the model's classes by name: a folder named by neither is skipped)."""
    from ..data.folders import HOLDOUT, _subdirs, default_eval_split, find_layout, split_folder
    from ..pretrained import imagenet_classes

    ids, names = imagenet_classes()
    if name != "imagefolder" or loaded.contract.classes is None or tuple(loaded.contract.classes) != names:
        return None
    layout = find_layout(section.root, section.train_split)
    if layout.kind not in ("splits", "classes"):
        return None
    split = split_folder(layout, split or section.eval_split
                         or default_eval_split(layout, section.train_split, section.holdout))
    folder = layout.root / split_folder(layout, section.train_split if split == HOLDOUT else split) \
        if layout.kind == "splits" else layout.root
    found = {p.name for p in _subdirs(folder)} if folder.is_dir() else set()  # hidden folders left out, as read
    return list(ids) if found & set(ids) and not found & set(names) else None


def _layout(name: str, root: str, train_split: str) -> Layout:
    """The layout of an image folder (``name`` imagefolder) or of tar shards (webdataset) at ``root``."""
    from ..data.folders import find_layout
    from ..data.shards import find_shard_layout

    return find_layout(root, train_split) if name == "imagefolder" else find_shard_layout(root)[0]


def data_and_root(data: str | None, root: str | None) -> tuple[str | None, str | None]:
    """``--data`` / ``--root`` as a data set name and its root: a folder or CSV file given as ``--data`` is
    ``imagefolder`` with that root (a built-in data set's name wins over a folder of the same name)."""
    from ..data.datasets import DATASETS

    if root is not None and not Path(root).exists():
        raise ValueError(f"--root {root}: no such folder")
    if data is None or data in DATASETS or data == "synthetic":
        return data, root
    if not Path(data).exists():
        raise ValueError(f"--data {data}: neither a data set ({', '.join(DATASETS)}, synthetic) nor a folder or CSV "
                         "file of images")
    if root is not None and Path(root).resolve() != Path(data).resolve():
        raise ValueError(f"--data {data} is a folder of images and --root {root} another; give one of them")
    from ..data.shards import holds_shards

    return ("webdataset" if holds_shards(data) else "imagefolder"), data


def eval_section(name: str, root: str | None, transform: InputTransform, run: DataSection | None = None
                 ) -> DataSection:
    """The data section that prepares ``name``'s images as the model's transform says: image folders at the
    transform's size (each file then decoded by the transform itself, see ``run``); shards resized and
    centre-cropped; in-memory sets resized to the transform's content size, then zero-padded. ``run``: the
    run's own data section (the same data set), whose splits, hold-out and class list it keeps, so that the
    evaluation finds the run's hold-out."""
    from .config import DataSection

    kept = {} if run is None else {"train_split": run.train_split, "eval_split": run.eval_split,
                                   "holdout": run.holdout, "classes": run.classes}
    size = transform.size[0]
    if transform.resize == "center-crop" or name == "imagefolder":  # image files: read by the transform itself
        return DataSection(name=name, root=root, img_size=size, **kept)
    content = (transform.content or transform.size)[0]
    return DataSection(name=name, root=root, resize_to=content, pad_to=size if transform.content else None,
                       img_size=size, **kept)
