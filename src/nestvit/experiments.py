"""``nestvit experiment NAME``: rerun the NesT and RTNT papers' central experiments and write tables and plots.

Every experiment is a list of *arms* (a model and a recipe, differing in one thing), each trained once
per seed by the project's trainer (``nestvit.train.train``, one call per run). The driver collects the
final test top-1 of every run, its wall time and training throughput, the model's parameters and
forward FLOPs (``nestvit.flops.count_flops``), aggregates over seeds (mean, sample standard deviation,
min, max) and writes, under ``--out`` (default ``runs/experiments/NAME``)::

    results.json   every run and every aggregate, with the exact configs' differences
    results.md     the Markdown table (what docs/results.md shows)
    results.png    the plot
    runs/<arm>-s<seed>/   the trainer's run directories (metrics.jsonl, summary.json, weights)

A run whose directory already holds a ``summary.json`` is read back, not retrained, so an interrupted
experiment continues where it stopped (``--fresh`` retrains everything).

The defaults are sized for a shared 2-core CPU (about 30 minutes or less per experiment, see
docs/results.md); ``--train-size``, ``--eval-size``, ``--epochs``, ``--data``, ``--device`` and
``--set`` scale them up to the papers' settings on a GPU. ``--quick`` is a seconds-long smoke test on
synthetic images (the tests use it).

Experiments:
  rtnt_vs_tnt        RTNT-nano with the innermost level in every block vs in none (TNT-like), RTNT recipe
  aggregation        NesT block aggregation variants, image plane and block plane (NesT Fig. 5 / A1)
  hierarchy          NesT number of levels and patch size (NesT Fig. 6)
  data_efficiency    NesT vs matched ViT, TNT, RTNT at several training-set sizes, same step budget (Fig. 4)
  best_fashion_mnist the best nested model on Fashion-MNIST in a fixed CPU time budget
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli_args import nonnegative_int, positive_int, writable_dir
from .fileio import atomic_path, atomic_write_text, save_figure
from .system import machine_label

# --------------------------------------------------------------------------------------------------
# recipes shared by the experiments
# --------------------------------------------------------------------------------------------------

# The RTNT paper's recipe: AdamW (no weight decay: Adam), lr 1e-3 unscaled, x0.96 every 200 steps, no
# augmentation. The batch (64) is an assumption (the paper does not give it), as in recipes/rtnt_*.yaml.
RTNT_RECIPE: dict[str, Any] = {
    "global_batch": 64,
    "log_every": 10,
    "aug": {},
    "optim": {"lr": 1.0e-3, "lr_ref_batch": 0, "weight_decay": 0.0, "no_decay": "1d_and_tokens"},
    "schedule": {"name": "step", "step_every": 200, "gamma": 0.96},
}

# The small NesT of this project's mnist5k demo (recipes/mnist5k_nest.yaml): 28x28 images padded to 32,
# 2x2-pixel patches, 3 levels (16 -> 4 -> 1 blocks of 4x4 patches), width 64, 2 heads, depths 1/1/2.
SMALL_NEST: dict[str, Any] = {"patch_size": 2, "num_levels": 3, "block_size": 4, "embed_dims": 64,
                              "num_heads": 2, "depths": [1, 1, 2]}
# A ViT matched to SMALL_NEST in parameters and forward FLOPs: 4x4-pixel patches of the padded 32x32
# image (64 tokens + class token), width 64, 5 layers, 2 heads (0.26M params / 0.29M for the NesT;
# see results.json for the measured FLOPs).
SMALL_VIT: dict[str, Any] = {"embed_dim": 64, "depth": 5, "num_heads": 2}

# The NesT recipe used for the ablations and the data-efficiency runs: AdamW, cosine with one warmup
# epoch, random crops (pad 2), no other augmentation (as recipes/mnist5k_nest.yaml).
NEST_RECIPE: dict[str, Any] = {
    "global_batch": 64,
    "log_every": 10,
    "data": {"pad_to": 32},
    "aug": {"crop_padding": 2},
    "optim": {"lr": 2.0e-3, "lr_ref_batch": 0, "weight_decay": 0.05},
    "schedule": {"name": "cosine", "warmup_epochs": 0.5},
}


def _merge(base: dict[str, Any], *more: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of recipe dicts (later wins); the inputs are not modified."""
    import copy

    out = copy.deepcopy(base)
    for m in more:
        for k, v in m.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides":
                out[k] = _merge(out[k], v)
            else:
                out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------------
# arms, runs and aggregates
# --------------------------------------------------------------------------------------------------

@dataclass
class Arm:
    """One configuration of an experiment, trained once per seed."""

    name: str  # unique, used in file names
    recipe: dict[str, Any]  # a full recipe dict (TrainConfig fields)
    labels: dict[str, Any] = field(default_factory=dict)  # the table's columns (model, data, variant, ...)


@dataclass
class Plan:
    experiment: str
    arms: list[Arm]
    seeds: list[int]
    notes: list[str]  # what the defaults deviate from in the paper, printed into the Markdown
    columns: list[str]  # the label columns of the table
    plot: Callable[[dict[str, Any], Path], None]
    paper: dict[str, str] = field(default_factory=dict)  # arm name -> the paper's number, when it has one
    tta: tuple[str, ...] = ()  # test-time augmentations, a column each (last weights; data.augment.tta_views)


def mean_spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"n", "mean", "std" (sample, ddof 1; None for one value), "min", "max"}`` of ``values``."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals)}


def fmt_ms(s: dict[str, Any], digits: int = 2) -> str:
    """``"91.23 ± 0.45"`` (mean ± sample std over seeds), ``"91.23"`` for one seed, ``"-"`` for none."""
    if not s or s.get("mean") is None:
        return "-"
    if s.get("std") is None:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


_SHAPES: dict[tuple, tuple[int, int, tuple[int, int]]] = {}


def _model_stats(cfg: Any) -> dict[str, Any]:
    """Parameters and forward FLOPs per image of ``cfg``'s model at the data set's input size."""
    import torch

    from .flops import count_flops
    from .train.inputs import load_split
    from .train.runs import build_model

    d = cfg.data
    key = (d.name, d.root, d.train_split, d.resize_to, d.pad_to, d.img_size)
    if key not in _SHAPES:  # (classes, channels, size) of the data set; reading it once per experiment
        split = load_split(dataclasses.replace(d, limit_train=None), d.train_split, torch.device("cpu"), limit=2)
        _SHAPES[key] = (len(split.classes), split.channels, split.size)
    classes, channels, size = _SHAPES[key]
    model, _ = build_model(cfg.model, num_classes=classes, in_chans=channels, img_size=size)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, (1, channels, *size))
    return {"params": params, "flops": flops}


def _read_run(run_dir: Path) -> dict[str, Any]:
    """The numbers of a finished run directory: summary.json plus the epoch records of metrics.jsonl."""
    from .train.metrics import METRICS_FILE, read_metrics

    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = run_dir / METRICS_FILE
    records = read_metrics(metrics) if metrics.is_file() else []
    epochs = [{k: rec.get(k) for k in ("epoch", "step", "train_loss", "train_acc", "test_top1", "img_s", "time_s")}
              for rec in records if rec.get("kind") == "epoch"]
    train_s = sum(e["time_s"] or 0 for e in epochs)
    images = sum((e["img_s"] or 0) * (e["time_s"] or 0) for e in epochs)
    wall = summary.get("wall_s")
    from .train.checkpoint import STATE_FILE, load_state

    state = run_dir / STATE_FILE
    if wall is not None and state.is_file():  # summaries before 2026-12-06 counted the last piece of a resumed run
        wall = max(wall, float(load_state(state).get("elapsed_s") or 0.0))  # every piece's training and evaluation
    return {"test_top1": summary.get("test_top1"), "best_top1": summary.get("best_top1"),
            "epochs": summary.get("epochs"), "steps": summary.get("steps"), "wall_s": wall,
            "train_s": round(train_s, 1), "train_img_s": images / train_s if train_s > 0 else None,
            "precision": summary.get("precision"),  # absent in runs before precision auto
            "machine": machine_label(summary.get("machine")),  # absent in runs before the thirteenth session
            "curve": [(e["epoch"], e["test_top1"]) for e in epochs if e.get("test_top1") is not None]}


def tta_top1(run_dir: Path, cfg: Any, mode: str, device: str | None) -> float:
    """Test top-1 of the run's last weights with test-time augmentation ``mode``, at the run's precision.

    A run trained with ``tta: <mode>`` already scored its last weights so (``summary.json``); others are
    evaluated here once and cached in ``run_dir/tta_<mode>.json`` (a retrained run's directory is made anew,
    and the cache with it).
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    if summary.get("tta") == mode:
        return float(summary["test_top1_tta"])
    cache = run_dir / f"tta_{mode}.json"
    if cache.is_file():
        return float(json.loads(cache.read_text())["top1"])
    from .contract import load
    from .system import resolve_precision
    from .train.distributed import DistInfo, resolve_device
    from .train.inputs import load_split
    from .train.loop import evaluate

    loaded = load(run_dir, "last")
    dev = resolve_device(device)
    precision = summary.get("precision") or resolve_precision(cfg.precision, dev)  # the run's own
    split = load_split(cfg.data, cfg.data.eval_split, dev, limit=cfg.data.limit_eval)
    t = loaded.transform
    res = evaluate(loaded.model.to(dev), split, mean=t.mean, std=t.std, batch=cfg.eval_batch,
                   info=DistInfo(device=dev), precision=precision, tta=mode)
    with atomic_path(cache) as tmp:
        tmp.write_text(json.dumps({"weights": "last", "tta": mode, "precision": precision, "count": res.count,
                                   "top1": res.top1}) + "\n")
    return res.top1


def _same_config(run_dir: Path, cfg: Any) -> bool:
    """Whether ``run_dir/config.yaml`` describes ``cfg`` (a finished run is only reused for the same config).

    A key left ``None`` in ``cfg`` matches any saved value: the trainer fills those in (``data.mean``/``std``).
    Keys that only change what is shown or how fast it runs (``progress``, ``threads``, ``data.workers``) are not
    compared, so a run made by ``nestvit train`` with the same recipe and seed counts too, and a study goes on
    with another thread count than its first runs had.
    """
    from .models.nest_variants import legacy_nest_kwargs
    from .train.config import TrainConfig, from_dict, read_recipe, to_dict

    def same(planned: Any, saved: Any) -> bool:
        if isinstance(planned, dict) and isinstance(saved, dict):
            return planned.keys() == saved.keys() and all(same(planned[k], saved[k]) for k in planned)
        return planned is None or planned == saved

    def compared(c: Any) -> dict[str, Any]:  # every key but the display-only and speed-only ones
        d = {k: v for k, v in to_dict(c).items() if k not in ("progress", "threads")}
        d["data"] = {k: v for k, v in d["data"].items() if k != "workers"}
        # runs saved before NesT's variant options got their own entries (nest_tiny_cifar + stem_dim ...)
        name, overrides = legacy_nest_kwargs(d["model"]["name"], d["model"].get("overrides") or {})
        return {**d, "model": {**d["model"], "name": name, "overrides": overrides}}

    try:
        raw, _ = read_recipe(run_dir / "config.yaml")
        return same(compared(cfg), compared(from_dict(TrainConfig, raw)))
    except (OSError, ValueError):
        return False


def run_arm(arm: Arm, seed: int, out: Path, *, device: str | None, fresh: bool,
            log: Callable[[str], None], tta: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``arm`` with ``seed`` into ``out/runs/<arm>-s<seed>`` (or read it back) and return its numbers.

    ``res["tta"]`` maps each test-time augmentation in ``tta`` to the last weights' test top-1 with it.
    """
    from .train.checkpoint import STATE_FILE
    from .train.config import TrainConfig, from_dict
    from .train.loop import train

    recipe = _merge(arm.recipe, {"seed": seed, "progress": False})
    cfg = from_dict(TrainConfig, recipe)
    run_dir = out / "runs" / f"{arm.name}-s{seed}"
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    read_back = (run_dir / "summary.json").is_file()
    if read_back and not _same_config(run_dir, cfg):
        log(f"[{arm.name} seed {seed}] {run_dir} was trained with another config (the recipe or arguments "
            f"changed): training it again")
        read_back = False
    if read_back:
        log(f"[{arm.name} seed {seed}] done before: reading {run_dir}")
    elif (run_dir / STATE_FILE).is_file() and _same_config(run_dir, cfg):
        # interrupted: the trainer's resume is bit-exact, so the results are still those of one run
        log(f"[{arm.name} seed {seed}] interrupted before: resuming {run_dir}")
        train(cfg, run_dir, resume=True, device=device)
    else:
        if run_dir.exists():  # stale (another config) or killed before its first checkpoint: start it again
            shutil.rmtree(run_dir)
        log(f"[{arm.name} seed {seed}] training -> {run_dir}")
        train(cfg, run_dir, device=device)
    res = _read_run(run_dir)
    res.update(arm=arm.name, seed=seed, run_dir=str(run_dir), read_back=read_back)
    res["tta"] = {mode: tta_top1(run_dir, cfg, mode, device) for mode in tta}
    log(f"[{arm.name} seed {seed}] test top-1 {res['test_top1']:.2f}% in {res['wall_s']:.0f}s "
        f"({res['train_img_s'] or 0:.0f} train img/s)"
        + "".join(f"; with {mode} TTA {top1:.2f}%" for mode, top1 in res["tta"].items()))
    return res


def aggregate(plan: Plan, runs: list[dict[str, Any]], stats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm: its labels, model stats, and mean/spread over seeds of accuracy, time, throughput."""
    rows = []
    for arm in plan.arms:
        rs = [r for r in runs if r["arm"] == arm.name]
        row = {"arm": arm.name, **arm.labels, **stats.get(arm.name, {}),
               "seeds": [r["seed"] for r in rs],
               "test_top1": mean_spread([r["test_top1"] for r in rs]),
               "tta": {mode: mean_spread([r["tta"][mode] for r in rs]) for mode in plan.tta},
               "wall_s": mean_spread([r["wall_s"] for r in rs]),
               "train_img_s": mean_spread([r["train_img_s"] for r in rs]),
               "steps": _span([r["steps"] for r in rs]), "epochs": _span([r["epochs"] for r in rs])}
        # mean test accuracy after each epoch (over the seeds that have it)
        curve: dict[float, list[float]] = {}  # a time budget can end a run inside an epoch (epoch 26.4)
        for r in rs:
            for ep, acc in r["curve"]:
                curve.setdefault(float(ep), []).append(acc)
        row["curve"] = {f"{ep:g}": mean_spread(v) for ep, v in sorted(curve.items())}
        if arm.name in plan.paper:
            row["paper"] = plan.paper[arm.name]
        rows.append(row)
    return rows


def _span(values: list[Any]) -> Any:
    """The one value all seeds share, else ``"min-max"`` (a time budget can stop seeds at different epochs)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    return known[0] if min(known) == max(known) else f"{min(known)}-{max(known)}"


def markdown(plan: Plan, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from .data.augment import TTA_MODES, tta_views

    has_paper = any("paper" in r for r in rows)
    tta = [f"with {mode} TTA ({len(tta_views(mode))} views; min-max)" for mode in plan.tta]
    head = plan.columns + ["params", "MFLOPs", "epochs", "steps", "test top-1 % (mean ± std)", "min-max", *tta,
                           "train img/s", "wall s / run"] + (["paper"] if has_paper else [])
    lines = [f"### `{plan.experiment}`", "",
             f"Command: `{meta['command']}`  ",
             f"Seeds: {', '.join(map(str, plan.seeds))}; wall time: {meta['runs_wall_s'] / 60:.1f} min summed over "
             f"the {len(plan.arms) * len(plan.seeds)} runs on {meta['device']} ({meta['threads']} thread(s) per run"
             + (f", {meta['precision']}" if meta.get("precision") else "") + ")" + _machines(meta)
             + (f"; this invocation {meta['wall_s'] / 60:.1f} min, {meta['read_back']} runs read back from an "
                "earlier one" if meta.get("read_back") else "") + ".", ""]
    lines += [f"- {n}" for n in plan.notes]
    precision = meta.get("precision") or plan.arms[0].recipe.get("precision", "fp32")
    for mode in plan.tta:
        in_run = all(arm.recipe.get("tta") == mode for arm in plan.arms)  # the trainer scored it (tta_top1)
        lines.append(f"- {mode} TTA column: the last weights (the ones reported) on {len(tta_views(mode))} views of "
                     f"each test image ({TTA_MODES[mode]}), their softmax outputs averaged, at the runs' "
                     f"precision ({precision})"
                     + (f", scored by the trainer at the end of each run inside its time budget (the recipe's "
                        f"`tta: {mode}`); the same as" if in_run else ":")
                     + f" `nestvit eval RUN --weights last --tta {mode} --precision {precision}`"
                     + (" after the run." if in_run else "."))
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        acc = r["test_top1"]
        mm = f"{acc['min']:.2f}-{acc['max']:.2f}" if acc.get("min") is not None else "-"
        cells = [str(r.get(c, "")) for c in plan.columns]
        cells += [f"{r['params'] / 1e6:.3f}M" if r.get("params") else "-",
                  f"{r['flops'] / 1e6:.1f}" if r.get("flops") else "-",
                  str(r.get("epochs")), str(r.get("steps")), fmt_ms(acc), mm]
        cells += [_tta_cell(r["tta"][mode]) for mode in plan.tta]
        cells += [fmt_ms(r["train_img_s"], 0), fmt_ms(r["wall_s"], 0)]
        if has_paper:
            cells.append(r.get("paper", ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _machines(meta: dict[str, Any]) -> str:
    """``"; machine: A; 2 runs without a record of it"``: time-budgeted numbers depend on it (docs/benchmarks.md)."""
    names, missing = meta.get("machines") or [], meta.get("unrecorded_machines") or 0
    if not names:
        return ""
    return (f"; machine{'s' if len(names) > 1 else ''}: {'; '.join(names)}"
            + (f"; {missing} run{'s' if missing > 1 else ''} without a record of it" if missing else ""))


def _tta_cell(s: dict[str, Any]) -> str:
    """``"94.52 ± 0.04 (94.49-94.55)"``: mean ± std and the range over seeds."""
    return fmt_ms(s) + (f" ({s['min']:.2f}-{s['max']:.2f})" if s.get("std") is not None else "")


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any], keys: Sequence[str]) -> str:
    return " / ".join(str(row[k]) for k in keys if k in row)


def bar_plot(keys: Sequence[str], title: str) -> Callable[[dict[str, Any], Path], None]:
    """Horizontal bars: mean test top-1 per arm with the seeds' min-max as error bars and the seeds as dots."""
    def plot(result: dict[str, Any], path: Path) -> None:
        plt = _plt()
        rows = result["rows"]
        fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
        for i, r in enumerate(rows):
            a = r["test_top1"]
            if a["mean"] is None:
                continue
            ax.barh(i, a["mean"], color="C0", alpha=0.6)
            ax.errorbar(a["mean"], i, xerr=[[a["mean"] - a["min"]], [a["max"] - a["mean"]]], color="k", capsize=3)
            seeds = [x["test_top1"] for x in result["runs"] if x["arm"] == r["arm"]]
            ax.plot(seeds, [i] * len(seeds), "k.", ms=4)
            ax.text(a["max"], i, f" {a['mean']:.2f}", va="center", fontsize=8)
        ax.set_yticks(range(len(rows)), [_label(r, keys) for r in rows], fontsize=8)
        ax.invert_yaxis()
        means = [r["test_top1"]["min"] for r in rows if r["test_top1"]["min"] is not None]
        if means:
            ax.set_xlim(max(0.0, min(means) - 5), 100)
        ax.set_xlabel("test top-1 % (bar: mean over seeds, whisker: min-max, dots: seeds)")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        save_figure(fig, path, dpi=110)
        plt.close(fig)
    return plot


def data_efficiency_plot(result: dict[str, Any], path: Path) -> None:
    """Left: accuracy vs training-set size per model. Right: accuracy vs epoch (smallest set) per model."""
    plt = _plt()
    rows = result["rows"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    models = list(dict.fromkeys(r["model"] for r in rows))
    for i, m in enumerate(models):
        rs = sorted((r for r in rows if r["model"] == m and r["test_top1"]["mean"] is not None),
                    key=lambda r: r["train_size"])
        if not rs:
            continue
        xs = [r["train_size"] for r in rs]
        ys = [r["test_top1"]["mean"] for r in rs]
        lo = [r["test_top1"]["mean"] - r["test_top1"]["min"] for r in rs]
        hi = [r["test_top1"]["max"] - r["test_top1"]["mean"] for r in rs]
        a1.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=m, color=f"C{i}")
        curve = rs[0]["curve"]  # the smallest set: the most epochs
        if curve:
            a2.plot([float(e) for e in curve], [v["mean"] for v in curve.values()], marker=".", color=f"C{i}",
                    label=f"{m} ({rs[0]['train_size']} images)")
    a1.set_xscale("log")
    a1.set_xlabel("training images (log)")
    a1.set_ylabel("test top-1 % (mean, min-max over seeds)")
    a1.set_title("accuracy vs training-set size, same step budget", fontsize=10)
    a2.set_xlabel("epoch")
    a2.set_ylabel("test top-1 % (mean over seeds)")
    a2.set_title("accuracy vs epochs (NesT Fig. 4 left)", fontsize=10)
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# Published Fashion-MNIST results (the data set's README, "Benchmark": submitters' numbers) for the plot.
FMNIST_BASELINES = {"2 Conv+pooling": 91.6, "2 Conv+3 FC, aug.": 93.4, "GoogleNet": 93.7, "MobileNet": 95.0}
BEST_TARGET = 94.5


def best_plot(result: dict[str, Any], path: Path) -> None:
    """Test top-1 after every epoch (one line per seed), with the target and published baselines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    lowest = 80.0
    for run in result["runs"]:
        curve = sorted(run.get("curve") or [])  # [(epoch, test top-1)]
        lowest = min([lowest] + [a - 2 for _, a in curve])
        line, = ax.plot([e for e, _ in curve], [a for _, a in curve], marker=".",
                        label=f"{run['arm']} seed {run['seed']}")
        for (mode, top1), marker in zip((run.get("tta") or {}).items() if curve else (), "*Pd"):  # last weights
            ax.plot([curve[-1][0]], [top1], marker=marker, ms=9, color=line.get_color(), ls="none",
                    label=f"last weights with {mode} TTA (the seed's colour)" if run is result["runs"][0] else None)
    ax.axhline(BEST_TARGET, color="r", ls="--", lw=1, label=f"target {BEST_TARGET}%")
    for i, (name, acc) in enumerate(FMNIST_BASELINES.items()):
        ax.axhline(acc, color=f"C{i + 2}", ls=":", lw=1, label=f"{name} (published) {acc}%")
    ax.set_ylim(max(0.0, lowest), 96)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 % (all 10,000 test images)")
    ax.set_title("best nested model on Fashion-MNIST, 2-core CPU", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the experiments
# --------------------------------------------------------------------------------------------------

def _data(name: str, train_size: int | None, eval_size: int | None, extra: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "limit_train": train_size, "limit_eval": eval_size}
    if name == "synthetic":
        d["img_size"] = 28
    return {**d, **(extra or {})}


def _ev(a: argparse.Namespace) -> int | None:
    """Evaluation images: ``--eval-size`` (0 = the whole test split), default the first 1,000."""
    return 1000 if a.eval_size is None else (a.eval_size or None)


def _ev_text(a: argparse.Namespace) -> str:
    """The evaluation images in words: "the first 1000" or "all the"."""
    return f"the first {_ev(a)}" if _ev(a) else "all the"


def plan_rtnt_vs_tnt(a: argparse.Namespace) -> Plan:
    depth, epochs = a.depth or 2, a.epochs or 1
    long = epochs > 1 or depth > 2  # runs of hours
    datas = a.data or ["fashion_mnist", "mnist5k"]
    models = [("rtnt_nano", True), ("rtnt_nano", False)] + ([("rtnt_tiny", True), ("rtnt_tiny", False)]
                                                             if a.tiny else [])
    arms = []
    for data in datas:
        for model, inner in models:
            recipe = _merge(RTNT_RECIPE, {
                "epochs": epochs,
                # runs of hours: a checkpoint every 200 steps, so an interrupted run resumes (bit-exactly) there;
                # float32 (the paper's), compiled (1.2x eager for rtnt_nano at one thread, docs/results.md)
                **({"checkpoint_every": 200, "precision": "fp32", "compile": True} if long else {}),
                "model": {"name": model, "overrides": {"depth": depth, "innermost": inner}},
                "data": _data(data, a.train_size, _ev(a)),
            })
            arms.append(Arm(f"{data}-{model}-{'rtnt' if inner else 'tnt'}", recipe,
                            {"data": data, "model": model, "innermost level": "every block" if inner else "none"}))
    paper = {}
    scale = ("The paper's depth (12 blocks)" if depth == 12 else
             f"Depth {depth} blocks instead of the paper's 12 (rtnt_nano at depth 12 trains at ~60-66 images/s on "
             "this 2-core CPU, docs/benchmarks.md)")
    return Plan("rtnt_vs_tnt", arms, a.seeds, [
        f"Recipe: the RTNT paper's (AdamW without weight decay, lr 1e-3, x0.96 every 200 steps, no augmentation, "
        f"batch 64 assumed); {epochs} epoch(s) on {f'the first {a.train_size}' if a.train_size else 'all the'} "
        f"training images, "
        f"evaluated on {_ev_text(a)} test images (mnist5k has 4,000/1,000 in all: all of it).",
        f"{scale}; widths, heads and the sentence/word/letter sizes (4/2/1 px) are the paper's."
        + (" Float32, torch.compile'd, a checkpoint every 200 steps (interrupted runs resume bit-exactly)."
           if long else ""),
        "Paper (full MNIST, 60,000 images, 5 epochs, depth 12): RTNT 96.20%, innermost level off 96.74%.",
    ], ["data", "model", "innermost level"], rtnt_plot, paper)


def rtnt_plot(result: dict[str, Any], path: Path) -> None:
    """Per data set: test top-1 after every epoch, mean over seeds (band: min-max), one line per arm."""
    plt = _plt()
    rows = result["rows"]
    datas = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datas), figsize=(5.5 * len(datas), 4), squeeze=False)
    for ax, data in zip(axes[0], datas):
        for r in (r for r in rows if r["data"] == data):
            curve = r["curve"]
            if not curve:
                continue
            xs = [float(e) for e in curve]
            ys = [v["mean"] for v in curve.values()]
            style = "-" if r["innermost level"] == "every block" else "--"
            color = f"C{0 if r['model'] == 'rtnt_nano' else 1}"
            ax.plot(xs, ys, style, marker=".", color=color,
                    label=f"{r['model']}, innermost level {r['innermost level']} "
                          f"({r['test_top1']['mean']:.2f}%)")
            ax.fill_between(xs, [v["min"] for v in curve.values()], [v["max"] for v in curve.values()],
                            color=color, alpha=0.12)
        ax.set_title(data, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 % (mean over seeds, band min-max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


DATA_EFFICIENCY_STEPS = 938  # one epoch of 60,000 images at batch 64
ABLATION_TRAIN = 60000  # aggregation / hierarchy: all of Fashion-MNIST's training images by default


def _nest_arm(name: str, data: str, a: argparse.Namespace, overrides: dict[str, Any], labels: dict[str, Any],
              model: str = "nest_tiny_cifar", train_size: int | None = None, epochs: int | None = None,
              ) -> Arm:
    recipe = _merge(NEST_RECIPE, {
        "epochs": epochs or a.epochs or 1,
        "model": {"name": model, "overrides": overrides},
        "data": _data(data, train_size or a.train_size or ABLATION_TRAIN, _ev(a)),
        "precision": "auto",  # bf16 autocast where fast (about 2x fp32 on an AVX-512 CPU), else fp32
    })
    return Arm(name, recipe, labels)


def plan_aggregation(a: argparse.Namespace) -> Plan:
    data = (a.data or ["fashion_mnist"])[0]
    variants = [("conv_maxpool", "image"), ("conv_maxpool", "block"), ("subsample", "image")]
    if a.all_variants:
        variants += [("conv_avgpool", "image"), ("patch_merge", "image"), ("conv_stride2", "image"),
                     ("patch_merge", "block")]
    arms = [_nest_arm(f"{agg}-{plane}", data, a, {**SMALL_NEST, "aggregation": agg, "aggregation_plane": plane},
                      {"aggregation": agg + (" (default)" if (agg, plane) == ("conv_maxpool", "image") else ""),
                       "plane": plane}) for agg, plane in variants]
    return Plan("aggregation", arms, a.seeds, [
        f"Model: the small NesT (patch 2 on 28x28 padded to 32, 3 levels, blocks of 4x4 patches, width 64, depths "
        f"1/1/2); data: the first {a.train_size or ABLATION_TRAIN} {data} training images, "
        f"{a.epochs or 1} epoch(s), {_ev_text(a)} test images; AdamW lr 2e-3, cosine, random crops (pad 2), bf16 "
        "autocast where the device has fast bf16 kernels, else fp32 (precision auto).",
        "Paper (NesT Fig. 5 / A1, CIFAR-10, NesT-T 300 epochs): conv3x3 + LN + max-pool on the image plane is "
        "best; block-plane aggregation and plain subsampling lose accuracy.",
    ], ["aggregation", "plane"], bar_plot(["aggregation", "plane"], f"NesT block aggregation ({data})"))


def plan_hierarchy(a: argparse.Namespace) -> Plan:
    data = (a.data or ["fashion_mnist"])[0]
    # (levels, patch size, block size): patch 2 -> 16x16 grid, patch 4 -> 8x8, patch 1 -> 32x32 (expensive)
    variants = [(3, 2, 4), (2, 2, 8), (2, 4, 4)] + ([(4, 2, 2), (3, 4, 2), (3, 1, 8)] if a.all_variants else [])
    arms = []
    for levels, patch, block in variants:
        ov = {**SMALL_NEST, "num_levels": levels, "patch_size": patch, "block_size": block,
              "depths": [1] * (levels - 1) + [2]}
        grid = 32 // patch
        arms.append(_nest_arm(f"L{levels}-p{patch}-b{block}", data, a, ov,
                              {"levels": levels, "patch px": patch, "block (patches)": f"{block}x{block}",
                               "level-0 blocks": (grid // block) ** 2}))
    return Plan("hierarchy", arms, a.seeds, [
        f"Model: the small NesT (width 64, 2 heads, one layer per level and two at the top) on {data} padded to "
        f"32x32; the first {a.train_size or ABLATION_TRAIN} training images, {a.epochs or 1} epoch(s), "
        f"{_ev_text(a)} test images; bf16 autocast where fast, else fp32 (precision auto); the block size is "
        "chosen so the top level is one block.",
        "Paper (NesT Fig. 6, CIFAR-10): more levels (hierarchies) help up to a point; smaller patches help at a "
        "higher cost.",
    ], ["levels", "patch px", "block (patches)", "level-0 blocks"],
        bar_plot(["levels", "patch px", "block (patches)"], f"NesT hierarchy: levels and patch size ({data})"))


def plan_data_efficiency(a: argparse.Namespace) -> Plan:
    data = (a.data or ["fashion_mnist"])[0]
    sizes = a.train_sizes or [1000, 6000, 60000]
    steps = a.steps or DATA_EFFICIENCY_STEPS
    models = [
        ("NesT", "nest_tiny_cifar", dict(SMALL_NEST), {}),
        ("ViT (matched)", "vit_tiny_patch4_32", dict(SMALL_VIT), {}),
        ("TNT (rtnt_nano, innermost off, depth 1)", "rtnt_nano", {"depth": 1, "innermost": False},
         {"data": {"pad_to": None}}),
        ("RTNT (rtnt_nano, depth 1)", "rtnt_nano", {"depth": 1}, {"data": {"pad_to": None}}),
    ]
    if a.models:
        models = [m for m in models if m[0].split()[0].lower() in {x.lower() for x in a.models}]
    arms = []
    for size in sizes:
        epochs = a.epochs or max(1, round(steps * 64 / size))
        for label, name, ov, extra in models:
            arm = _nest_arm(f"{label.split()[0].lower()}-{size}", data, a, ov, {"model": label, "train_size": size},
                            model=name, train_size=size, epochs=epochs)
            arm.recipe = _merge(arm.recipe, extra, {"eval_every": max(1, epochs // 10)})  # ~10 evaluations
            arms.append(arm)
    return Plan("data_efficiency", arms, a.seeds, [
        f"Budget: about the same number of optimizer steps for every training-set size, {steps} steps of 64 images "
        f"rounded to whole epochs (epochs = round({steps} x 64 / size), at least 1: one epoch of the largest set; "
        "the steps column gives each run's), AdamW lr 2e-3, cosine, "
        "random crops (pad 2), bf16 autocast where fast, else fp32 (precision auto); sizes: the first "
        f"{', '.join(map(str, sizes))} {data} training "
        f"images; evaluated on {_ev_text(a)} test images about ten times per run (right panel).",
        "Models: the small NesT; a ViT matched to it in parameters and FLOPs (4x4-px patches, width 64, 5 "
        "layers); TNT and RTNT are rtnt_nano at depth 1 (innermost level off / on), on 28x28 without padding "
        "(depth 1 keeps their cost near the NesT's; see the FLOPs and images/s columns).",
        "Paper (NesT Fig. 4, CIFAR-10 subsets): NesT keeps its accuracy with less data and converges faster "
        "than DeiT/ViT.",
    ], ["model", "train_size"], data_efficiency_plot)


def plan_best_fashion_mnist(a: argparse.Namespace) -> Plan:
    data = (a.data or ["fashion_mnist"])[0]
    recipe_file = Path(__file__).resolve().parent / "recipes" / "results_best_fashion_mnist.yaml"
    from .train.config import read_recipe

    raw, _ = read_recipe(recipe_file)
    raw = _merge(raw, {"data": {"name": data}})
    if a.epochs:
        raw["epochs"] = a.epochs
    if a.budget_min is not None:
        raw["time_budget_min"] = a.budget_min
    if a.train_size:
        raw["data"]["limit_train"] = a.train_size
    if a.eval_size:
        raw["data"]["limit_eval"] = a.eval_size
    arms = [Arm("nest-best", raw, {"model": f"{raw['model']['name']} {json.dumps(raw['model'].get('overrides', {}))}"})]
    budget = raw.get("time_budget_min", 0.0)
    return Plan("best_fashion_mnist", arms, a.seeds, [
        f"Recipe: src/nestvit/recipes/results_best_fashion_mnist.yaml (at most {raw['epochs']} epochs on "
        f"{raw['data'].get('limit_train') or 'all 60,000'} training images"
        + (f", {budget:g} minutes per run: the learning rate decays by step or by time, whichever is further "
           "along, and training stops at the deadline" if budget else "") + "); test on "
        f"{raw['data'].get('limit_eval') or 'all 10,000'} test images.",
    ], ["model"], best_plot, tta=("flip", "flip-shift"))


def plan_quick(plan_fn: Callable[[argparse.Namespace], Plan], a: argparse.Namespace) -> Plan:
    """The experiment's plan shrunk to seconds: synthetic 28x28 images, one epoch, tiny models."""
    plan = plan_fn(a)
    arms = plan.arms[:3]
    for arm in arms:
        r = arm.recipe
        r["epochs"] = 1
        r["data"] = {**r.get("data", {}), "name": "synthetic", "img_size": 28, "limit_train": 64, "limit_eval": 32}
        r["global_batch"] = 32
        r.pop("time_budget_min", None)
        ov = r["model"].setdefault("overrides", {})
        if r["model"]["name"].startswith("rtnt"):
            ov.update(depth=1, dims=[16, 8, 4], num_heads=[1, 1, 1])
        elif r["model"]["name"].startswith("nest"):
            ov.update(embed_dims=16, num_heads=1)
            ov["depths"] = [1] * int(ov.get("num_levels", 3))
        else:
            ov.update(embed_dim=16, depth=1, num_heads=1)
    dropped = [arm.name for arm in plan.arms[3:]]
    plan.arms = arms
    # the notes describe the full study: a quick run says first what it is instead
    plan.notes = [f"**Quick smoke test, not a result**: {len(arms)} arm(s) on 64 synthetic 28x28 images, one epoch "
                  "of tiny models; the numbers only show that the pipeline runs"
                  + (f" (arms left out: {', '.join(dropped)})" if dropped else "")
                  + ". The notes below describe the full experiment.", *plan.notes]
    return plan


EXPERIMENTS: dict[str, Callable[[argparse.Namespace], Plan]] = {
    "rtnt_vs_tnt": plan_rtnt_vs_tnt,
    "aggregation": plan_aggregation,
    "hierarchy": plan_hierarchy,
    "data_efficiency": plan_data_efficiency,
    "best_fashion_mnist": plan_best_fashion_mnist,
}


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------

def _print(message: str) -> None:
    print(message, flush=True)


def run_experiment(a: argparse.Namespace, log: Callable[[str], None] = _print) -> dict[str, Any]:
    import torch

    from .train.config import TrainConfig, apply_overrides, from_dict

    plan = plan_quick(EXPERIMENTS[a.name], a) if a.quick else EXPERIMENTS[a.name](a)
    plan.tta = plan.tta if a.tta is None else tuple(dict.fromkeys(m for m in a.tta if m != "none"))
    if a.set:
        for arm in plan.arms:
            arm.recipe = apply_overrides(arm.recipe, a.set)
        plan.notes.append(f"Every run also has {', '.join(a.set)} (--set; they take precedence over the above).")
    if a.threads:
        for arm in plan.arms:
            arm.recipe["threads"] = a.threads
    out = Path(a.out or Path("runs") / "experiments" / (a.name + ("-quick" if a.quick else "")))
    out = writable_dir(out)
    started = time.perf_counter()
    stats = {}
    for arm in plan.arms:
        from_dict(TrainConfig, arm.recipe)  # fail early on a bad recipe, before any training
    for arm in plan.arms:
        stats[arm.name] = _model_stats(from_dict(TrainConfig, arm.recipe))
    runs = []
    for seed in plan.seeds:  # seed-major: a stopped experiment has every arm at the first seed
        for arm in plan.arms:
            runs.append(run_arm(arm, seed, out, device=a.device, fresh=a.fresh, log=log, tta=plan.tta))
    wall = time.perf_counter() - started
    meta = {"command": "nestvit experiment " + " ".join(a.argv) if getattr(a, "argv", None) else
            f"nestvit experiment {a.name}", "wall_s": round(wall, 1),
            "device": a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "threads": a.threads or torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "runs_wall_s": round(sum(r["wall_s"] or 0 for r in runs), 1),
            "read_back": sum(1 for r in runs if r.get("read_back")),
            "precision": "/".join(sorted({r["precision"] for r in runs if r.get("precision")})) or None,
            "machines": sorted({r["machine"] for r in runs if r.get("machine")}),
            "unrecorded_machines": sum(1 for r in runs if not r.get("machine"))}
    rows = aggregate(plan, runs, stats)
    result = {"experiment": plan.experiment, "meta": meta, "seeds": plan.seeds, "notes": plan.notes, "tta": plan.tta,
              "rows": rows, "runs": runs, "recipes": {arm.name: arm.recipe for arm in plan.arms}}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(plan, rows, meta)
    atomic_write_text(out / "results.md", md)
    plan.plot(result, out / "results.png")
    log(md)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} ({wall / 60:.1f} min)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .data.augment import TTA_MODES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("Experiments:", 1)[1].join(["experiments:", ""])
    parser.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default: 0 1)")
    parser.add_argument("--train-size", type=positive_int, help="first N training images (default: per experiment)")
    parser.add_argument("--train-sizes", type=positive_int, nargs="+",
                        help="data_efficiency: training-set sizes (default 1000 6000 60000)")
    parser.add_argument("--steps", type=positive_int, help="data_efficiency: optimizer steps of 64 images per run "
                        f"(default {DATA_EFFICIENCY_STEPS}: one epoch of 60,000)")
    parser.add_argument("--eval-size", type=nonnegative_int,
                        help="first N test images (0 = all; default 1000, best_fashion_mnist: all)")
    parser.add_argument("--epochs", type=positive_int, help="epochs per run (default: per experiment)")
    parser.add_argument("--depth", type=positive_int,
                        help="rtnt_vs_tnt: blocks of rtnt_nano/tiny (default 2; paper 12)")
    parser.add_argument("--tiny", action="store_true", help="rtnt_vs_tnt: also rtnt_tiny")
    parser.add_argument("--all-variants", action="store_true",
                        help="aggregation: also conv_avgpool, conv_stride2, patch_merge (both planes); hierarchy: "
                             "also L4, L3-p4 and L3-p1 (patch 1 is expensive)")
    parser.add_argument("--models", nargs="+", choices=["nest", "vit", "tnt", "rtnt"],
                        help="data_efficiency: models among nest vit tnt rtnt (default: all four)")
    parser.add_argument("--budget-min", type=float, default=None,
                        help="best_fashion_mnist: minutes per run (default: the recipe's time_budget_min); the "
                             "learning rate decays to the deadline; 0 = no budget")
    parser.add_argument("--tta", choices=TTA_MODES, nargs="+",
                        help="also test every run's last weights with these test-time augmentations, a column "
                             "each (default: flip flip-shift for best_fashion_mnist, none for the others)")
    parser.add_argument("--data", nargs="+", help="data set(s) (default: per experiment)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override applied to every run (as nestvit train --set); repeatable")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--threads", type=positive_int, help="CPU threads per run")
    parser.add_argument("--out", help="output folder (default runs/experiments/NAME)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke test on synthetic images")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that are already done in --out")


def run(args: argparse.Namespace) -> int:
    if not hasattr(args, "argv"):
        args.argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "experiment" else [args.name]
    from .train.interrupt import Stopped

    try:
        run_experiment(args)
    except Stopped as e:  # the same command goes on: finished runs are read back, this one resumes
        again = shlex.join(["nestvit", "experiment", *(a for a in args.argv if a != "--fresh")])  # not anew
        raise Stopped(e.signal_name, e.step, e.run_dir, how=f"the same command ({again})",
                      complete=e.complete) from None
    return 0
