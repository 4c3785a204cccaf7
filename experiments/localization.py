#!/usr/bin/env python
"""Weakly supervised localization on a synthetic set with known boxes: NesT (GradCAT, CAM) vs ViT, over seeds.

For every seed (``--seeds``, default 0 1 2) a small NesT and a ViT of about the same size are trained on
the *labels only* of ``nestvit.explain.make_localization_set`` (Fashion-MNIST items pasted at random
positions and sizes on a cluttered 64x64 canvas; fresh canvases every epoch, drawn from the seed) and
evaluated on the seed's own held-out canvases (test-split items), always explaining the TRUE class:

- GradCAT (NesT paper, Section 3.2 / Algorithm 1; experiments in Section 4.6), with sign -1 (the paper's
  ``-dY/dA``) AND sign +1, both always reported: the leaf the path ends in (``hit50``: >= 50 % of the leaf
  inside the object's box; ``inside``: the whole leaf inside) against a uniformly random leaf; and every
  traversal step's decision: ``best`` = the chosen child holds at least as much of the object's area as
  each of the other candidates, ``majority`` = it holds more than half of the object's area inside the
  current node; scored over the steps whose node holds some of the object, against the exact chance of a
  uniformly random child (from the boxes) and the nominal 1/4.
- every map (NesT CAM, NesT Grad-CAM, NesT occlusion, ViT Grad-CAM, ViT rollout, ViT occlusion): its
  *polarity* (share of images whose mean map value inside the box exceeds the mean outside), GT-known
  localization accuracy (largest region above a threshold searched in steps of 0.05 on the evaluation
  set -- the CAM protocol; IoU >= 0.5), the same for the negated map of the signed ones (-CAM,
  -occlusion), and "pointing" (the best leaf-sized cell, same criteria as GradCAT's leaf).
- occlusion (``nestvit.explain.occlusion``, probability drop, window = the model's native map cell,
  black fill) as a map like the others.
- like for like: every map also average-pooled to ONE common grid (the coarsest native grid among the
  maps, 4x4 for the base variant) and bilinearly upsampled the same way.
- the oracle ceiling of every grid used: the GT-known accuracy of the map that holds the true box at that
  resolution -- each cell's value is the fraction of its area inside the box -- upsampled and thresholded
  exactly as the real maps (``oracle``); and the share of images for which some rectangle of whole cells
  reaches IoU >= 0.5 (``cell_box``).

Per metric: the value of every seed, the mean and a 95 % Student-t confidence interval over the seeds
(``mean +- t_{0.975, n-1} s / sqrt(n)``). Variants (``--variant``): ``base``; ``patch2`` (patch size 2, so
NesT's top map is 8x8); ``local-top`` (``block_size=2``: the top level is 2x2 local blocks of 2x2
tokens, no global attention anywhere; the top map stays 4x4, leaves are 8x8 px); ``long`` (3x the epochs).

Writes ``docs/img/explain_localization_<variant>.json`` (+ an example figure of seed 0); keeps the weights
in ``runs/localization/<variant>/seed<N>/`` (``nest.safetensors``, ``vit.safetensors``, each with a
``.json`` record of its training) and reads them back on a rerun instead of training again (a ViT trained
with the same settings by another variant is reused). ``--eval-only`` never trains; ``--quick`` is a
smoke run of about one CPU-minute (in runs/localization/quick/).

    python experiments/localization.py --variant base          # 3 seeds, ~8 CPU-minutes per seed
    python experiments/localization.py --variant local-top
    python experiments/localization.py --eval-only --variant base
    python experiments/localization.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nestvit
from nestvit.explain import (
    attention_rollout,
    grad_cam,
    gradcat,
    maps_to_boxes,
    nest_cam,
    occlusion,
    search_threshold,
    top1_loc_error,
)
from nestvit.explain.gradcat import block_box, upsample_map
from nestvit.explain.synthetic import make_localization_set
from nestvit.fileio import atomic_write_text, save_figure
from nestvit.interop import load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]
CANVAS = 64
CANVAS_KW = dict(canvas=CANVAS, scale=(24, 44), clutter=True)
EVAL_VERSION = 2  # bump when the evaluation changes: cached per-seed results with another version are recomputed

NEST = ("nest_tiny_cifar", dict(img_size=64, in_chans=1, num_classes=10, patch_size=4, num_levels=3, block_size=None,
                                embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 1, 2)))
# patch 8 (8x8 tokens): about NesT's parameters and forward FLOPs; patch 4 (257 tokens) costs ~4x more per image
VIT = ("vit_tiny_patch4_32", dict(img_size=64, in_chans=1, num_classes=10, patch_size=8, embed_dim=96, depth=4,
                                  num_heads=3))

# options, not code edits: what each variant changes in NesT's config, and the factor on the epochs
VARIANTS = {
    "base": ({}, 1, "the base NesT (patch 4, 4x4-token blocks: one global top block, 4x4 top map, 16 px leaves)"),
    "patch2": ({"patch_size": 2}, 1, "patch 2: 8x8-token blocks, one global top block over an 8x8 top map, "
                                     "16 px leaves"),
    "local-top": ({"block_size": 2}, 1, "block_size 2: the top level is 2x2 local blocks of 2x2 tokens (no global "
                                        "attention anywhere), 4x4 top map, 8 px leaves"),
    "long": ({}, 3, "the base models trained for 3x the epochs"),
}

T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="base", choices=tuple(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (--quick: 0 1)")
    p.add_argument("--source", default="fashion_mnist", choices=("fashion_mnist", "mnist5k", "mnist"))
    p.add_argument("--train-size", type=int, default=None, help="fresh training canvases per epoch (4096)")
    p.add_argument("--test-size", type=int, default=None, help="held-out canvases per seed (512)")
    p.add_argument("--epochs", type=int, default=None, help="default 12 (x3 for --variant long)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads ran up to 10x slower)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sets, one epoch, two seeds")
    p.add_argument("--out-json", type=Path, default=None,
                   help="default docs/img/explain_localization_<variant>.json")
    p.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs/localization")
    p.add_argument("--examples", type=int, default=None, help="test canvases of seed 0 in the example figure (6)")
    p.add_argument("--skip-untrained", action="store_true", help="skip the random-weight sanity check")
    p.add_argument("--eval-only", action="store_true",
                   help="never train: re-evaluate the weights saved in --run-dir (missing weights are an error)")
    p.add_argument("--report", nargs="+", metavar="VARIANT", choices=tuple(VARIANTS),
                   help="print the cross-variant table from the saved docs/img/explain_localization_<variant>.json "
                        "files (computes nothing)")
    args = p.parse_args(argv)
    base_epochs = 12
    if args.quick:
        defaults = dict(train_size=512, test_size=64, examples=4, seeds=[0, 1])
        base_epochs = 1
        args.run_dir = args.run_dir / "quick"  # never overwrites the default run's weights or figures
        args.img_dir = args.run_dir / "img"
        if args.out_json is None:
            args.out_json = args.run_dir / f"explain_localization_{args.variant}.json"
    else:
        defaults = dict(train_size=4096, test_size=512, examples=6, seeds=[0, 1, 2])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.epochs is None:
        args.epochs = base_epochs * VARIANTS[args.variant][1]
    if args.out_json is None:
        args.out_json = ROOT / f"docs/img/explain_localization_{args.variant}.json"
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    return args


# ----------------------------------------------------------------------------------------------
# statistics and metric helpers (pure numpy / torch; tested in tests/explain/test_localization_study.py)
# ----------------------------------------------------------------------------------------------

def t_quantile_975(df: int) -> float:
    """Two-sided 95 % Student-t quantile ``t_{0.975, df}`` (table to df 30, Cornish-Fisher beyond)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values) -> dict:
    """``{"n", "mean", "std", "ci95": [lo, hi] or None, "half": half-width or None, "values"}``: a 95 %
    Student-t interval over the values (seeds): ``mean +- t_{0.975, n-1} * s / sqrt(n)``, s the sample std."""
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "half": None, "values": []}
    mean = statistics.fmean(vals)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "half": None, "values": vals}
    std = statistics.stdev(vals)
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "half": half, "values": vals}


def overlap_area(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Area of ``boxes (N, ..., 4)`` inside ``gt (N, 4)`` (half-open pixel boxes), shape ``(N, ...)``."""
    boxes = np.asarray(boxes, dtype=np.float64)
    g = np.asarray(gt, dtype=np.float64).reshape((len(gt),) + (1,) * (boxes.ndim - 2) + (4,))
    iw = np.clip(np.minimum(boxes[..., 2], g[..., 2]) - np.maximum(boxes[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(boxes[..., 3], g[..., 3]) - np.maximum(boxes[..., 1], g[..., 1]), 0, None)
    return iw * ih


def quadrants(node: np.ndarray) -> np.ndarray:
    """``(N, 4)`` boxes -> ``(N, 4, 4)`` their 2x2 quadrants, ordered TL, TR, BL, BR (GradCAT's order)."""
    node = np.asarray(node, dtype=np.float64)
    x0, y0, x1, y1 = node.T
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    return np.stack([np.stack([x0, y0, xm, ym], 1), np.stack([xm, y0, x1, ym], 1),
                     np.stack([x0, ym, xm, y1], 1), np.stack([xm, ym, x1, y1], 1)], 1)


def step_accuracy(candidates: np.ndarray, chosen: np.ndarray, gt: np.ndarray) -> dict:
    """One traversal step: ``candidates (N, K, 4)`` boxes the step chooses among, ``chosen (N,)`` the index taken.

    Over the images whose candidates hold some of the object (``n``): ``best`` = the chosen candidate holds
    at least as much of the object's area as every other one (ties count as right), ``majority`` = it holds
    more than half of the object's area among the candidates; ``*_chance`` = the exact expectation of a
    uniformly random choice on the same images (the share of candidates that would be right), ``nominal`` 1/K.
    """
    a = overlap_area(candidates, gt)  # (N, K)
    N, K = a.shape
    valid = a.sum(1) > 0
    got = a[np.arange(N), np.asarray(chosen, dtype=np.int64)]
    best_ok = got >= a.max(1) - 1e-9
    best_n = (a >= a.max(1, keepdims=True) - 1e-9).sum(1)
    maj = a > 0.5 * a.sum(1, keepdims=True)
    maj_ok = got > 0.5 * a.sum(1)
    out = {"n": int(valid.sum()), "nominal": 1.0 / K}
    if not valid.any():
        return {**out, "best": None, "best_chance": None, "majority": None, "majority_chance": None}
    return {**out, "best": float(best_ok[valid].mean()), "best_chance": float((best_n / K)[valid].mean()),
            "majority": float(maj_ok[valid].mean()), "majority_chance": float((maj.sum(1) / K)[valid].mean())}


def box_mask(gt: np.ndarray, size: int) -> np.ndarray:
    """``(N, size, size)`` bool: the pixels inside each half-open box."""
    r = np.arange(size)
    gt = np.asarray(gt)
    ys = (r[None, :] >= gt[:, 1:2]) & (r[None, :] < gt[:, 3:4])
    xs = (r[None, :] >= gt[:, 0:1]) & (r[None, :] < gt[:, 2:3])
    return ys[:, :, None] & xs[:, None, :]


def polarity(maps, gt: np.ndarray) -> float:
    """Share of images whose mean map value inside the box exceeds the mean outside it (``maps (N, H, W)``)."""
    m = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps, dtype=np.float64)
    if m.ndim != 3 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"polarity expects square maps (N, H, H), got {m.shape}")
    inside = box_mask(gt, m.shape[-1])
    n_in = inside.sum((1, 2))
    n_out = inside[0].size - n_in
    s_in = (m * inside).sum((1, 2))
    mean_in = s_in / np.maximum(n_in, 1)
    mean_out = (m.sum((1, 2)) - s_in) / np.maximum(n_out, 1)
    return float((mean_in > mean_out).mean())


def cell_fractions(gt: np.ndarray, grid: int, size: int = CANVAS) -> np.ndarray:
    """``(N, grid, grid)``: the fraction of each cell of a ``grid x grid`` partition inside the box -- the map
    that holds the true box as well as that resolution can."""
    gt = np.asarray(gt, dtype=np.float64)
    cell = size / grid
    lo = np.arange(grid) * cell
    ox = np.clip(np.minimum(lo + cell, gt[:, 2:3]) - np.maximum(lo, gt[:, 0:1]), 0, None) / cell  # (N, grid)
    oy = np.clip(np.minimum(lo + cell, gt[:, 3:4]) - np.maximum(lo, gt[:, 1:2]), 0, None) / cell
    return oy[:, :, None] * ox[:, None, :]


def cell_box_ceiling(gt: np.ndarray, grid: int, size: int = CANVAS) -> float:
    """Share of images for which some rectangle of whole ``grid x grid`` cells has IoU >= 0.5 with the box."""
    gt = np.asarray(gt, dtype=np.float64)
    cell = size / grid
    spans = np.array([(i * cell, (j + 1) * cell) for i in range(grid) for j in range(i, grid)])  # (P, 2)

    def inter(lo, hi):  # (N, P) overlap of each span with [lo, hi)
        return np.clip(np.minimum(spans[None, :, 1], hi[:, None]) - np.maximum(spans[None, :, 0], lo[:, None]), 0, None)

    ix, iy = inter(gt[:, 0], gt[:, 2]), inter(gt[:, 1], gt[:, 3])
    length = spans[:, 1] - spans[:, 0]
    i = iy[:, :, None] * ix[:, None, :]  # (N, Py, Px)
    area = length[:, None] * length[None, :]
    g_area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[:, None, None]
    best = (i / (area[None] + g_area - i)).reshape(len(gt), -1).max(1)
    return float((best >= 0.5 - 1e-12).mean())


def oracle_ceiling(gt: np.ndarray, grid: int, size: int = CANVAS) -> dict:
    """GT-known accuracy of the oracle map at ``grid x grid`` (cell = fraction inside the box), upsampled
    bilinearly and thresholded exactly as the real maps (threshold searched); and the cell-box ceiling."""
    up = upsample_map(torch.from_numpy(cell_fractions(gt, grid, size)).float(), (size, size))
    t, accs = search_threshold(up, gt)
    return {"oracle": accs[t], "threshold": t, "cell_box": cell_box_ceiling(gt, grid, size)}


def leaf_criteria(boxes: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hit50, inside)`` per row: >= 50 % of the cell's area in the GT box; the cell wholly inside it."""
    boxes = np.asarray(boxes, dtype=np.float64)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = ((boxes[:, 0] >= gt[:, 0]) & (boxes[:, 1] >= gt[:, 1])
              & (boxes[:, 2] <= gt[:, 2]) & (boxes[:, 3] <= gt[:, 3]))
    return overlap_area(boxes[:, None], gt)[:, 0] >= 0.5 * area, inside


def grid_cells(size: int, cell: int) -> np.ndarray:
    n = size // cell
    return np.array([(c * cell, r * cell, (c + 1) * cell, (r + 1) * cell) for r in range(n) for c in range(n)])


def chance(gt: np.ndarray, cells: np.ndarray) -> dict:
    """Expected criteria for a uniformly random cell, and how often any cell meets them (the ceiling)."""
    hit = np.stack([leaf_criteria(np.repeat(c[None], len(gt), 0), gt)[0] for c in cells], 1)
    ins = np.stack([leaf_criteria(np.repeat(c[None], len(gt), 0), gt)[1] for c in cells], 1)
    return {"hit50": float(hit.mean()), "inside": float(ins.mean()), "hit50_possible": float(hit.any(1).mean()),
            "inside_possible": float(ins.any(1).mean())}


def pointing(maps: torch.Tensor, cell: int, gt: np.ndarray) -> dict:
    """Argmax leaf-sized cell of each map (mean over the cell) against the box."""
    pooled = F.avg_pool2d(maps.unsqueeze(1).float(), cell).flatten(1)  # (N, cells), row-major
    best = grid_cells(maps.shape[-1], cell)[pooled.argmax(1).numpy()]
    hit, ins = leaf_criteria(best, gt)
    return {"hit50": float(hit.mean()), "inside": float(ins.mean())}


def to_grid(low: torch.Tensor, grid: int) -> torch.Tensor:
    """Average-pool ``(N, h, h)`` maps to ``grid x grid`` (``h`` a multiple of ``grid``)."""
    h = low.shape[-1]
    if h % grid:
        raise ValueError(f"a {h}x{h} map does not pool to {grid}x{grid}")
    return low if h == grid else F.avg_pool2d(low.unsqueeze(1).float(), h // grid).squeeze(1)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def normalise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (x.float() / 255.0 - mean) / std


def train(model, epoch_data, args, seed, mean, std, log) -> dict:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in model.no_weight_decay())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = args.train_size // args.batch_size
    total, warm = steps_per_epoch * args.epochs, max(1, steps_per_epoch // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(seed)
    t0, c0, history = time.time(), time.process_time(), []
    model.train()
    for epoch in range(args.epochs):
        x, y, _ = epoch_data(epoch)
        perm = torch.randperm(len(x), generator=g)
        seen, loss_sum, right = 0, 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            xb, yb = normalise(x[idx], mean, std), y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            seen += len(idx)
            loss_sum += float(loss.detach()) * len(idx)
            right += int((logits.argmax(1) == yb).sum())
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": right / seen,
                        "minutes": (time.time() - t0) / 60})
        log(f"    epoch {epoch + 1}/{args.epochs}: loss {loss_sum / seen:.3f} train acc {right / seen:.3f} "
            f"({(time.time() - t0) / 60:.1f} min)")
    model.eval()
    return {"history": history, "train_minutes": (time.time() - t0) / 60,
            "train_cpu_minutes": (time.process_time() - c0) / 60, "steps": total}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def batched(fn, *tensors, bs=128):
    return torch.cat([fn(*(t[i:i + bs] for t in tensors)) for i in range(0, len(tensors[0]), bs)])


def map_metrics(name, low, gt, leaf, log, *, negate=False, pred_low=None, pred=None, y=None) -> dict:
    """``low (N, h, h)`` maps of the true class at their native grid -> polarity, GT-known accuracy (threshold
    searched), pointing; the negated map's GT-known accuracy with ``negate``; top-1 loc. error with ``pred_low``."""
    up = upsample_map(low, (CANVAS, CANVAS))
    t, accs = search_threshold(up, gt)
    out = {"grid": int(low.shape[-1]), "polarity": polarity(up, gt), "gt_known": accs[t], "threshold": t,
           "pointing": pointing(up, leaf, gt), "acc_by_threshold": {f"{k:.2f}": round(a, 4) for k, a in accs.items()}}
    msg = (f"  {name} ({out['grid']}x{out['grid']}): polarity {out['polarity']:.3f}, GT-known {out['gt_known']:.3f} "
           f"(t {t:.2f}), pointing hit50 {out['pointing']['hit50']:.3f}")
    if negate:
        tn, accn = search_threshold(-up, gt)
        out["negated"] = {"gt_known": accn[tn], "threshold": tn}
        msg += f"; negated: GT-known {accn[tn]:.3f} (t {tn:.2f})"
    if pred_low is not None:
        boxes = maps_to_boxes(upsample_map(pred_low, (CANVAS, CANVAS)), t)
        out["top1_loc_error"] = top1_loc_error(pred, y, boxes, gt)
        msg += f"; top-1 loc error {out['top1_loc_error']:.3f}"
    log(msg)
    return out


def gradcat_metrics(model, x, y, gt, sign, log) -> tuple[dict, object]:
    res = [gradcat(model, x[i:i + 128], target=y[i:i + 128], sign=sign, keep_maps=False) for i in range(0, len(x), 128)]
    boxes = np.concatenate([r.boxes[:, 0].numpy() for r in res]).astype(np.float64)  # (N, L, 4)
    choice = np.concatenate([r.choice[:, 0].numpy() for r in res])  # (N, L-1)
    path = np.concatenate([r.path[:, 0].numpy() for r in res])  # (N, L)
    levels = res[0].levels
    hit, ins = leaf_criteria(boxes[:, -1], gt)
    out = {"leaf_hit50": float(hit.mean()), "leaf_inside": float(ins.mean()), "steps": {}}
    cfg = model.cfg
    gh, gw = cfg.block_grid(cfg.num_levels - 1)
    if gh * gw > 1:  # several top blocks: the path starts in the one with the best mean score (a 4-way choice here)
        tops = block_box(model, cfg.num_levels - 1, torch.arange(gh * gw)).numpy().astype(np.float64)
        out["steps"]["root"] = step_accuracy(np.repeat(tops[None], len(gt), 0), path[:, 0], gt)
    for k in range(boxes.shape[1] - 1):
        out["steps"][f"L{levels[k]}->L{levels[k + 1]}"] = step_accuracy(quadrants(boxes[:, k]), choice[:, k], gt)
    steps = ", ".join(f"{s} best {v['best']:.3f} (chance {v['best_chance']:.3f}) maj {v['majority']:.3f} "
                      f"(chance {v['majority_chance']:.3f}, n {v['n']})" if v["best"] is not None else f"{s} n 0"
                      for s, v in out["steps"].items())
    log(f"  GradCAT sign {sign:+d}: leaf hit50 {hit.mean():.3f} inside {ins.mean():.3f}; steps: {steps}")
    return out, res


def evaluate(models: dict, x, y, gt, log, *, fill: float, full: bool = True) -> dict:
    """Every metric for ``models`` (``{"nest": ..., "vit": ...}``) on ``x`` (normalised), true class ``y``.
    ``full=False`` (the untrained sanity check): no occlusion, no common grid, no top-1 error."""
    nest, vit = models["nest"], models["vit"]
    cfg = nest.cfg
    leaf = cfg.block * cfg.patch_size
    out = {"nest": {"leaf_px": leaf}, "vit": {}}
    with torch.no_grad():
        pred_n = batched(lambda b: nest(b).argmax(1), x)
        pred_v = batched(lambda b: vit(b).argmax(1), x)
    out["nest"]["accuracy"] = float((pred_n == y).float().mean())
    out["vit"]["accuracy"] = float((pred_v == y).float().mean())
    log(f"  test accuracy: NesT {out['nest']['accuracy']:.3f}, ViT {out['vit']['accuracy']:.3f}")
    out["nest"]["gradcat"] = {f"sign{s:+d}": gradcat_metrics(nest, x, y, gt, s, log)[0] for s in (-1, 1)}
    out["nest"]["gradcat_chance"] = chance(gt, grid_cells(CANVAS, leaf))

    cam = batched(lambda b, t: nest_cam(nest, b, t, upsample=False), x, y)
    ngc = batched(lambda b, t: grad_cam(nest, b, t, upsample=False), x, y)
    vgc = batched(lambda b, t: grad_cam(vit, b, t, upsample=False), x, y)
    ro = batched(lambda b: attention_rollout(vit, b, upsample=False), x)
    low = {("nest", "cam"): cam, ("nest", "grad_cam"): ngc, ("vit", "grad_cam"): vgc, ("vit", "rollout"): ro}
    pred_low = {}
    if full:
        pred_low = {("nest", "cam"): batched(lambda b: nest_cam(nest, b, upsample=False), x),
                    ("nest", "grad_cam"): batched(lambda b: grad_cam(nest, b, upsample=False), x),
                    ("vit", "grad_cam"): batched(lambda b: grad_cam(vit, b, upsample=False), x), ("vit", "rollout"): ro}
        for key, model, grid in (("nest", nest, cam.shape[-1]), ("vit", vit, vgc.shape[-1])):
            occ = occlusion(model, x, y, window=CANVAS // grid, baseline=fill, batch=512)  # piecewise constant
            low[(key, "occlusion")] = to_grid(occ, grid)
    names = {"cam": "CAM", "grad_cam": "Grad-CAM", "rollout": "rollout", "occlusion": "occlusion"}
    for (key, method), m in low.items():
        pred = pred_n if key == "nest" else pred_v
        out[key][method] = map_metrics(f"{'NesT' if key == 'nest' else 'ViT'} {names[method]}", m, gt, leaf, log,
                                       negate=method in ("cam", "occlusion"), pred_low=pred_low.get((key, method)),
                                       pred=pred, y=y)
    grids = sorted({int(m.shape[-1]) for m in low.values()})
    if full:
        common = min(grids)
        out["common_grid"] = common
        for (key, method), m in low.items():
            if m.shape[-1] == common:
                out[key][f"{method}@common"] = {k: out[key][method][k] for k in ("grid", "polarity", "gt_known",
                                                                                 "threshold", "pointing")}
                continue
            out[key][f"{method}@common"] = map_metrics(
                f"{'NesT' if key == 'nest' else 'ViT'} {names[method]} pooled", to_grid(m, common), gt, leaf, log)
        out["oracle"] = {}
        for g in grids:
            out["oracle"][f"{g}x{g}"] = oracle_ceiling(gt, g)
            log(f"  oracle {g}x{g}: GT-known {out['oracle'][f'{g}x{g}']['oracle']:.3f}, some box of whole cells "
                f"reaches IoU 0.5 in {out['oracle'][f'{g}x{g}']['cell_box']:.3f}")
    return out, {"cam": cam, "vit_grad_cam": vgc, "rollout": ro, "nest_occ": low.get(("nest", "occlusion")),
                 "vit_occ": low.get(("vit", "occlusion"))}


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------

def example_figure(path, raw, x, y, gt, nest, maps, thresholds, names, n):
    from nestvit.explain.localization import map_to_box
    from nestvit.explain.plot import _plt, draw_box, draw_gradcat_path, overlay, show_image

    plt = _plt()
    idx = list(range(n))
    res = {s: gradcat(nest, x[idx], target=y[idx], sign=s) for s in (-1, 1)}
    cols = [("GradCAT, sign -1 (paper)", None), ("GradCAT, sign +1", None), ("NesT CAM", "cam"),
            ("NesT occlusion", "nest_occ"), ("ViT Grad-CAM", "vit_grad_cam"), ("ViT rollout", "rollout"),
            ("ViT occlusion", "vit_occ")]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.3 * n), squeeze=False)
    for r, i in enumerate(idx):
        for c, (title, key) in enumerate(cols):
            ax = axes[r, c]
            if key is None:
                show_image(ax, raw[i])
                draw_gradcat_path(ax, res[-1 if c == 0 else 1], r, 0, fontsize=5.5)
            else:
                heat = upsample_map(maps[key][i:i + 1], (CANVAS, CANVAS))[0]
                overlay(ax, raw[i], heat)
                draw_box(ax, map_to_box(heat, thresholds[key]), color="white", lw=1.5)
            draw_box(ax, gt[i], color="lime", lw=1.0, ls="--")
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(names[int(y[i])] if names else str(int(y[i])), fontsize=8)
    fig.suptitle("seed 0, true class explained; green dashed: object box; white: thresholded-map box", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def dataset_figure(path, raw, gt, y, names, n=12):
    from nestvit.explain.plot import _plt, draw_box, show_image

    plt = _plt()
    cols = 6
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        show_image(ax, raw[k])
        draw_box(ax, gt[k], color="lime", lw=1.0)
        ax.set_title(names[int(y[k])] if names else str(int(y[k])), fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# summary
# ----------------------------------------------------------------------------------------------

def flatten(d: dict, prefix: str = "") -> dict:
    """Numeric leaves of a nested result as ``{"a.b.c": value}`` (threshold curves and histories left out)."""
    out = {}
    for k, v in d.items():
        if k in ("acc_by_threshold", "history"):
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[key] = float(v)
    return out


def summarise(per_seed: list[dict]) -> dict:
    flat = [flatten(r) for r in per_seed]
    keys = [k for k in flat[0] if all(k in f for f in flat)]
    return {k: mean_ci([f[k] for f in flat]) for k in keys}


def fmt(s: dict | None, digits: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "-"
    if s.get("half") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['half']:.{digits}f}"


def markdown_table(summary: dict, untrained: dict | None, variant: str) -> str:
    """The headline table: mean ± 95 % t-interval half-width over seeds, chance and ceilings beside."""
    S = lambda k: summary.get(k)  # noqa: E731
    U = (lambda k: untrained.get(k)) if untrained else (lambda k: None)  # noqa: E731
    common = int(S("common_grid")["mean"]) if S("common_grid") else None
    rows = [("NesT test accuracy", "nest.accuracy", None, None), ("ViT test accuracy", "vit.accuracy", None, None)]
    for s in ("-1", "+1"):
        tag = " (paper)" if s == "-1" else ""
        rows.append((f"GradCAT sign {s}{tag}: leaf hit50", f"nest.gradcat.sign{s}.leaf_hit50",
                     "nest.gradcat_chance.hit50", "nest.gradcat_chance.hit50_possible"))
        rows.append((f"GradCAT sign {s}: leaf inside", f"nest.gradcat.sign{s}.leaf_inside",
                     "nest.gradcat_chance.inside", "nest.gradcat_chance.inside_possible"))
        steps = sorted({k.split(".")[4] for k in summary if k.startswith(f"nest.gradcat.sign{s}.steps.")},
                       key=lambda t: (t != "root", -int(t[1]) if t != "root" else 0))
        for st in steps:
            base = f"nest.gradcat.sign{s}.steps.{st}"
            rows.append((f"GradCAT sign {s}: step {st}, chose the best child", f"{base}.best", f"{base}.best_chance",
                         None))
            rows.append((f"GradCAT sign {s}: step {st}, chose the majority child", f"{base}.majority",
                         f"{base}.majority_chance", None))
    for key, method, label in (("nest", "cam", "NesT CAM"), ("nest", "grad_cam", "NesT Grad-CAM"),
                               ("nest", "occlusion", "NesT occlusion"), ("vit", "grad_cam", "ViT Grad-CAM"),
                               ("vit", "rollout", "ViT rollout"), ("vit", "occlusion", "ViT occlusion")):
        if not S(f"{key}.{method}.grid"):
            continue
        g = int(S(f"{key}.{method}.grid")["mean"])
        rows.append((f"{label} ({g}x{g}): polarity", f"{key}.{method}.polarity", None, None))
        rows.append((f"{label} ({g}x{g}): GT-known", f"{key}.{method}.gt_known", None, f"oracle.{g}x{g}.oracle"))
        if S(f"{key}.{method}.negated.gt_known"):
            rows.append((f"{label} negated ({g}x{g}): GT-known", f"{key}.{method}.negated.gt_known", None,
                         f"oracle.{g}x{g}.oracle"))
        if common and g != common:
            rows.append((f"{label} pooled to {common}x{common}: GT-known", f"{key}.{method}@common.gt_known", None,
                         f"oracle.{common}x{common}.oracle"))
            rows.append((f"{label} pooled to {common}x{common}: polarity", f"{key}.{method}@common.polarity", None,
                         None))
    lines = [f"| {variant} | trained | untrained | chance | ceiling |", "|---|---|---|---|---|"]
    for label, k, c, ceil in rows:
        lines.append(f"| {label} | {fmt(S(k))} | {fmt(U(k))} | {fmt(S(c)) if c else ''} | "
                     f"{fmt(S(ceil)) if ceil else ''} |")
    n = S("nest.accuracy")["n"]
    lines.append(f"\n(mean ± half-width of the 95 % Student-t interval over {n} seeds; ceiling of a map row: the "
                 "oracle map at its grid; of the leaf rows: the share of images where some leaf meets the criterion)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def _record_matches(path: Path, want: dict) -> dict | None:
    if not path.with_suffix(".json").exists() or not path.exists():
        return None
    rec = json.loads(path.with_suffix(".json").read_text())
    return rec if all(json.dumps(rec.get(k), sort_keys=True) == json.dumps(v, sort_keys=True)
                      for k, v in want.items()) else None


def find_weights(run_dir: Path, variant: str, seed: int, key: str, want: dict) -> tuple[Path, dict] | None:
    """Saved weights of ``key`` with the same model and training settings: this variant's seed folder first,
    then any other variant's (a ViT is the same for every variant that trains it the same way)."""
    own = run_dir / variant / f"seed{seed}" / f"{key}.safetensors"
    for path in [own] + sorted(p for p in run_dir.glob(f"*/seed{seed}/{key}.safetensors") if p != own):
        rec = _record_matches(path, want)
        if rec is not None:
            return path, rec
    return None


def run_seed(args, seed: int, names, log) -> dict:
    t0, c0 = time.time(), time.process_time()
    seed_dir = args.run_dir / args.variant / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    raw_test, y_test, box_test = make_localization_set(args.source, args.test_size, split="test",
                                                       seed=seed * 1000 + 999, **CANVAS_KW)
    gt = box_test.numpy().astype(np.float64)
    train_cfg = {"source": args.source, "train_size": args.train_size, "epochs": args.epochs,
                 "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "seed": seed,
                 "canvas": {k: list(v) if isinstance(v, tuple) else v for k, v in CANVAS_KW.items()}}
    nest_overrides = {**NEST[1], **VARIANTS[args.variant][0]}
    specs = {"nest": (NEST[0], nest_overrides), "vit": VIT}
    found = {k: find_weights(args.run_dir, args.variant, seed, k,
                             {"model": n, "overrides": o, "train": train_cfg}) for k, (n, o) in specs.items()}
    cache = seed_dir / "results.json"
    sig = {"eval_version": EVAL_VERSION, "test_size": args.test_size, "source": args.source,
           "skip_untrained": args.skip_untrained,
           "weights": {k: str(f[0]) if f else None for k, f in found.items()},
           "records": {k: f[1].get("trained_at") if f else None for k, f in found.items()}}
    if not args.eval_only and all(found.values()) and cache.exists():
        old = json.loads(cache.read_text())
        if old.get("signature") == sig:
            log(f"seed {seed}: weights and evaluation found in {seed_dir} (evaluation version {EVAL_VERSION}); reused")
            return old
    if args.eval_only and not all(found.values()):
        missing = [k for k, f in found.items() if not f]
        raise SystemExit(f"--eval-only: no saved {', '.join(missing)} weights for seed {seed} with these settings "
                         f"under {args.run_dir} (run without --eval-only to train them)")
    epoch_sets: dict[int, tuple] = {}

    def epoch_data(e: int):
        if e not in epoch_sets:  # kept for the second model (12 x 4096 canvases: 200 MB)
            epoch_sets[e] = make_localization_set(args.source, args.train_size, split="train",
                                                  seed=seed * 1000 + e + 1, **CANVAS_KW)
        return epoch_sets[e]

    if all(found.values()):
        mean, std = found["nest"][1]["mean"], found["nest"][1]["std"]
    else:
        first = epoch_data(0)[0].float()
        mean, std = float(first.mean() / 255), float(first.std() / 255)
    x_test = normalise(raw_test, mean, std)
    fill = float(normalise(torch.zeros(1), mean, std))  # black: the canvas background
    result = {"seed": seed, "signature": sig, "data": {"mean": mean, "std": std, "box_area_frac_mean": float(
        ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).mean() / CANVAS ** 2)}, "models": {}}
    models, fresh = {}, {}
    for key, (name, overrides) in specs.items():
        torch.manual_seed(seed)
        fresh[key] = nestvit.create_model(name, **overrides).eval()
        result["models"][key] = {"model": name, "overrides": overrides, "params": fresh[key].num_params()}
    if not args.skip_untrained:  # sanity check (Adebayo et al. 2018): what do the maps give with random weights?
        log(f"seed {seed}: evaluating the untrained models")
        result["untrained"] = evaluate(fresh, x_test, y_test, gt, log, fill=fill, full=False)[0]
    for key, (name, overrides) in specs.items():
        model = fresh[key]
        if found[key]:
            path, rec = found[key]
            load_weights(model, path)
            log(f"seed {seed}: {key} read back from {path} (trained {rec['train_minutes']:.1f} min)")
            result["models"][key].update({k: rec[k] for k in ("history", "train_minutes", "train_cpu_minutes",
                                                              "steps", "weights")})
        else:
            log(f"seed {seed}: training {key} ({name}, {model.num_params() / 1e6:.3f}M params) for {args.epochs} "
                f"epochs")
            rec = train(model, epoch_data, args, seed, mean, std, log)
            path = seed_dir / f"{key}.safetensors"
            meta = {"model": name, "model_overrides": json.dumps(overrides), "mean": json.dumps([mean]),
                    "std": json.dumps([std]), "classes": json.dumps(names)}
            save_weights(model, path, metadata=meta)
            rec.update({"model": name, "overrides": overrides, "train": train_cfg, "mean": mean, "std": std,
                        "weights": str(path.relative_to(args.run_dir)),
                        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S")})
            atomic_write_text(path.with_suffix(".json"), json.dumps(rec, indent=1))
            result["models"][key].update({k: rec[k] for k in ("history", "train_minutes", "train_cpu_minutes",
                                                              "steps", "weights")})
            sig["weights"][key], sig["records"][key] = str(path), rec["trained_at"]
        models[key] = model.eval()
    epoch_sets.clear()
    log(f"seed {seed}: evaluating the trained models")
    result["trained"], maps = evaluate(models, x_test, y_test, gt, log, fill=fill)
    if seed == args.seeds[0] and args.examples:
        args.img_dir.mkdir(parents=True, exist_ok=True)
        thr = {"cam": result["trained"]["nest"]["cam"]["threshold"],
               "nest_occ": result["trained"]["nest"]["occlusion"]["threshold"],
               "vit_grad_cam": result["trained"]["vit"]["grad_cam"]["threshold"],
               "rollout": result["trained"]["vit"]["rollout"]["threshold"],
               "vit_occ": result["trained"]["vit"]["occlusion"]["threshold"]}
        example_figure(args.img_dir / f"explain_localization_{args.variant}_examples.png", raw_test, x_test, y_test,
                       box_test, models["nest"], maps, thr, names, args.examples)
        if args.variant == "base":
            dataset_figure(args.img_dir / "explain_synthetic_set.png", raw_test, box_test, y_test, names)
        samples = args.run_dir / args.variant / "samples"
        samples.mkdir(exist_ok=True)
        from PIL import Image

        result["samples"] = {}
        for i in range(4):  # for the `nestvit explain` examples in docs/interpretability.md
            Image.fromarray(raw_test[i, 0].numpy()).save(samples / f"explain_sample{i}.png")
            result["samples"][f"explain_sample{i}.png"] = {"class": names[int(y_test[i])], "box": box_test[i].tolist()}
    result["signature"] = sig
    result["wall_minutes"] = (time.time() - t0) / 60
    result["cpu_minutes"] = (time.process_time() - c0) / 60
    atomic_write_text(cache, json.dumps(result, indent=1))
    log(f"seed {seed}: done in {result['wall_minutes']:.1f} min wall, {result['cpu_minutes']:.1f} min CPU")
    return result


def step_labels(summary: dict, sign: str) -> list[tuple[str, str]]:
    """``[(step key, "64->32 px"), ...]`` top first: the steps named by their node and child edge in pixels."""
    steps = sorted({k.split(".")[4] for k in summary if k.startswith(f"nest.gradcat.sign{sign}.steps.")},
                   key=lambda t: (t != "root", -int(t[1]) if t != "root" else 0))
    leaf = int(summary["nest.leaf_px"]["mean"])
    return [(st, f"{leaf * 2 ** (len(steps) - i)}->{leaf * 2 ** (len(steps) - 1 - i)} px")
            for i, st in enumerate(steps)]


def report(variants: list[str], json_dir: Path) -> str:
    """One Markdown table, a column per variant (mean ± 95 % t half-width over its seeds), from the saved JSONs."""
    data = {v: json.loads((json_dir / f"explain_localization_{v}.json").read_text()) for v in variants}
    S = {v: d["summary"] for v, d in data.items()}
    labels = {}  # row label -> {variant: key}

    def row(label, key_of):
        labels.setdefault(label, {})
        for v in variants:
            k = key_of(v)
            if k is not None and k in S[v]:
                labels[label][v] = k

    row("NesT test accuracy", lambda v: "nest.accuracy")
    row("ViT test accuracy", lambda v: "vit.accuracy")
    row("GradCAT leaf edge (px)", lambda v: "nest.leaf_px")
    for s in ("-1", "+1"):
        row(f"GradCAT sign {s}: leaf hit50", lambda v, s=s: f"nest.gradcat.sign{s}.leaf_hit50")
    row("  leaf hit50: chance", lambda v: "nest.gradcat_chance.hit50")
    row("  leaf hit50: some leaf can", lambda v: "nest.gradcat_chance.hit50_possible")
    for s in ("-1", "+1"):
        row(f"GradCAT sign {s}: leaf inside", lambda v, s=s: f"nest.gradcat.sign{s}.leaf_inside")
    row("  leaf inside: chance", lambda v: "nest.gradcat_chance.inside")
    for edge in ("64->32 px", "32->16 px", "16->8 px"):
        for crit in ("best", "majority"):
            for s in ("-1", "+1"):
                row(f"GradCAT sign {s}: step {edge}, {crit} child (chance)",
                    lambda v, s=s, e=edge, c=crit: next((f"nest.gradcat.sign{s}.steps.{k}.{c}" for k, lab in
                                                         step_labels(S[v], s) if lab == e), None))
    for key, method, name in (("nest", "cam", "NesT CAM"), ("nest", "grad_cam", "NesT Grad-CAM"),
                              ("nest", "occlusion", "NesT occlusion"), ("vit", "grad_cam", "ViT Grad-CAM"),
                              ("vit", "rollout", "ViT rollout"), ("vit", "occlusion", "ViT occlusion")):
        row(f"{name}: grid", lambda v, k=key, m=method: f"{k}.{m}.grid")
        row(f"{name}: polarity", lambda v, k=key, m=method: f"{k}.{m}.polarity")
        row(f"{name}: GT-known", lambda v, k=key, m=method: f"{k}.{m}.gt_known")
        if method in ("cam", "occlusion"):
            row(f"{name} negated: GT-known", lambda v, k=key, m=method: f"{k}.{m}.negated.gt_known")
        row(f"{name}: GT-known on the common grid", lambda v, k=key, m=method: f"{k}.{m}@common.gt_known")
    row("common grid", lambda v: "common_grid")
    for g in (4, 8):
        row(f"oracle map {g}x{g}: GT-known", lambda v, g=g: f"oracle.{g}x{g}.oracle")
        row(f"cells {g}x{g}: some whole-cell box reaches IoU 0.5", lambda v, g=g: f"oracle.{g}x{g}.cell_box")
    head = "| | " + " | ".join(f"{v} ({len(data[v]['seeds'])} seeds)" for v in variants) + " |"
    lines = [head, "|---" * (len(variants) + 1) + "|"]
    for label, keys in labels.items():
        if not keys:
            continue
        whole = label.endswith(": grid") or label == "common grid" or "edge" in label

        cells = [("" if v not in keys else f"{S[v][keys[v]]['mean']:.0f}" if whole else fmt(S[v][keys[v]]))
                 for v in variants]
        if "(chance)" in label:  # the exact chance of a uniformly random child on the same steps, beside
            cells = [c and f"{c} ({S[v][keys[v] + '_chance']['mean']:.3f})" for c, v in zip(cells, variants)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        json_dir = args.out_json.parent
        print(report(args.report, json_dir))
        return 0
    torch.set_num_threads(args.threads)
    t_start, c_start = time.time(), time.process_time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    from nestvit.data import load_dataset

    names = list(load_dataset(args.source, split="test").classes)
    log(f"variant {args.variant}: {VARIANTS[args.variant][2]}; seeds {args.seeds}; {args.epochs} epochs x "
        f"{args.train_size} training canvases, {args.test_size} test canvases per seed, {args.threads} thread(s)")
    per_seed = [run_seed(args, s, names, log) for s in args.seeds]
    summary = summarise([r["trained"] for r in per_seed])
    untrained = summarise([r["untrained"] for r in per_seed]) if all("untrained" in r for r in per_seed) else None
    command = " ".join(["python experiments/localization.py"] + (argv if argv is not None else sys.argv[1:]))
    results = {
        "command": command, "variant": args.variant, "variant_about": VARIANTS[args.variant][2],
        "seeds": args.seeds, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in per_seed[0]["models"].items()},
        "interval": "95 % Student-t over seeds: mean +- t_{0.975,n-1} s/sqrt(n)",
        "summary": summary, "summary_untrained": untrained,
        "per_seed": per_seed,
        "wall_minutes": (time.time() - t_start) / 60, "cpu_minutes": (time.process_time() - c_start) / 60,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()}}
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out_json, json.dumps(results, indent=1))
    log("")
    log(markdown_table(summary, untrained, args.variant))
    log(f"\nwrote {args.out_json} ({results['wall_minutes']:.1f} min wall, {results['cpu_minutes']:.1f} min CPU in "
        f"this process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
