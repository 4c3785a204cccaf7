#!/usr/bin/env python
"""Which test-time views help: one trained run's test top-1 for several sets of views.

Runs the last weights of each run directory once on every test image's 50 views (the image and its
mirror image, each moved by every offset of at most two pixels, zeros coming in as in training's
padded crops), keeps the softmax outputs, and prints the top-1 of each view set as a Markdown table:
plain, flip (2 views), flip + the 4 one-pixel moves (10), flip + the 3x3 one-pixel neighbourhood
(18: ``nestvit eval --tta flip-shift``), flip + the 4 one- and 4 two-pixel moves (18), flip + the
5x5 two-pixel neighbourhood (50). Evaluation as the run's own (its precision and ``eval_batch``).

    .venv/bin/python experiments/tta_views.py runs/experiments/best_fashion_mnist/runs/nest-best-s{0,1}

About 6.5 minutes a run on this 2-core CPU (500,000 forward passes of the recipe's 2.2M-parameter model,
bf16, 2 threads).
"""

from __future__ import annotations

import argparse
import math

import torch

import nestvit
from nestvit.data.augment import eval_transform, shift, tta_views
from nestvit.train.config import load_config
from nestvit.train.inputs import eval_batches, load_split
from nestvit.train.loop import autocast

TWO = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]  # every move the pass computes
PLUS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]


def _mirrored(moves: list[tuple[int, int]]) -> list[tuple[bool, int, int]]:
    return [(m, dy, dx) for m in (False, True) for dy, dx in moves]


VIEW_SETS = {  # name -> (mirrored, dy, dx) of its views
    "plain": tta_views("none"),
    "flip (2)": tta_views("flip"),
    "flip + 4 one-pixel moves (10)": _mirrored(PLUS),
    "flip + 3x3 one-pixel moves (18, --tta flip-shift)": tta_views("flip-shift"),
    "flip + 4 one- and 4 two-pixel moves (18)": _mirrored(PLUS + [(2, 0), (-2, 0), (0, 2), (0, -2)]),
    "flip + 5x5 two-pixel moves (50)": _mirrored(TWO),
}


def view_top1(run_dir: str, threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    loaded = nestvit.load(run_dir, "last")
    cfg = load_config(f"{run_dir}/config.yaml")
    device = torch.device("cpu")
    split = load_split(cfg.data, cfg.data.eval_split, device, limit=cfg.data.limit_eval)
    model = loaded.model.eval()
    logp: dict[tuple[bool, int, int], list[torch.Tensor]] = {}
    labels = []
    with torch.no_grad(), autocast(device, cfg.precision):
        for images, y in eval_batches(split, batch=cfg.eval_batch, rank=0, world_size=1, device=device, workers=0):
            labels.append(y)
            for mirrored, dy, dx in _mirrored(TWO):
                views = shift(images.flip(-1) if mirrored else images, dy, dx)
                x = eval_transform(views, loaded.transform.mean, loaded.transform.std)
                logp.setdefault((mirrored, dy, dx), []).append(model(x).float().log_softmax(-1))
    target = torch.cat(labels)
    views = {k: torch.cat(v) for k, v in logp.items()}
    out = {}
    for name, keys in VIEW_SETS.items():
        mean_log_prob = torch.stack([views[k] for k in keys]).logsumexp(0) - math.log(len(keys))
        out[name] = 100.0 * (mean_log_prob.argmax(-1) == target).float().mean().item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run directories of nestvit train / nestvit experiment")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    results = {run: view_top1(run, a.threads) for run in a.runs}
    print("| views | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for name in VIEW_SETS:
        print(f"| {name} | " + " | ".join(f"{r[name]:.2f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
