"""PNG figures of explanations (matplotlib, Agg backend; never opens a window).

- :func:`gradcat_figure`: the image with GradCAT's nested path (one rectangle per level, coloured by
  level, the score that chose each node written on it, as the NesT paper's Figures 3 and 8), one
  panel per explained class, and a bar chart of the top predictions.
- :func:`heatmap_figure`: the image, the map over the image (with an optional box), and the bars.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..fileio import save_figure

__all__ = ["gradcat_figure", "heatmap_figure", "draw_gradcat_path", "draw_box", "show_image", "overlay",
           "level_colors"]


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _np_image(image) -> np.ndarray:
    """uint8 / float ``(C, H, W)`` or ``(H, W)`` -> ``(H, W)`` or ``(H, W, 3)`` float in [0, 1] for imshow."""
    x = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
    integer = np.issubdtype(x.dtype, np.integer)
    x = x.astype(np.float64)
    if integer or x.max() > 1.0 + 1e-6:  # uint8 pixels: a dark image stays dark
        x = x / 255.0
    elif x.min() < 0:  # a normalised image: stretch for display
        x = (x - x.min()) / max(x.max() - x.min(), 1e-12)
    return np.clip(x, 0, 1)


def show_image(ax, image) -> None:
    x = _np_image(image)
    ax.imshow(x, cmap="gray" if x.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def overlay(ax, image, heat, *, alpha: float = 0.5, cmap: str | None = None):
    """The image in grey with ``heat (H, W)`` over it, on the map's own scale: a map with any negative value on a
    diverging colour map centred at 0 (``RdBu_r``: red for, blue against), else from 0 to its largest value
    (``jet``), so that a nearly uniform map looks uniform. Returns the map's ``AxesImage`` (for a colour bar; its
    colour limits start below 0 for a signed map)."""
    x = _np_image(image)
    grey = x if x.ndim == 2 else x.mean(axis=2)
    ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    h = np.asarray(heat.detach().cpu() if isinstance(heat, torch.Tensor) else heat, dtype=np.float64)
    signed = h.min() < 0
    top = max(float(np.abs(h).max()), 1e-12)
    lo, hi = (-top, top) if signed else (0.0, top)
    shown = ax.imshow(h, cmap=cmap or ("RdBu_r" if signed else "jet"), alpha=alpha, vmin=lo, vmax=hi,
                      interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def draw_box(ax, box, *, color: str = "lime", lw: float = 2.0, ls: str = "-", label: str | None = None) -> None:
    """A half-open pixel box ``(x0, y0, x1, y1)`` drawn on an ``imshow`` axes (pixel centres at integers)."""
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = (float(v) for v in box)
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color, lw=lw, ls=ls,
                           label=label))


def level_colors(n: int) -> list:
    """One colour per path level, top level first (warm at the top, cool at the leaf)."""
    plt = _plt()
    cmap = plt.get_cmap("plasma")
    return [cmap(0.85 - 0.75 * i / max(n - 1, 1)) for i in range(n)]


def draw_gradcat_path(ax, result, b: int = 0, k: int = 0, *, scores: bool = True, fontsize: float = 7.0) -> None:
    """Rectangles of one GradCAT path (``result.boxes[b, k]``), coloured by level (legend labels
    ``level n``), with a score caption under the image: the top block's mean score, then the quadrant
    score that chose each following node (``L3 s -> L2 s -> L1 s``)."""
    boxes = result.boxes[b, k]
    L = boxes.shape[0]
    colors = level_colors(L)
    parts = []
    for i in range(L):
        inset = 0.7 * i  # keep nested edges visible where boxes share a side
        x0, y0, x1, y1 = boxes[i].tolist()
        draw_box(ax, (x0 + inset, y0 + inset, x1 - inset, y1 - inset), color=colors[i],
                 lw=max(3.0 - 0.5 * i, 1.2), label=f"level {result.levels[i]}")
        value = (float(result.root_scores[b, k].max()) if i == 0
                 else float(result.scores[b, k, i - 1, result.choice[b, k, i - 1]]))
        parts.append(f"L{result.levels[i]} {value:.2g}")
    if scores:
        ax.set_xlabel(" -> ".join(parts), fontsize=fontsize)


def _bars(ax, classes: Sequence[int], probs: Sequence[float], names: Sequence[str] | None,
          highlight: int | None = None) -> None:
    """Horizontal bars of the top classes; ``highlight`` (a class index; default the first) in blue."""
    labels = [names[c] if names and c < len(names) else str(c) for c in classes]
    y = np.arange(len(labels))[::-1]
    marked = classes[0] if highlight is None else highlight
    ax.barh(y, probs, color=["tab:blue" if c == marked else "tab:gray" for c in classes])
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for yi, p in zip(y, probs):  # beside the bar, or inside its end where there is no room beside it
        inside = float(p) > 0.85
        ax.text(float(p) - 0.02 if inside else float(p) + 0.02, yi, f"{float(p):.2f}", va="center", fontsize=7,
                ha="right" if inside else "left", color="white" if inside else "black")
    ax.set_title("top predictions", fontsize=9)


def gradcat_figure(path: str | Path, image, result, b: int = 0, *, top_classes=None, top_probs=None,
                   class_names: Sequence[str] | None = None, gt_box=None, title: str | None = None,
                   dpi: int = 100) -> Path:
    """PNG: one panel per explained class (image + nested path boxes + scores), then the prediction bars."""
    plt = _plt()
    K = result.classes.shape[1]
    with_bars = top_classes is not None
    n = K + int(with_bars)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.6), squeeze=False)
    axes = axes[0]
    for k in range(K):
        ax = axes[k]
        show_image(ax, image)
        draw_gradcat_path(ax, result, b, k)
        if gt_box is not None:
            draw_box(ax, gt_box, color="lime", lw=1.2, ls="--", label="object")
        c = int(result.classes[b, k])
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        ax.set_title(f"GradCAT: {name} (p={float(result.probs[b, k]):.2f})", fontsize=9)
    if with_bars:
        _bars(axes[-1], [int(c) for c in top_classes], [float(p) for p in top_probs], class_names)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7, frameon=False)
    fig.suptitle(title or f"GradCAT path (sign {result.sign:+d}): boxes from the top level to the leaf; under each "
                           "image, the score that chose the block at each level", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return path


def heatmap_figure(path: str | Path, image, heat, *, method: str, explained: str = "", top_classes=None,
                   top_probs=None, class_names: Sequence[str] | None = None, box=None, gt_box=None,
                   value_label: str = "", highlight: int | None = None, dpi: int = 100) -> Path:
    """PNG: the image, the heat map over it with a colour bar of its values (``value_label`` names them; the
    thresholded box if given), the prediction bars (``highlight``: the explained class, if it is among them)."""
    plt = _plt()
    with_bars = top_classes is not None
    n = 2 + int(with_bars)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.6), squeeze=False)
    axes = axes[0]
    show_image(axes[0], image)
    axes[0].set_title("input", fontsize=9)
    shown = overlay(axes[1], image, heat)
    bar = fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    bar.ax.tick_params(labelsize=7)
    signed = shown.get_clim()[0] < 0
    if value_label or signed:
        bar.set_label(value_label + ("\n(red: for the class, blue: against)" if signed else ""), fontsize=7)
    if box is not None:
        draw_box(axes[1], box, color="white", lw=1.8, label="map box")
    if gt_box is not None:
        for ax in axes[:2]:
            draw_box(ax, gt_box, color="lime", lw=1.2, ls="--", label="object")
    axes[1].set_title(f"{method}{': ' + explained if explained else ''}", fontsize=9)
    if with_bars:
        _bars(axes[-1], [int(c) for c in top_classes], [float(p) for p in top_probs], class_names, highlight)
    fig.tight_layout()
    path = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return path
