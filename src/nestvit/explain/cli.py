"""``nestvit explain``: GradCAT / CAM / Grad-CAM / attention-rollout / occlusion figures for image files.

    nestvit explain CHECKPOINT IMAGE|FOLDER... --method gradcat|cam|gradcam|rollout|occlusion [--class K]
                    [--top-k N] [--batch-size 16] [--out DIR]
    nestvit explain --model NAME [--set k=v ...] IMAGE...        # random weights, for a demo

CHECKPOINT is a run directory or a weights file; ``nestvit.load`` reads the model, its class names and
its input transform from it (``nestvit.contract``), so each image is prepared exactly as ``nestvit
predict`` and training prepare it. For a file that records no model (a timm or ``torch.save`` state
dict) ``--model NAME`` / ``--set KEY=VALUE`` name the architecture; ``--set`` also replaces recorded
constructor arguments, and ``--mean`` / ``--std`` the recorded normalisation.

A folder stands for every image file below it; images are explained ``--batch-size`` at a time.
For every image, one PNG ``<out>/<image stem>_<method>.png`` is written (images of the same name get their
folders' names in front: ``cats_0_gradcat.png``); ``--json`` adds the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..cli_args import (
    SkippedImages,
    add_threads,
    image_files,
    output_stems,
    parse_sets,
    positive_int,
    unit_float,
    writable_dir,
)
from ..fileio import atomic_write_text

METHODS = ("gradcat", "cam", "gradcam", "rollout", "occlusion")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def class_index(given: str | int, names: list[str] | None, num_classes: int) -> int:
    """``--class``: a class name (first), else an output index in ``0..num_classes - 1``."""
    from ..data.datasets import same_name

    composed = [same_name(n) for n in names or []]
    if same_name(str(given)) in composed:
        return composed.index(same_name(str(given)))
    folded = [n.casefold() for n in composed]  # "stripes" for "Stripes", where no other name folds to it
    if folded.count(same_name(str(given)).casefold()) == 1:
        return folded.index(same_name(str(given)).casefold())
    if str(given).isascii() and str(given).isdecimal() and int(given) < num_classes:
        return int(given)
    shown = (f"; its classes: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''}" if names else "")
    raise ValueError(f"--class {given}: give a class name or an index in 0..{num_classes - 1}{shown}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT|IMAGE",
                   help="a checkpoint (a run folder, a save_pretrained folder or hf-hub:org/name, a "
                        ".safetensors/.pth/.pt/.bin file, or an .onnx export for --method occlusion), then image "
                        "files or folders; with --model the checkpoint may be left out (random weights)")
    add_threads(p)
    p.add_argument("--method", choices=METHODS, default="gradcat",
                   help="gradcat (NesT only), cam (NesT: head weights x final map), gradcam (any model), "
                        "rollout (ViT, TNT, RTNT attention rollout), occlusion (any model: probability drop "
                        "when a window is hidden); default gradcat")
    p.add_argument("--class", dest="target", default=None, metavar="CLASS",
                   help="explain this class instead of the prediction: its name, or its output index")
    p.add_argument("--top-k", type=positive_int, default=1,
                   help="explain the top-k predicted classes (gradcat) and show k bars (default 1; at least 5 bars "
                        "are shown)")
    p.add_argument("--out", type=Path, default=Path("explain_out"), help="output directory (default explain_out)")
    p.add_argument("--model", default=None, help="registry name (when the checkpoint does not record one, "
                                                 "or alone for random weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model override, VALUE read as YAML (e.g. img_size=64, "
                        "embed_dims=[32,64,128]); repeatable")
    p.add_argument("--sign", type=int, choices=(-1, 1), default=-1,
                   help="GradCAT gradient sign: -1 as the NesT paper (default), +1 activation x gradient")
    p.add_argument("--top-map", choices=("normalized", "raw"), default="normalized",
                   help="GradCAT's top-level map: the final normalized features (default) or the raw level output")
    p.add_argument("--layer", type=int, default=None,
                   help="Grad-CAM: index into forward_intermediates maps (default: the last one the logits use)")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of the weakest "
                                                                    "attention weights per layer (default 0)")
    p.add_argument("--window", type=positive_int, default=None,
                   help="occlusion: side of the hidden square in pixels (default: the shorter image side // 8)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="occlusion: step between windows, at most --window (default: --window, no overlap)")
    p.add_argument("--threshold", type=unit_float, default=None,
                   help="also draw the box around the largest region of the map (scaled to [0, 1]) at or above "
                        "this value, in [0, 1]")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="input normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std per channel")
    p.add_argument("--classes", type=Path, default=None, help="text file with one class name per line")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="images explained at once (default 16; the maps need gradients, so memory grows with it)")
    p.add_argument("--json", action="store_true", help="also write explain.json with the numbers")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------

def load_model(checkpoint: Path | None, model_name: str | None = None, overrides: dict | None = None):
    """``Loaded`` (``nestvit.contract``) from a checkpoint, or a registry name with random weights."""
    from ..contract import InputTransform, Loaded, RunContract, load

    if checkpoint is not None:
        return load(checkpoint, model=model_name, overrides=overrides)
    contract = RunContract(model=model_name, kwargs=dict(overrides or {}))
    model = contract.build().eval()
    return Loaded(model=model, transform=InputTransform.default(model.in_chans, model.img_size), contract=contract,
                  weights=Path("(random weights)"))


def _stats(values: list[float] | None, recorded: tuple[float, ...], name: str) -> tuple[float, ...]:
    if values is None:
        return recorded
    if len(values) == 1:
        values = values * len(recorded)
    if len(values) != len(recorded):
        raise ValueError(f"--{name} has {len(values)} values but the model takes {len(recorded)} channels")
    return tuple(values)


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

def _split_inputs(inputs: list[str], model_name: str | None, method: str = "gradcat"
                  ) -> tuple[Path | None, list[Path]]:
    from ..contract import EXPORTED_SUFFIXES, HUB_PREFIX, published_tag

    if inputs[0].startswith(HUB_PREFIX):  # a model on the Hugging Face Hub
        if len(inputs) < 2:
            raise ValueError("no images given after the checkpoint")
        return Path(inputs[0]), [Path(p) for p in inputs[1:]]
    first = Path(inputs[0])
    if first.suffix == ".pt2":
        raise ValueError(f"{first} is a torch.export program, which nestvit's commands do not read (loading one may "
                         "unpickle): give the run folder or its weights file"
                         + ("" if method == "occlusion" else f" ({method} needs the PyTorch model's gradients, "
                            "attention and feature maps)") + ", or explain the .onnx export with --method occlusion")
    if first.suffix in EXPORTED_SUFFIXES and method != "occlusion":
        raise ValueError(f"{first} is an exported model; {method} needs the PyTorch model (its gradients, attention "
                         "and feature maps): give the run folder or its weights file, or explain the .onnx export "
                         "with --method occlusion (forward passes only)")
    if first.is_dir() or first.suffix in WEIGHT_SUFFIXES or first.suffix == ".onnx" or published_tag(first):
        if len(inputs) < 2:
            raise ValueError("no images given after the checkpoint")
        return first, [Path(p) for p in inputs[1:]]
    if model_name is None and not first.exists():
        from ..contract import resolve_weights

        resolve_weights(first)  # its error: no such run folder or weights file, did you mean a published tag
    if model_name is None:
        raise ValueError(f"{first} is not a checkpoint (.safetensors / run directory); give one first, or pass "
                         f"--model NAME to explain with random weights")
    return None, [Path(p) for p in inputs]


def run(args: argparse.Namespace) -> int:
    from . import attention_rollout, grad_cam, gradcat, map_to_box, nest_cam, occlusion, predict
    from .plot import gradcat_figure, heatmap_figure

    torch.set_grad_enabled(True)
    checkpoint, inputs = _split_inputs(args.inputs, args.model, args.method)
    image_paths = image_files(inputs)
    out_dir = writable_dir(args.out)  # fail now, not after the explanations
    loaded = load_model(checkpoint, args.model, parse_sets(args.overrides))
    if loaded.contract.kind != "classifier":
        raise ValueError(f"{loaded.weights} holds a {loaded.contract.kind}, not a classifier; explain needs one")
    model = loaded.model
    if checkpoint is None:
        print("nestvit explain: no checkpoint given, the model has random weights (a demo)", file=sys.stderr)
    else:
        print(f"weights: {loaded.describe()}")
    transform = replace(loaded.transform, mean=_stats(args.mean, loaded.transform.mean, "mean"),
                        std=_stats(args.std, loaded.transform.std, "std"))
    if args.classes is not None:
        if not args.classes.is_file():
            raise ValueError(f"--classes {args.classes}: no such file (a text file of class names, one per line)")
        try:
            text = args.classes.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--classes {args.classes}: not a UTF-8 text file; save it as UTF-8, one class name "
                             "per line") from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(names) != model.num_classes:
            raise ValueError(f"--classes {args.classes}: {len(names)} names, but the model has {model.num_classes} "
                             "classes; give one name per line for each, in the order of its outputs")
    else:
        names = list(loaded.contract.classes) if loaded.contract.classes is not None else None
    if args.target is not None:
        args.target = class_index(args.target, names, model.num_classes)
    if args.top_k > model.num_classes:
        print(f"note: --top-k {args.top_k}: the model has {model.num_classes} classes; "
              + ("explaining all of them" if args.method == "gradcat" else "showing all of them"), file=sys.stderr)
        args.top_k = model.num_classes
    if args.target is not None and args.method == "gradcat" and args.top_k > 1:
        print(f"note: --class explains one class; --top-k {args.top_k} is ignored", file=sys.stderr)

    stems = output_stems(image_paths)
    n_bars = min(max(args.top_k, 5), model.num_classes)
    label = lambda c: names[c] if names and c < len(names) else str(c)
    titles = {"cam": "CAM", "gradcam": "Grad-CAM", "rollout": "attention rollout", "occlusion": "occlusion"}
    values = {"cam": "CAM: share of the logit", "gradcam": "Grad-CAM (ReLU of weighted maps)",
              "rollout": "rolled-out attention of the class token",
              "occlusion": "drop in p(class) when hidden"}
    if args.method == "rollout" and args.target is not None:
        print("nestvit explain: attention rollout does not depend on the class; --class is ignored", file=sys.stderr)
    report = []
    skipped = SkippedImages()  # an unreadable file does not cost the others their explanations
    for first in range(0, len(image_paths), args.batch_size):  # a batch at a time: the maps need gradients
        kept, raw = skipped.read(transform, image_paths[first:first + args.batch_size])
        if not kept:
            continue
        paths = [image_paths[first + i] for i in kept]
        outs = [stems[first + i] for i in kept]  # one output name per input, a path given twice included
        x = transform(raw)
        top_c, top_p = predict(model, x, n_bars)
        if args.method == "gradcat":
            target = None if args.target is None else torch.full((len(x), 1), args.target, dtype=torch.long)
            res = gradcat(model, x, target=target, top_k=args.top_k, sign=args.sign, top=args.top_map)
            for b, p in enumerate(paths):
                out = gradcat_figure(out_dir / f"{outs[b]}_gradcat.png", raw[b], res, b,
                                     top_classes=top_c[b], top_probs=top_p[b], class_names=names)
                entry = {"image": str(p), "png": str(out), "explained": []}
                for k in range(res.classes.shape[1]):
                    entry["explained"].append({
                        "class": int(res.classes[b, k]), "name": label(int(res.classes[b, k])),
                        "prob": float(res.probs[b, k]), "path": res.path[b, k].tolist(),
                        "levels": list(res.levels), "boxes": res.boxes[b, k].tolist(),
                        "scores": res.scores[b, k].tolist()})
                    leaf = res.leaf_boxes[b, k].tolist()
                    n = res.classes.shape[1]  # the classes explained share one PNG, a panel each
                    where = f"-> {out}" + (f" (panel {k + 1} of {n})" if n > 1 else "")
                    print(f"{p}: {label(int(res.classes[b, k]))} p={float(res.probs[b, k]):.3f} path "
                          f"{res.path[b, k].tolist()} leaf box {leaf} {where}")
                report.append(entry)
            continue
        if args.method == "cam":
            heat = nest_cam(model, x, args.target)
        elif args.method == "gradcam":
            heat = grad_cam(model, x, args.target, args.layer)
        elif args.method == "occlusion":
            heat = occlusion(model, x, args.target, window=args.window, stride=args.stride)
        else:
            heat = attention_rollout(model, x, args.discard_ratio)
        for b, p in enumerate(paths):
            c = int(top_c[b, 0]) if args.target is None else args.target
            box = map_to_box(heat[b], args.threshold) if args.threshold is not None else None
            explained = "" if args.method == "rollout" else label(c)
            out = heatmap_figure(out_dir / f"{outs[b]}_{args.method}.png", raw[b], heat[b],
                                 method=titles[args.method], explained=explained, top_classes=top_c[b],
                                 top_probs=top_p[b], class_names=names, box=box, value_label=values[args.method],
                                 highlight=None if args.method == "rollout" else c)
            entry = {"image": str(p), "png": str(out), "class": None if args.method == "rollout" else c,
                     "name": None if args.method == "rollout" else label(c),
                     "top_classes": top_c[b].tolist(), "top_names": [label(int(k)) for k in top_c[b]],
                     "top_probs": top_p[b].tolist(), "map_range": [float(heat[b].min()), float(heat[b].max())]}
            if box is not None:
                entry["box"] = list(box)
            report.append(entry)
            said = "" if args.target is None or args.method == "rollout" else f"explained {label(c)}; "
            print(f"{p}: {said}top-1 {label(int(top_c[b, 0]))} p={float(top_p[b, 0]):.3f} -> {out}")
            if args.method == "occlusion" and float(heat[b].abs().max()) < 0.01:
                print(f"{p}: note: hiding any one window changes p({label(c)}) by {float(heat[b].abs().max()):.3f} at "
                      "most: no region of the image decides the prediction alone (a larger --window may show more)",
                      file=sys.stderr)
    skipped.report(len(report))
    if args.json:
        atomic_write_text(out_dir / "explain.json", json.dumps({"method": args.method, "images": report}, indent=1))
    return 0
