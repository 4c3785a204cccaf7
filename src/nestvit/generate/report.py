"""Plots and tables from GAN run directories (``metrics.jsonl``).

    python -m nestvit.generate.report RUN_DIR [RUN_DIR ...] --out fid.png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..fileio import save_figure
from .train import read_metrics

__all__ = ["eval_rows", "plot_fid", "fid_table"]


def eval_rows(run_dir: str | Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]


def plot_fid(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """FID (and KID) of the EMA generator against training steps, one line per run; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels or [Path(d).name for d in run_dirs])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = set()
    for d, label in zip(run_dirs, labels):
        rows = eval_rows(d)
        if not rows:
            continue
        names.add(rows[0]["feature_net"])
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["fid"] for r in rows], marker="o", label=label)
        axes[1].plot(steps, [r["kid"] for r in rows], marker="o", label=label)
        floor = [r for r in read_metrics(d) if r.get("kind") == "eval_floor"]
        if floor:
            axes[0].axhline(floor[0]["fid"], color="grey", lw=0.8, ls="--")
    feats = ", ".join(sorted(names)) or "?"
    axes[0].set(xlabel="training step", ylabel="FID (log scale)", yscale="log", title=f"FID [features: {feats}]")
    axes[1].set(xlabel="training step", ylabel="KID (log scale)", yscale="log", title="KID (cubic kernel, x1)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = save_figure(fig, out, dpi=110)
    plt.close(fig)
    return out


def fid_table(run_dirs: Sequence[str | Path], *, labels: Sequence[str] | None = None) -> str:
    """Markdown table: step | FID/KID/IS per run."""
    labels = list(labels or [Path(d).name for d in run_dirs])
    per = [{r["step"]: r for r in eval_rows(d)} for d in run_dirs]
    steps = sorted(set().union(*[p.keys() for p in per]))
    head = "| step | " + " | ".join(f"{lab} FID / KID / IS" for lab in labels) + " |"
    lines = [head, "|---:|" + "---:|" * len(labels)]
    for s in steps:
        cells = []
        for p in per:
            r = p.get(s)
            cells.append(f"{r['fid']:.1f} / {r['kid']:.2f} / {r['is']:.2f}" if r else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m nestvit.generate.report")
    p.add_argument("runs", nargs="+")
    p.add_argument("--labels", nargs="+")
    p.add_argument("--out", default="fid.png")
    a = p.parse_args(argv)
    print(fid_table(a.runs, labels=a.labels))
    print(f"wrote {plot_fid(a.runs, a.out, labels=a.labels)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
