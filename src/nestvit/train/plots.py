"""PNG plots of a run (matplotlib, Agg backend: no display needed).

- ``loss.png``: training loss per logged step, raw and EMA-smoothed (the RTNT paper's Figure 2 shows
  its loss curves this way; ``smooth`` is TensorBoard's debiased exponential moving average, with
  TensorBoard's default weight 0.6);
- ``accuracy.png``: train and test top-1 accuracy per epoch (and the EMA model's, when there is one);
- ``lr.png``: the learning rate per logged step;
- ``confusion.png``: the confusion matrix of an evaluation (row-normalised colours, counts written in
  cells when there are at most 20 classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import save_figure
from .metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], weight: float = 0.6) -> list[float]:
    """Debiased EMA: ``s_t = w s_{t-1} + (1 - w) x_t``, divided by ``1 - w**t`` (as TensorBoard)."""
    out, acc = [], 0.0
    for t, v in enumerate(values, start=1):
        acc = weight * acc + (1.0 - weight) * v
        out.append(acc / (1.0 - weight ** t))
    return out


def _save(fig: Any, path: Path) -> Path:
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_loss(steps: Sequence[int], losses: Sequence[float], path: Path, *, weight: float = 0.6,
              title: str = "training loss") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="raw")
    ax.plot(steps, smooth(losses, weight), color="tab:blue", linewidth=2, label=f"smoothed (EMA {weight:g})")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_accuracy(epochs: dict[str, tuple[Sequence[int], Sequence[float]]], path: Path,
                  title: str = "accuracy") -> Path:
    """``epochs``: label -> (epoch numbers, top-1 accuracies in percent)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (x, y) in epochs.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lr(steps: Sequence[int], lrs: Sequence[float], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.0))
    ax.plot(steps, lrs, color="tab:green")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                   title: str = "confusion matrix") -> Path:
    import numpy as np

    plt = _pyplot()
    m = np.asarray(confusion, dtype=np.float64)
    k = len(classes)
    norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = min(3 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_run(run_dir: str | Path, *, weight: float = 0.6) -> list[Path]:
    """Write ``loss.png``, ``accuracy.png`` and ``lr.png`` from a run directory's ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    epochs = [r for r in records if r.get("kind") == "epoch"]
    # the step records (every log_every steps), else, for a run shorter than that, its epochs' means
    steps = [r for r in records if r.get("kind") == "step"] or [
        {"step": r["step"], "loss": r["train_loss"], "lr": r["lr"]} for r in epochs if "train_loss" in r and "lr" in r]
    out = []
    if steps:
        x = [r["step"] for r in steps]
        out.append(plot_loss(x, [r["loss"] for r in steps], run_dir / "loss.png", weight=weight))
        out.append(plot_lr(x, [r["lr"] for r in steps], run_dir / "lr.png"))
    curves = {}
    for key, label in (("train_acc", "train"), ("test_top1", "test"), ("ema_top1", "test (EMA)")):
        pts = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if pts:
            curves[label] = ([p[0] for p in pts], [p[1] for p in pts])
    if curves:
        out.append(plot_accuracy(curves, run_dir / "accuracy.png"))
    return out
