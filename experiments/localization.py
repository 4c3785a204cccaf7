#!/usr/bin/env python
"""Weakly supervised localization on a synthetic set with known boxes: NesT (GradCAT, CAM) vs ViT.

A small NesT and a ViT of about the same size are trained on the *labels only* of
``nestvit.explain.make_localization_set`` (Fashion-MNIST items pasted at random positions and sizes
on a cluttered 64x64 canvas; fresh canvases every epoch). On held-out canvases built from the test
split, the script measures

- GradCAT (NesT, explaining the true class): how often the leaf block the path ends in lies on the
  object. ``hit50``: at least 50 % of the leaf's area lies inside the object's box; ``inside``: the
  whole leaf lies inside the box. Chance levels: the same for a leaf drawn uniformly at random.
  Both gradient signs (-1 as the paper, +1) are measured.
- the same "pointing" criteria for the best leaf-sized cell of NesT's CAM and of the ViT's Grad-CAM
  and attention rollout (the map averaged over the leaf grid, argmax cell);
- GT-known localization accuracy (box from the true class's map, IoU >= 0.5) and top-1 localization
  error for NesT CAM, ViT Grad-CAM and ViT rollout, each with its threshold searched in steps of 0.05
  on the evaluation set (the CAM protocol).

Writes ``docs/img/explain_localization.json`` and example figures ``docs/img/explain_*.png``; keeps the
trained weights in ``runs/localization/`` (``nestvit explain`` can read them). ``--eval-only``
re-evaluates those weights; ``--quick`` is a smoke run of about one CPU-minute (in runs/localization/quick/).

    python experiments/localization.py            # default: ~5-7 CPU-minutes, one thread
    python experiments/localization.py --eval-only
    python experiments/localization.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
    search_threshold,
    top1_loc_error,
)
from nestvit.explain.synthetic import make_localization_set
from nestvit.fileio import atomic_write_text, save_figure
from nestvit.interop import load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]

NEST = ("nest_tiny_cifar", dict(img_size=64, in_chans=1, num_classes=10, patch_size=4, num_levels=3, block_size=None,
                                embed_dims=(32, 64, 128), num_heads=(1, 2, 4), depths=(1, 1, 2)))
NEST_LEAF = NEST[1]["patch_size"] * NEST[1]["img_size"] // NEST[1]["patch_size"] // 2 ** (NEST[1]["num_levels"] - 1)
# patch 8 (8x8 tokens): about NesT's parameters and forward FLOPs; patch 4 (257 tokens) costs ~4x more per image
VIT = ("vit_tiny_patch4_32", dict(img_size=64, in_chans=1, num_classes=10, patch_size=8, embed_dim=96, depth=4,
                                  num_heads=3))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="fashion_mnist", choices=("fashion_mnist", "mnist5k", "mnist"))
    p.add_argument("--train-size", type=int, default=4096, help="fresh training canvases per epoch")
    p.add_argument("--test-size", type=int, default=512)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads ran up to 10x slower)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sets, one epoch")
    p.add_argument("--out-json", type=Path, default=ROOT / "docs/img/explain_localization.json")
    p.add_argument("--img-dir", type=Path, default=ROOT / "docs/img")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs/localization")
    p.add_argument("--examples", type=int, default=6, help="test canvases shown in the example figure")
    p.add_argument("--nest-only", action="store_true", help="train and evaluate NesT only (no figures)")
    p.add_argument("--skip-untrained", action="store_true", help="skip the random-weight baselines")
    p.add_argument("--eval-only", action="store_true",
                   help="re-evaluate the weights saved in --run-dir (no training); keeps the training log and "
                        "normalisation of the existing --out-json")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.examples = 512, 64, 1, 4
        args.run_dir = args.run_dir / "quick"  # never overwrites the default run's weights or figures
        args.out_json = args.run_dir / "quick.json"
        args.img_dir = args.run_dir / "img"
    return args


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def normalise(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (x.float() / 255.0 - mean) / std


def train(model, data, args, mean, std, log) -> dict:
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and n not in model.no_weight_decay()]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and n not in model.no_weight_decay())]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = args.train_size // args.batch_size
    total, warm = steps_per_epoch * args.epochs, max(1, steps_per_epoch // 2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(args.seed)
    t0, history = time.time(), []
    model.train()
    for epoch, (x, y, _) in enumerate(data):
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
        log(f"  epoch {epoch + 1}/{len(data)}: loss {loss_sum / seen:.3f} train acc {right / seen:.3f} "
            f"({(time.time() - t0) / 60:.1f} min)")
    model.eval()
    return {"history": history, "train_minutes": (time.time() - t0) / 60, "steps": total}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def leaf_criteria(boxes: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(hit50, inside)`` per row: >= 50 % of the cell's area in the GT box; the cell wholly inside it."""
    iw = np.clip(np.minimum(boxes[:, 2], gt[:, 2]) - np.maximum(boxes[:, 0], gt[:, 0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], gt[:, 3]) - np.maximum(boxes[:, 1], gt[:, 1]), 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = ((boxes[:, 0] >= gt[:, 0]) & (boxes[:, 1] >= gt[:, 1])
              & (boxes[:, 2] <= gt[:, 2]) & (boxes[:, 3] <= gt[:, 3]))
    return iw * ih >= 0.5 * area, inside


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
    cells = grid_cells(maps.shape[-1], cell)
    best = cells[pooled.argmax(1).numpy()]
    hit, ins = leaf_criteria(best, gt)
    return {"hit50": float(hit.mean()), "inside": float(ins.mean())}


@torch.no_grad()
def occlusion_maps(model, x, y, cell: int, fill: float) -> torch.Tensor:
    """Drop of the true-class logit when one leaf-sized cell is set to the background value ``fill``
    (a perturbation reference: what the model's decision actually depends on), ``(N, n, n)``."""
    n = x.shape[-1] // cell
    out = torch.zeros(len(x), n, n)
    for i in range(0, len(x), 128):
        xb, yb = x[i:i + 128], y[i:i + 128]
        base = model(xb).gather(1, yb[:, None])[:, 0]
        for r in range(n):
            for c in range(n):
                xo = xb.clone()
                xo[..., r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = fill
                out[i:i + 128, r, c] = base - model(xo).gather(1, yb[:, None])[:, 0]
    return out


def occlusion_pointing(model, x, y, gt, cell: int, fill: float, log, name: str) -> dict:
    occ = occlusion_maps(model, x, y, cell, fill)
    res = pointing(occ.repeat_interleave(cell, 1).repeat_interleave(cell, 2), cell, gt)
    log(f"  {name} occlusion pointing {res}")
    return res


def batched(fn, x, bs=128):
    return torch.cat([fn(x[i:i + bs]) for i in range(0, len(x), bs)])


def box_metrics(name: str, gt_maps, pred_maps, pred, y, gt, log) -> dict:
    best_t, accs = search_threshold(gt_maps, gt)
    pred_boxes = maps_to_boxes(pred_maps, best_t)
    out = {"gt_known_loc_acc": accs[best_t], "threshold": best_t,
           "top1_loc_error": top1_loc_error(pred, y, pred_boxes, gt),
           "acc_by_threshold": {f"{t:.2f}": round(a, 4) for t, a in accs.items()}}
    log(f"  {name}: GT-known loc acc {out['gt_known_loc_acc']:.3f} at threshold {best_t:.2f}, "
        f"top-1 loc error {out['top1_loc_error']:.3f}")
    return out


def evaluate_nest(model, x, y, gt, log) -> dict:
    cfg = model.cfg
    leaf = cfg.block * cfg.patch_size
    with torch.no_grad():
        pred = batched(lambda b: model(b).argmax(1), x)
    out = {"accuracy": float((pred == y).float().mean()), "leaf_px": leaf}
    log(f"  NesT test accuracy {out['accuracy']:.3f}")
    res = {}
    for sign in (-1, 1):
        for top in ("normalized", "raw"):
            if top == "raw" and sign == 1:
                continue
            leaves, level2 = [], []
            for i in range(0, len(x), 128):
                r = gradcat(model, x[i:i + 128], target=y[i:i + 128], sign=sign, top=top, keep_maps=False)
                leaves.append(r.leaf_boxes[:, 0].numpy())
                level2.append(r.boxes[:, 0, -2].numpy())
            leaves, level2 = np.concatenate(leaves), np.concatenate(level2)
            hit, ins = leaf_criteria(leaves, gt)
            hit2, _ = leaf_criteria(level2, gt)
            key = f"sign{sign:+d}" + ("" if top == "normalized" else "_rawtop")
            res[key] = {"leaf_hit50": float(hit.mean()), "leaf_inside": float(ins.mean()),
                        "level2_hit50": float(hit2.mean())}
            log(f"  GradCAT {key}: leaf hit50 {hit.mean():.3f}, leaf inside {ins.mean():.3f}, "
                f"level-2 node hit50 {hit2.mean():.3f}")
    out["gradcat"] = res
    out["gradcat_chance"] = chance(gt, grid_cells(x.shape[-1], leaf))
    out["gradcat_chance_level2"] = chance(gt, grid_cells(x.shape[-1], 2 * leaf))
    cam_gt = torch.cat([nest_cam(model, x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)])
    cam_pred = torch.cat([nest_cam(model, x[i:i + 128]) for i in range(0, len(x), 128)])
    out["cam"] = box_metrics("NesT CAM", cam_gt, cam_pred, pred, y, gt, log)
    out["cam"]["pointing"] = pointing(cam_gt, leaf, gt)
    # the same with the map negated: which end of the class evidence sits on the object?
    out["cam_negated"] = box_metrics("NesT -CAM", -cam_gt, -cam_pred, pred, y, gt, log)
    out["cam_negated"]["pointing"] = pointing(-cam_gt, leaf, gt)
    gc_gt = torch.cat([grad_cam(model, x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)])
    gc_pred = torch.cat([grad_cam(model, x[i:i + 128]) for i in range(0, len(x), 128)])
    out["grad_cam"] = box_metrics("NesT Grad-CAM", gc_gt, gc_pred, pred, y, gt, log)
    out["grad_cam"]["pointing"] = pointing(gc_gt, leaf, gt)
    log(f"  NesT CAM pointing {out['cam']['pointing']}, Grad-CAM pointing {out['grad_cam']['pointing']}")
    out["occlusion"] = {"pointing": occlusion_pointing(model, x, y, gt, leaf, float(x.min()), log, "NesT")}
    return out, pred, cam_gt


def evaluate_vit(model, x, y, gt, leaf, log) -> dict:
    with torch.no_grad():
        pred = batched(lambda b: model(b).argmax(1), x)
    out = {"accuracy": float((pred == y).float().mean())}
    log(f"  ViT test accuracy {out['accuracy']:.3f}")
    gc_gt = torch.cat([grad_cam(model, x[i:i + 128], y[i:i + 128]) for i in range(0, len(x), 128)])
    gc_pred = torch.cat([grad_cam(model, x[i:i + 128]) for i in range(0, len(x), 128)])
    out["grad_cam"] = box_metrics("ViT Grad-CAM", gc_gt, gc_pred, pred, y, gt, log)
    out["grad_cam"]["pointing"] = pointing(gc_gt, leaf, gt)
    ro = torch.cat([attention_rollout(model, x[i:i + 128]) for i in range(0, len(x), 128)])
    out["rollout"] = box_metrics("ViT rollout", ro, ro, pred, y, gt, log)
    out["rollout"]["pointing"] = pointing(ro, leaf, gt)
    log(f"  ViT Grad-CAM pointing {out['grad_cam']['pointing']}, rollout pointing {out['rollout']['pointing']}")
    out["occlusion"] = {"pointing": occlusion_pointing(model, x, y, gt, leaf, float(x.min()), log, "ViT")}
    return out, pred, gc_gt, ro


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------

def example_figure(path, raw, x, y, gt, nest, vit, nest_cam_maps, vit_gc, vit_ro, thresholds, names, n):
    from nestvit.explain.localization import map_to_box
    from nestvit.explain.plot import _plt, draw_box, draw_gradcat_path, overlay, show_image

    plt = _plt()
    idx = list(range(n))
    res = gradcat(nest, x[idx], target=y[idx], sign=-1)
    res_pos = gradcat(nest, x[idx], target=y[idx], sign=1)
    cols = ["GradCAT (sign -1, paper)", "GradCAT (sign +1)", "NesT CAM", "ViT Grad-CAM", "ViT rollout"]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.3 * len(cols), 2.4 * n), squeeze=False)
    for r, i in enumerate(idx):
        for c, title in enumerate(cols):
            ax = axes[r, c]
            if c < 2:
                show_image(ax, raw[i])
                draw_gradcat_path(ax, res if c == 0 else res_pos, r, 0, fontsize=5.5)
            else:
                heat = {2: nest_cam_maps, 3: vit_gc, 4: vit_ro}[c][i]
                overlay(ax, raw[i], heat)
                draw_box(ax, map_to_box(heat, thresholds[c]), color="white", lw=1.5)
            draw_box(ax, gt[i], color="lime", lw=1.0, ls="--")
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r, 0].set_ylabel(names[int(y[i])] if names else str(int(y[i])), fontsize=8)
    fig.suptitle("true class explained; green dashed: object box; white: thresholded-map box", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    save_figure(fig, path, dpi=90)
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

def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    log = lambda s: print(s, flush=True)
    from nestvit.data import load_dataset

    names = list(load_dataset(args.source, split="test").classes)
    kw = dict(canvas=64, scale=(24, 44), clutter=True)
    old = json.loads(args.out_json.read_text()) if args.eval_only else None
    log(f"building {0 if old else args.epochs} x {args.train_size} training canvases and {args.test_size} test "
        f"canvases from {args.source}")
    data = [] if old else [make_localization_set(args.source, args.train_size, split="train",
                                                 seed=args.seed * 1000 + e + 1, **kw) for e in range(args.epochs)]
    raw_test, y_test, box_test = make_localization_set(args.source, args.test_size, split="test",
                                                       seed=args.seed * 1000 + 999, **kw)
    if old:
        mean, std = old["data"]["mean"], old["data"]["std"]
    else:
        mean = float(data[0][0].float().mean() / 255)
        std = float(data[0][0].float().std() / 255)
    x_test = normalise(raw_test, mean, std)
    gt = box_test.numpy().astype(np.float64)
    results = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "data": {"source": args.source, **{k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()},
                        "mean": mean, "std": std,
                        "box_area_frac_mean": float(((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).mean() / 64 ** 2)},
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}}

    args.run_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for key, (name, overrides) in (("nest", NEST),) + ((("vit", VIT),) if not args.nest_only else ()):
        torch.manual_seed(args.seed)
        model = nestvit.create_model(name, **overrides)
        results[key] = {"model": name, "overrides": overrides, "params": model.num_params()}
        if not args.skip_untrained:  # sanity check (Adebayo et al. 2018): what do the maps give with random weights?
            log(f"evaluating the untrained {key}")
            model.eval()
            evaluate = evaluate_nest if key == "nest" else lambda *a: evaluate_vit(*a[:4], NEST_LEAF, a[4])
            results[key]["untrained"] = evaluate(model, x_test, y_test, gt, log)[0]
        if old:
            load_weights(model, args.run_dir / f"{key}.safetensors")
            results[key].update({k: old[key][k] for k in ("history", "train_minutes", "steps")})
            results["training_run"] = old.get("training_run") or {
                k: old.get(k) for k in ("command", "wall_minutes", "cpu_minutes", "load_average_at_end")}
        else:
            log(f"training {key} ({name}, {model.num_params() / 1e6:.3f}M params) for {args.epochs} epochs")
            results[key].update(train(model, data, args, mean, std, log))
            meta = {"model": name, "model_overrides": json.dumps(overrides), "mean": json.dumps([mean]),
                    "std": json.dumps([std]), "classes": json.dumps(names)}
            save_weights(model, args.run_dir / f"{key}.safetensors", metadata=meta)
        models[key] = model.eval()

    log("evaluating NesT")
    nest_out, nest_pred, nest_cam_gt = evaluate_nest(models["nest"], x_test, y_test, gt, log)
    results["nest"].update(nest_out)
    if args.nest_only:
        results["wall_minutes"] = (time.time() - t_start) / 60
        atomic_write_text(args.out_json, json.dumps(results, indent=1))
        log(f"wrote {args.out_json} ({results['wall_minutes']:.1f} min)")
        return 0
    log("evaluating ViT")
    vit_out, vit_pred, vit_gc, vit_ro = evaluate_vit(models["vit"], x_test, y_test, gt, nest_out["leaf_px"], log)
    results["vit"].update(vit_out)

    args.img_dir.mkdir(parents=True, exist_ok=True)
    thresholds = {2: nest_out["cam"]["threshold"], 3: vit_out["grad_cam"]["threshold"],
                  4: vit_out["rollout"]["threshold"]}
    example_figure(args.img_dir / "explain_localization_examples.png", raw_test, x_test, y_test, box_test,
                   models["nest"], models["vit"], nest_cam_gt, vit_gc, vit_ro, thresholds, names, args.examples)
    dataset_figure(args.img_dir / "explain_synthetic_set.png", raw_test, box_test, y_test, names)
    samples = args.run_dir / "samples"
    samples.mkdir(exist_ok=True)
    from PIL import Image

    results["samples"] = {}
    for i in range(4):  # for the `nestvit explain` examples in docs/interpretability.md
        Image.fromarray(raw_test[i, 0].numpy()).save(samples / f"explain_sample{i}.png")
        results["samples"][f"explain_sample{i}.png"] = {"class": names[int(y_test[i])], "box": box_test[i].tolist()}
    results["wall_minutes"] = (time.time() - t_start) / 60
    results["cpu_minutes"] = time.process_time() / 60  # independent of other jobs sharing the machine
    results["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    atomic_write_text(args.out_json, json.dumps(results, indent=1))
    log(f"wrote {args.out_json} and figures in {args.img_dir} ({results['wall_minutes']:.1f} min wall, "
        f"{results['cpu_minutes']:.1f} min CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
