#!/usr/bin/env python
"""The 20-epoch lever runs of docs/results.md section 5, side by side: test top-1 after every epoch.

Reads the per-epoch lines that ``nestvit train`` prints (``epoch N/E: loss ... train acc X% | ... |
test top-1 Y% ...``, progress bars stripped) from the pilot logs in ``experiments/results/pilots/``,
plots test and training accuracy against the epoch for every run, with the target and the range of
the recipe's three published hours at lr 2e-3 and at 5e-4, and prints a Markdown table of the last
epoch of each run. Reads logs only, so it takes a second:

    .venv/bin/python experiments/lever_curves.py --out docs/img/results_best_fashion_mnist_levers.png

``--log LABEL=PATH`` (repeatable) replaces the default set of runs with your own logs.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import matplotlib

from nestvit.fileio import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PILOTS = Path(__file__).resolve().parent / "results" / "pilots"
# label -> log: every 20-epoch (9,360-step) run of the recipe (lr 2e-3, later 5e-4) and its variants; seed 0
# unless the label names another
RUNS = {
    "lr 2e-3 (the old recipe), Zen 4": "best_fashion_mnist_s14_ema_e20.log",
    "stem 48, Zen 4": "best_fashion_mnist_s13_stem48_e20.log",
    "batch 64, Zen 4": "best_fashion_mnist_s15_batch64_e20.log",
    "lr 1e-3, Zen 4": "best_fashion_mnist_s16_lr1e-3_e20.log",
    "depths 1/1/4 at lr 1e-3, Zen 4": "best_fashion_mnist_s19_depths114_e20.log",
    "lr 5e-4, Zen 4": "best_fashion_mnist_s20_lr5e-4_e20.log",
    "lr 2.5e-4, Intel AMX": "best_fashion_mnist_s24_lr2.5e-4_e20.log",
    "weight decay 0.2 at lr 5e-4, Intel AMX": "best_fashion_mnist_s25_wd0.2_e20.log",
    "no label smoothing at lr 5e-4, Intel AMX": "best_fashion_mnist_s25_ls0_e20.log",
    "Adam beta2 0.95 at lr 5e-4, Intel AMX": "best_fashion_mnist_s25_beta2_0.95_e20.log",
    "3-pixel crops at lr 5e-4, Intel AMX": "best_fashion_mnist_s26_crop3_e20.log",
    "1-pixel crops at lr 5e-4, Intel AMX": "best_fashion_mnist_s26_crop1_e20.log",
    "lr 2e-3 (the old recipe), seed 1, Intel AMX": "best_fashion_mnist_s17_lr2e-3_seed1_e20.log",
    "lr 1e-3, seed 1, Intel AMX": "best_fashion_mnist_s17_lr1e-3_seed1_e20.log",
    "lr 5e-4, seed 1, Intel AMX": "best_fashion_mnist_s22_lr5e-4_seed1_e20.log",
    "lr 2.5e-4, seed 1, Intel AMX": "best_fashion_mnist_s24_lr2.5e-4_seed1_e20.log",
}
HOURS = {  # label -> (min, max) plain test top-1 % of three published 60-minute hours of the recipe as it was
    "the three lr 2e-3 hours (Zen 5)": (93.99, 94.15),
    "the three lr 5e-4 hours, views after the hour (Intel AMX)": (94.14, 94.59),
    "the three hours of the recipe, views inside (Intel AMX)": (94.34, 94.48),
}
TARGET = 94.5
EPOCH = re.compile(r"^epoch (\d+)/(\d+): loss \S+ train acc ([\d.]+)%.*?\| test top-1 ([\d.]+)%")
TTA = re.compile(r"TTA top-1 ([\d.]+)%")


def read_log(path: Path) -> dict:
    """``{"epoch": [...], "train": [...], "test": [...], "tta": float | None}`` from one training log."""
    if not path.is_file():
        raise SystemExit(f"error: no log at {path}; pass --log LABEL=PATH for each run to plot")
    out: dict = {"epoch": [], "train": [], "test": [], "tta": None}
    for line in path.read_text(errors="replace").replace("\r", "\n").splitlines():
        m = EPOCH.match(line)
        if m:
            out["epoch"].append(int(m[1]))
            out["train"].append(float(m[3]))
            out["test"].append(float(m[4]))
            t = TTA.search(line)
            out["tta"] = float(t[1]) if t else out["tta"]
    if not out["epoch"]:
        raise SystemExit(f"error: {path} holds no per-epoch lines ('epoch N/E: loss ... test top-1 X%'); "
                         "is it a `nestvit train` log?")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results_best_fashion_mnist_levers.png"),
                    help="the PNG to write (default: %(default)s)")
    ap.add_argument("--log", action="append", default=[], metavar="LABEL=PATH",
                    help="a run to plot instead of the default set (repeatable)")
    args = ap.parse_args(argv)
    if any("=" not in s for s in args.log):
        ap.error("--log takes LABEL=PATH, e.g. --log 'lr 1e-3=runs/lr1e-3.log'")
    runs = dict(s.split("=", 1) for s in args.log) if args.log else {k: PILOTS / v for k, v in RUNS.items()}
    curves = {label: read_log(Path(path)) for label, path in runs.items()}

    print("| run | epochs | train acc % (last epoch) | test top-1 % | 18-view TTA % |")
    print("|---|---|---|---|---|")
    for label, c in curves.items():
        tta = f"{c['tta']:.2f}" if c["tta"] is not None else "-"
        print(f"| {label} | {c['epoch'][-1]} | {c['train'][-1]:.1f} | {c['test'][-1]:.2f} | {tta} |")

    fig, (ax_test, ax_train) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 runs
    for i, (label, c) in enumerate(curves.items()):
        style = "--" if "seed 1" in label else "-"
        kw = {"marker": ".", "color": colors[i % len(colors)]}
        ax_test.plot(c["epoch"], c["test"], style, label=label, **kw)
        ax_train.plot(c["epoch"], c["train"], style, **kw)
    for (label, span), color in zip(HOURS.items(), ("grey", "tab:green", "tab:blue"), strict=True):
        ax_test.axhspan(*span, color=color, alpha=0.2, label=label)
    ax_test.axhline(TARGET, color="red", lw=1, label=f"target {TARGET} %")
    ax_test.set(xlabel="epoch", ylabel="test top-1 % (10,000 images, one view)", xlim=(3.5, 20.5), ylim=(89, 94.8),
                title="Fashion-MNIST test accuracy, 20 epochs (9,360 steps)")
    ax_train.set(xlabel="epoch", ylabel="training accuracy % (crops, flips, label smoothing)",
                 xlim=(3.5, 20.5), ylim=(88, 97), title="training accuracy, same runs")
    for ax in (ax_test, ax_train):
        ax.set_xticks(range(4, 21, 2))
        ax.grid(alpha=0.3)
    ax_test.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    print(f"wrote {save_figure(fig, args.out, dpi=110)}", file=sys.stderr)


if __name__ == "__main__":
    main()
