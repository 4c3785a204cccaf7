"""``nestvit explain``: GradCAT / CAM / Grad-CAM / attention-rollout figures for image files.

    nestvit explain CHECKPOINT IMAGE... --method gradcat|cam|gradcam|rollout [--class K] [--top-k N] [--out DIR]
    nestvit explain --model NAME [--set k=v ...] IMAGE...        # random weights, for a demo

CHECKPOINT is a ``.safetensors`` file written by ``nestvit.interop.save_weights`` (or a training run
directory holding one). Its metadata names the model: ``model`` (registry name) and
``model_overrides`` (JSON; ``config`` is accepted too); ``--model`` / ``--set`` fill in or replace them.
Optional metadata ``mean`` / ``std`` (JSON lists, the input normalisation) and ``classes`` (JSON list of
names) are used when present; ``--mean`` / ``--std`` override them.

For every image, one PNG ``<out>/<image stem>_<method>.png`` is written; ``--json`` adds the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..fileio import atomic_write_text

METHODS = ("gradcat", "cam", "gradcam", "rollout")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
RUN_DIR_NAMES = ("best.safetensors", "model.safetensors", "final.safetensors", "last.safetensors",
                 "checkpoint.safetensors", "weights.safetensors")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="CHECKPOINT IMAGE",
                   help="a .safetensors checkpoint (or a training run directory) followed by image files; "
                        "with --model the checkpoint may be left out (random weights)")
    p.add_argument("--method", choices=METHODS, default="gradcat",
                   help="gradcat (NesT only), cam (NesT: head weights x final map), gradcam (any model), "
                        "rollout (ViT, TNT, RTNT attention rollout); default gradcat")
    p.add_argument("--class", dest="target", type=int, default=None,
                   help="explain this class instead of the prediction")
    p.add_argument("--top-k", type=int, default=1, help="explain the top-k predicted classes (gradcat) and show "
                                                        "k bars (default 1; at least 5 bars are shown)")
    p.add_argument("--out", type=Path, default=Path("explain_out"), help="output directory (default explain_out)")
    p.add_argument("--model", default=None, help="registry name (when the checkpoint does not record one, "
                                                 "or alone for random weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model override, VALUE parsed as JSON when it can be (e.g. img_size=64, "
                        "embed_dims=[32,64,128]); repeatable")
    p.add_argument("--sign", type=int, choices=(-1, 1), default=-1,
                   help="GradCAT gradient sign: -1 as the NesT paper (default), +1 activation x gradient")
    p.add_argument("--top-map", choices=("normalized", "raw"), default="normalized",
                   help="GradCAT's top-level map: the final normalized features (default) or the raw level output")
    p.add_argument("--layer", type=int, default=None,
                   help="Grad-CAM: index into forward_intermediates maps (default: the last one the logits use)")
    p.add_argument("--discard-ratio", type=float, default=0.0, help="rollout: drop this fraction of the weakest "
                                                                    "attention weights per layer (default 0)")
    p.add_argument("--threshold", type=float, default=None,
                   help="also draw the box around the largest region of the normalised map above this value")
    p.add_argument("--mean", type=float, nargs="+", default=None, help="input normalisation mean per channel")
    p.add_argument("--std", type=float, nargs="+", default=None, help="input normalisation std per channel")
    p.add_argument("--classes", type=Path, default=None, help="text file with one class name per line")
    p.add_argument("--json", action="store_true", help="also write explain.json with the numbers")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


# ----------------------------------------------------------------------------------------------
# Model loading
# ----------------------------------------------------------------------------------------------

def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def resolve_checkpoint(path: Path) -> Path:
    """A weights file, or the best-named ``.safetensors`` inside a training run directory."""
    if path.is_file():
        return path
    if path.is_dir():
        for d in (path, path / "checkpoints"):
            for name in RUN_DIR_NAMES:
                if (d / name).is_file():
                    return d / name
        found = sorted(path.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        if found:
            return found[0]
        raise FileNotFoundError(f"{path}: a run directory without a .safetensors checkpoint")
    raise FileNotFoundError(f"{path}: no such checkpoint file or run directory")


def _json_meta(meta: dict, key: str):
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except (TypeError, json.JSONDecodeError):
        raise ValueError(f"checkpoint metadata {key!r} is not valid JSON: {meta[key][:80]!r}") from None


def load_model(checkpoint: Path | None, model_name: str | None = None, overrides: dict | None = None):
    """``(model in eval mode, metadata)`` from a checkpoint and/or a registry name with overrides."""
    import nestvit
    from nestvit.interop import load_weights, read_state_dict

    meta: dict = {}
    weights = None
    if checkpoint is not None:
        weights = resolve_checkpoint(Path(checkpoint))
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                meta = dict(f.metadata() or {})
        else:
            _, meta = read_state_dict(weights)
    name = model_name or meta.get("model")
    if not name:
        raise ValueError(f"{weights}: the checkpoint does not record its model (metadata 'model'); pass "
                         f"--model NAME and the --set KEY=VALUE overrides it was trained with")
    cfg = _json_meta(meta, "model_overrides")
    if cfg is None:
        cfg = _json_meta(meta, "config")
        if isinstance(cfg, dict) and isinstance(cfg.get("model_overrides"), dict):
            cfg = cfg["model_overrides"]
    same = meta.get("model") in (None, name)  # metadata overrides belong to the recorded model only
    kwargs = {**((cfg or {}) if same else {}), **(overrides or {})}
    model = nestvit.create_model(name, **kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

def load_image(path: Path, size: tuple[int, int], channels: int) -> torch.Tensor:
    """uint8 ``(C, H, W)``: resize the shorter side to fit and crop the centre to ``size`` (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            H, W = size
            scale = max(H / im.height, W / im.width)
            nh, nw = max(H, round(im.height * scale)), max(W, round(im.width * scale))
            if (nh, nw) != (im.height, im.width):
                im = im.resize((nw, nh), Image.BILINEAR)
            top, left = (nh - H) // 2, (nw - W) // 2
            im = im.crop((left, top, left + W, top + H))
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    t = t.reshape(size[0], size[1], -1).permute(2, 0, 1).contiguous()
    if channels not in (1, 3):
        t = t[:1].expand(channels, -1, -1).contiguous()
    return t


def _stats(values, meta: dict, key: str, channels: int, default: float) -> list[float]:
    v = values if values is not None else _json_meta(meta, key)
    if v is None:
        return [default] * channels
    v = [float(x) for x in (v if isinstance(v, list) else [v])]
    if len(v) == 1:
        v = v * channels
    if len(v) != channels:
        raise ValueError(f"{key} has {len(v)} values but the model takes {channels} channels")
    return v


def preprocess(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


# ----------------------------------------------------------------------------------------------
# run
# ----------------------------------------------------------------------------------------------

def _split_inputs(inputs: list[str], model_name: str | None) -> tuple[Path | None, list[Path]]:
    first = Path(inputs[0])
    if first.is_dir() or first.suffix in WEIGHT_SUFFIXES:
        if len(inputs) < 2:
            raise ValueError("no images given after the checkpoint")
        return first, [Path(p) for p in inputs[1:]]
    if model_name is None:
        raise ValueError(f"{first} is not a checkpoint (.safetensors / run directory); give one first, or pass "
                         f"--model NAME to explain with random weights")
    return None, [Path(p) for p in inputs]


def run(args: argparse.Namespace) -> int:
    from . import attention_rollout, grad_cam, gradcat, map_to_box, nest_cam, predict
    from .plot import gradcat_figure, heatmap_figure

    torch.set_grad_enabled(True)
    checkpoint, image_paths = _split_inputs(args.inputs, args.model)
    for p in image_paths:
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such image file")
    model, meta = load_model(checkpoint, args.model, parse_overrides(args.overrides))
    if checkpoint is None:
        print("nestvit explain: no checkpoint given, the model has random weights (a demo)", file=sys.stderr)
    C = model.in_chans
    mean = _stats(args.mean, meta, "mean", C, 0.5)
    std = _stats(args.std, meta, "std", C, 0.5)
    names = None
    if args.classes is not None:
        names = [line.strip() for line in args.classes.read_text().splitlines() if line.strip()]
    elif _json_meta(meta, "classes"):
        names = [str(n) for n in _json_meta(meta, "classes")]
    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    if args.target is not None and not 0 <= args.target < model.num_classes:
        raise ValueError(f"--class must lie in 0..{model.num_classes - 1}")

    raw = torch.stack([load_image(p, tuple(model.img_size), C) for p in image_paths])
    x = preprocess(raw, mean, std)
    n_bars = min(max(args.top_k, 5), model.num_classes)
    top_c, top_p = predict(model, x, n_bars)
    args.out.mkdir(parents=True, exist_ok=True)
    label = lambda c: names[c] if names and c < len(names) else str(c)
    report = []
    if args.method == "gradcat":
        target = None if args.target is None else torch.full((len(x), 1), args.target, dtype=torch.long)
        res = gradcat(model, x, target=target, top_k=args.top_k, sign=args.sign, top=args.top_map)
        for b, p in enumerate(image_paths):
            out = gradcat_figure(args.out / f"{p.stem}_gradcat.png", raw[b], res, b, top_classes=top_c[b],
                                 top_probs=top_p[b], class_names=names)
            entry = {"image": str(p), "png": str(out), "explained": []}
            for k in range(res.classes.shape[1]):
                entry["explained"].append({
                    "class": int(res.classes[b, k]), "name": label(int(res.classes[b, k])),
                    "prob": float(res.probs[b, k]), "path": res.path[b, k].tolist(),
                    "levels": list(res.levels), "boxes": res.boxes[b, k].tolist(),
                    "scores": res.scores[b, k].tolist()})
                leaf = res.leaf_boxes[b, k].tolist()
                print(f"{p}: {label(int(res.classes[b, k]))} p={float(res.probs[b, k]):.3f} path "
                      f"{res.path[b, k].tolist()} leaf box {leaf} -> {out}")
            report.append(entry)
    else:
        if args.method == "cam":
            heat = nest_cam(model, x, args.target)
        elif args.method == "gradcam":
            heat = grad_cam(model, x, args.target, args.layer)
        else:
            if args.target is not None:
                print("nestvit explain: attention rollout does not depend on the class; --class is ignored",
                      file=sys.stderr)
            heat = attention_rollout(model, x, args.discard_ratio)
        titles = {"cam": "CAM", "gradcam": "Grad-CAM", "rollout": "attention rollout"}
        for b, p in enumerate(image_paths):
            c = int(top_c[b, 0]) if args.target is None else args.target
            box = map_to_box(heat[b], args.threshold) if args.threshold is not None else None
            explained = "" if args.method == "rollout" else label(c)
            out = heatmap_figure(args.out / f"{p.stem}_{args.method}.png", raw[b], heat[b],
                                 method=titles[args.method], explained=explained, top_classes=top_c[b],
                                 top_probs=top_p[b], class_names=names, box=box)
            entry = {"image": str(p), "png": str(out), "class": None if args.method == "rollout" else c,
                     "top_classes": top_c[b].tolist(), "top_probs": top_p[b].tolist()}
            if box is not None:
                entry["box"] = list(box)
            report.append(entry)
            print(f"{p}: top-1 {label(int(top_c[b, 0]))} p={float(top_p[b, 0]):.3f} -> {out}")
    if args.json:
        atomic_write_text(args.out / "explain.json", json.dumps({"method": args.method, "images": report}, indent=1))
    return 0
