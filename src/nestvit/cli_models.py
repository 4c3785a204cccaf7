"""``nestvit models [PATTERN] [--family F] [--json]``: every registered classifier with its size and cost.

Models are built on the ``meta`` device (no memory, no init cost) and FLOPs are counted there with
``nestvit.flops`` (forward, per image, multiply-add = 2, at the model's default input size); a model
whose forward cannot run on ``meta`` is built on the CPU instead.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from .flops import count_flops
from .registry import create_model, list_models, model_family


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*",
                        help="shell pattern of model names, e.g. 'nest_*' (default: all)")
    parser.add_argument("--family", help="only this family (nest, vit, tnt, rtnt, ...)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")


def describe(name: str) -> dict:
    """``{name, family, params, gflops, input_size: [C, H, W]}`` for a registered model (default config)."""
    with torch.device("meta"):
        model = create_model(name)
    params = sum(p.numel() for p in model.parameters())
    try:
        flops = count_flops(model)
    except Exception:  # an op without a meta kernel: count on real (zero) tensors instead
        model = create_model(name)
        flops = count_flops(model)
    h, w = model.img_size
    return {"name": name, "family": model_family(name), "params": params, "gflops": flops / 1e9,
            "input_size": [int(model.in_chans), int(h), int(w)]}


def _table(rows: list[dict]) -> str:
    header = ("name", "params (M)", "GFLOPs", "input (CxHxW)", "family")
    cells = [(r["name"], f"{r['params'] / 1e6:.2f}", "error" if r["gflops"] is None else f"{r['gflops']:.2f}",
              "x".join(str(v) for v in r["input_size"]) if r["input_size"] else "?", r["family"])
             for r in rows]
    widths = [max(len(str(row[i])) for row in [header, *cells]) for i in range(len(header))]
    right = (False, True, True, True, False)

    def fmt(row) -> str:
        return "  ".join(str(c).rjust(wd) if r else str(c).ljust(wd)
                         for c, wd, r in zip(row, widths, right)).rstrip()

    lines = [fmt(header), fmt(tuple("-" * wd for wd in widths))] + [fmt(c) for c in cells]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    # the classifiers, the conv baseline among them (the GAN's networks: nestvit.generate, docs/generation.md)
    kinds = ("classifier", "baseline")
    families = sorted({model_family(n) for kind in kinds for n in list_models(kind=kind)})
    if args.family is not None and args.family not in families:
        raise ValueError(f"unknown family {args.family!r}; choose one of: {', '.join(families)}")
    names = sorted(n for kind in kinds for n in list_models(args.pattern, family=args.family, kind=kind))
    if not names:
        where = f" in family {args.family!r}" if args.family else ""
        raise ValueError(f"no registered model matches {args.pattern!r}{where}; "
                         f"families: {', '.join(families)} (run `nestvit models` for the full list)")
    rows = []
    for name in names:
        try:
            rows.append(describe(name))
        except Exception as e:  # one broken entry must not hide the others
            print(f"nestvit models: {name}: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"name": name, "family": model_family(name), "params": 0, "gflops": None,
                         "input_size": None})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table(rows))
        print("\nparams in millions; GFLOPs: forward pass per image at the listed input size, "
              "multiply-add = 2")
    return 0 if all(r["gflops"] is not None for r in rows) else 1
