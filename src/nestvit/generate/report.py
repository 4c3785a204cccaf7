"""Plots and tables from GAN run directories (``metrics.jsonl``).

    nestvit generate report RUN_DIR [RUN_DIR ...] [--labels A B ...] --out fid.png
    python -m nestvit.generate.report RUN_DIR ...     # the same
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..fileio import save_figure
from .train import own_images, read_metrics

__all__ = ["eval_rows", "plot_fid", "fid_table"]


def eval_rows(run_dir: str | Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]


def check_runs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None) -> list[str]:
    """The labels of ``run_dirs`` (their folder names by default), after checking that each is a GAN run
    with evaluations and that there is one label per run; a ``ValueError`` names what is wrong."""
    from ..contract import gan_run_folder

    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"--labels: {len(labels)} label(s) for {len(run_dirs)} run(s); give one per run")
    names = list(labels or [Path(d).name for d in run_dirs])
    if len(set(names)) < len(names):
        raise ValueError(f"two runs would share the label {next(n for n in names if names.count(n) > 1)!r} in the "
                         "table; name each with --labels")
    for d in map(Path, run_dirs):
        if not d.is_dir():
            raise ValueError(f"{d}: no such run folder")
        if gan_run_folder(d) is None and not (d / "metrics.jsonl").is_file():
            raise ValueError(f"{d} is not a `nestvit generate train` run folder")
        if not eval_rows(d) and (data := _recorded_data(d)) and own_images(data):
            raise ValueError(f"{d} was trained on your own images ({data}) without FID evaluations, which need a "
                             "feature network you name: `nestvit generate eval RUN --feature-net CLASSIFIER_RUN` "
                             "measures its generator; a run trained with --set feature_net=CLASSIFIER_RUN has a curve")
        if not eval_rows(d):
            raise ValueError(f"{d}: no FID evaluations in its metrics.jsonl (trained with eval_every -1?): the report "
                             "plots the evaluations made during training (a run with --set eval_every=N); "
                             f"`nestvit generate eval {d}` measures its last generator once, on its own")
    return names


def _recorded_data(run_dir: Path) -> str | None:
    """The data a GAN run's EMA generator records (None: no such weights)."""
    from ..contract import gan_run_folder, read_contract

    folder = gan_run_folder(run_dir)
    if folder is None or not (folder / "generator_ema.safetensors").is_file():
        return None
    return read_contract(folder / "generator_ema.safetensors").info.get("data")


def plot_fid(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None) -> Path:
    """FID (and KID) of the EMA generator against training steps, one line per run; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = check_runs(run_dirs, labels)
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
    labels = check_runs(run_dirs, labels)
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


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="`nestvit generate train` run folders")
    p.add_argument("--labels", nargs="+", help="one legend label per run (default: the folder names)")
    p.add_argument("--out", default="fid.png", help="PNG of FID and KID against steps (default fid.png)")


def run(args) -> int:
    import sys

    from matplotlib.backend_bases import FigureCanvasBase

    from ..cli_args import writable_dir

    kinds = FigureCanvasBase.get_supported_filetypes()  # before the table: not matplotlib's error after it
    if Path(args.out).suffix and Path(args.out).suffix[1:].lower() not in kinds:
        raise ValueError(f"--out {args.out}: a figure is written as {', '.join(sorted(kinds))}; name the file .png")
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the figure's file name, e.g. "
                         f"{Path(args.out) / 'fid.png'}")
    labels = check_runs(args.runs, args.labels)
    for what, key in (("feature networks", "feature_net"), ("sample counts (eval_n)", "n")):
        seen = [(label, sorted({str(r.get(key)) for r in eval_rows(d)})) for label, d in zip(labels, args.runs)]
        if len({v for _, vs in seen for v in vs}) > 1:
            print(f"warning: the runs were evaluated with different {what} ("
                  + "; ".join(f"{label}: {', '.join(vs)}" for label, vs in seen)
                  + "): their FIDs are not comparable", file=sys.stderr)
    writable_dir(Path(args.out).parent)
    print(fid_table(args.runs, labels=args.labels))
    print(f"wrote {plot_fid(args.runs, args.out, labels=args.labels)}")
    return 0


def _main(argv: list[str] | None = None) -> int:
    import sys

    from ..cli import main

    return main(["generate", "report", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(_main())
