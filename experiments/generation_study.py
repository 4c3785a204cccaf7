#!/usr/bin/env python
"""Generation with controls: NesT vs conv vs TransGAN-like generators, and the de-aggregation ablation.

One protocol (issue "the papers' claims, tested soundly", NesT paper Section 4.5 and Figure 7 middle):

- arms: ``nest`` (``nest_28``), ``conv`` (``conv_28``), ``transgan`` (``transgan_28``: the same network with
  global attention) and, with ``--ablation``, the NesT generator's de-aggregation variants: pixel shuffle or
  nearest upsampling, each with and without a 3x3 conv (``nest-ps``, ``nest-ps-conv``, ``nest-nn``,
  ``nest-nn-conv``; ``nest-ps`` is the ``nest`` arm itself);
- every arm: the ``gan_*_fashion_mnist`` recipe (Fashion-MNIST 28x28, ``resnet_28`` discriminator, batch 32,
  lr 2e-4, R1 0.1 every 16 steps, EMA 0.995, one thread), ``--steps`` steps (default 5,000), FID/KID/IS of
  the EMA generator every ``--eval-every`` steps (default 500) on 2,000 samples against the 10k test
  images, with **one** feature network trained once for all runs (so every FID is on the same scale);
- ``--seeds`` (default 0 1 2) per arm.

Reported per arm: the FID/KID/IS curves (mean and min-max over seeds), the mean of each seed's last three
evaluations (mean +- std over seeds), and the FID at equal CPU time: each seed's FID-vs-CPU-seconds curve
interpolated at the smallest total CPU time of all runs (which every run has reached). Runs resume after an
interruption (``nestvit generate train``'s exact resume; the CPU clock counts across resumes) and finished
runs are read back, so the command can be rerun until it is done. The default ``--out`` is
``experiments/results/generation_study``, whose ``.gitignore`` keeps the record (``generation_study.json``/``.md``
and each run's ``config.yaml``, ``metrics.jsonl`` and ``summary.json``) for committing and leaves out weights,
training state and samples.

    python experiments/generation_study.py             # nest, conv, transgan
    python experiments/generation_study.py --ablation  # + the Figure 7 variants
    python experiments/generation_study.py --quick     # a smoke run (~1 CPU-minute), under OUT/quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from nestvit.fileio import atomic_write_text, save_figure
from nestvit.generate.train import GanConfig, apply_overrides, load_recipe, read_metrics, train_gan

ROOT = Path(__file__).resolve().parents[1]

ARMS = {  # name -> (recipe, --set overrides)
    "nest": ("gan_nest_fashion_mnist", []),
    "conv": ("gan_conv_fashion_mnist", []),
    "transgan": ("gan_nest_fashion_mnist", ["generator=transgan_28"]),
}
ABLATION = {
    "nest-ps-conv": ("gan_nest_fashion_mnist", ["generator_overrides.deagg_conv=true"]),
    "nest-nn": ("gan_nest_fashion_mnist", ["generator_overrides.deaggregation=nearest"]),
    "nest-nn-conv": ("gan_nest_fashion_mnist", ["generator_overrides.deaggregation=nearest",
                                                "generator_overrides.deagg_conv=true"]),
}
DEFAULT_OUT = ROOT / "experiments/results/generation_study"
LAST = 3  # evaluations averaged per seed for the "final" number


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="the study's folder (default: experiments/results/generation_study, the committed record)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=[*ARMS, *ABLATION])
    p.add_argument("--ablation", action="store_true", help="also the de-aggregation variants (Figure 7 middle)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1,024 images, 20 steps, tiny evaluations")
    return p.parse_args(argv)


def feature_net(out: Path, quick: bool) -> Path:
    """The one feature network every run's FID uses: the ``fid_features`` recipe's run, trained once, then read."""
    from nestvit.generate.metrics import train_feature_net

    return train_feature_net("fashion_mnist", out / "feature_net", epochs=1 if quick else None, log=print)


def config(arm: str, seed: int, args: argparse.Namespace, features: Path) -> GanConfig:
    recipe, sets = {**ARMS, **ABLATION}[arm]
    cfg = load_recipe(recipe)
    extra = [f"seed={seed}", f"steps={args.steps}", f"eval_every={args.eval_every}", f"feature_net={features}",
             f"ckpt_every={args.eval_every}", f"sample_every={args.eval_every}", "progress=false"]
    if args.quick:
        extra += ["max_images=1024", "eval_n=256", "log_every=10"]
    return apply_overrides(cfg, [*sets, *extra])


def run(arm: str, seed: int, args: argparse.Namespace, features: Path) -> list[dict]:
    """Train (or resume, or read back) one run; its metrics records."""
    cfg = config(arm, seed, args, features)
    run_dir = args.out / "runs" / f"{arm}-s{seed}"
    done = run_dir / "summary.json"
    if done.is_file():
        print(f"[{arm} seed {seed}] done before: reading {run_dir}", flush=True)
    else:
        resume = (run_dir / "state.pt").is_file()
        print(f"[{arm} seed {seed}] {'resuming' if resume else 'training'} -> {run_dir}", flush=True)
        train_gan(cfg, run_dir, resume=resume)  # writes summary.json when the run is finished
    return read_metrics(run_dir)


def curve(records: list[dict]) -> list[dict]:
    """``[{step, cpu, fid, kid, is}]`` per evaluation; ``cpu``: the run's CPU seconds at that step."""
    cpu_at = {r["step"]: r["cpu"] for r in records if r.get("kind") == "train" and "cpu" in r}
    out = []
    for r in records:
        if r.get("kind") == "eval":
            cpu = 0.0 if r["step"] == 0 else cpu_at.get(r["step"])
            out.append({"step": r["step"], "cpu": cpu, "fid": r["fid"], "kid": r["kid"], "is": r["is"]})
    return out


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(curves: dict[str, dict[int, list[dict]]]) -> dict:
    """Per arm: the mean of each seed's last LAST evaluations, FID at equal steps and at equal CPU time."""
    budget = min(c[-1]["cpu"] for arm in curves.values() for c in arm.values() if c and c[-1]["cpu"])
    rows = {}
    for arm, seeds in curves.items():
        finals = {k: [statistics.fmean(e[k] for e in c[-LAST:]) for c in seeds.values()] for k in ("fid", "kid", "is")}
        at_cpu = []
        for c in seeds.values():
            pts = [(e["cpu"], e["fid"]) for e in c if e["cpu"] is not None]
            at_cpu.append(float(np.interp(budget, [p[0] for p in pts], [p[1] for p in pts])))
        steps = sorted({e["step"] for c in seeds.values() for e in c})
        by_step = {s: mean_std([e["fid"] for c in seeds.values() for e in c if e["step"] == s]) for s in steps}
        cpu_total = mean_std([c[-1]["cpu"] for c in seeds.values()])
        rows[arm] = {"seeds": sorted(seeds), "final": {k: mean_std(v) for k, v in finals.items()},
                     "fid_at_equal_cpu": mean_std(at_cpu), "fid_by_step": by_step, "cpu_s": cpu_total,
                     "sec_per_step": cpu_total["mean"] / max(steps)}
    return {"cpu_budget_s": budget, "last": LAST, "arms": rows}


def markdown(result: dict, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"| arm | seeds | FID (mean of the last {LAST} evaluations) | KID | IS | "
             f"FID at {result['cpu_budget_s']:.0f} CPU-s (equal CPU time) | CPU-s per run | CPU-s per step |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, r in result["arms"].items():
        f = r["final"]
        lines.append(f"| {arm} | {len(r['seeds'])} | {f['fid']['mean']:.1f} ± {f['fid']['std']:.1f} | "
                     f"{f['kid']['mean']:.3f} ± {f['kid']['std']:.3f} | {f['is']['mean']:.2f} ± {f['is']['std']:.2f} | "
                     f"{r['fid_at_equal_cpu']['mean']:.1f} ± {r['fid_at_equal_cpu']['std']:.1f} | "
                     f"{r['cpu_s']['mean']:.0f} | {r['sec_per_step']:.3f} |")
    steps = sorted({int(s) for r in result["arms"].values() for s in r["fid_by_step"]})
    lines += ["", "FID at equal steps (mean ± std over seeds):", "",
              "| step | " + " | ".join(result["arms"]) + " |", "|---" * (len(result["arms"]) + 1) + "|"]
    for s in steps:
        cells = []
        for r in result["arms"].values():
            v = r["fid_by_step"].get(s)
            cells.append(f"{v['mean']:.1f} ± {v['std']:.1f}" if v else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """FID, KID and IS against steps (mean, band: min-max over seeds) and FID against CPU time (a line per seed)."""
    from nestvit.experiments import _plt

    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    by_step = {"fid": axes[0][0], "kid": axes[0][1], "is": axes[1][0]}
    a_cpu = axes[1][1]
    for i, (arm, seeds) in enumerate(curves.items()):
        steps = sorted({e["step"] for c in seeds.values() for e in c})
        for key, ax in by_step.items():
            vals = [[e[key] for c in seeds.values() for e in c if e["step"] == s] for s in steps]
            ax.plot(steps, [statistics.fmean(v) for v in vals], color=f"C{i}", label=arm)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=f"C{i}", alpha=0.15)
        for c in seeds.values():
            pts = [(e["cpu"], e["fid"]) for e in c if e["cpu"] is not None]
            a_cpu.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i}", alpha=0.7,
                       label=arm if c is next(iter(seeds.values())) else None)
    titles = {"fid": "FID vs steps", "kid": "KID vs steps", "is": "Inception Score vs steps"}
    for key, ax in by_step.items():
        ax.set_xlabel("step")
        ax.set_title(f"{titles[key]} (mean, band: min-max over seeds)", fontsize=10)
        ax.set_ylabel(f"{key.upper() if key != 'is' else 'IS'} (EMA generator, 2,000 samples)")
    a_cpu.set_xlabel("CPU seconds (one thread)")
    a_cpu.set_title("FID vs CPU time (one line per seed)", fontsize=10)
    a_cpu.set_ylabel("FID (EMA generator, 2,000 samples)")
    for ax in (by_step["fid"], by_step["kid"], a_cpu):
        ax.set_yscale("log")
    for ax in (*by_step.values(), a_cpu):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.out = args.out / "quick" if args.out.resolve() == DEFAULT_OUT else args.out  # never the record
        args.steps, args.eval_every, args.seeds = 20, 10, args.seeds[:2]
    arms = list(dict.fromkeys([*args.arms, *(ABLATION if args.ablation else [])]))
    t0 = time.perf_counter()
    features = feature_net(args.out, args.quick)
    curves = {arm: {s: curve(run(arm, s, args, features)) for s in args.seeds} for arm in arms}
    result = summarize(curves)
    result.update(steps=args.steps, eval_every=args.eval_every, wall_s=round(time.perf_counter() - t0, 1),
                  curves=curves)
    command = "python experiments/generation_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    atomic_write_text(args.out / "generation_study.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(args.out / "generation_study.md", markdown(result, command))
    plot(curves, args.out / "generation_study.png")
    print(markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
