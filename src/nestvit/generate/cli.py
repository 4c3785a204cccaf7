"""``nestvit generate``: train a GAN from a recipe, sample from it, measure it.

    nestvit generate train RECIPE [--set key=value ...] [--out DIR] [--resume DIR] [--device cpu|cuda]
    nestvit generate sample CHECKPOINT -n N [--out grid.png | --out FOLDER] [--seed S] [--raw]
    nestvit generate eval RUN [-n 10000] [--feature-net SPEC] [--raw] [--out metrics.json]
    nestvit generate report RUN [RUN ...] [--labels A B ...] [--out fid.png]

``RECIPE`` is a YAML file or the name of a built-in recipe (``gan_nest_fashion_mnist``,
``gan_conv_fashion_mnist``). ``--resume DIR`` continues the run in ``DIR`` from its latest checkpoint
with the configuration saved there (``--set`` may still change e.g. ``steps``). ``CHECKPOINT`` is a run
directory or a ``generator*.safetensors`` file (``nestvit.load``); the EMA generator is used unless ``--raw``.
``sample --out FOLDER`` (a name without a suffix, or an existing folder) writes one PNG per image instead of a
grid. ``eval`` measures FID / KID / IS of ``-n`` samples against the run's reference split, with the run's
feature network; ``report`` tabulates and plots the evaluations of runs against steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_args import add_threads, positive_int

    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="gen_command", metavar="ACTION")
    t = sub.add_parser("train", help="train a GAN from a recipe", epilog=_recipe_list(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", help="YAML recipe file (kind: gan) or built-in recipe name (omit with "
                                             "--resume)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value; dotted keys reach into *_overrides), repeatable")
    t.add_argument("--list-keys", action="store_true",
                   help="print every key --set accepts, with its value in RECIPE and its type, and exit")
    t.add_argument("--out", help="run directory (default runs/generate/<recipe name>)")
    t.add_argument("--resume", metavar="DIR", help="resume the run in DIR from its latest checkpoint")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    s = sub.add_parser("sample", help="sample an image grid (or a folder of images) from a trained generator")
    s.add_argument("checkpoint", help="GAN run folder, save_pretrained folder or generator*.safetensors file")
    s.add_argument("-n", type=positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--out", default="samples.png",
                   help="a .png path: one grid (default samples.png); a folder (a name without a suffix, or an "
                        "existing folder): one PNG per image, 000000.png ...")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=positive_int, default=None, help="images per row (default sqrt(n))")
    s.add_argument("--raw", action="store_true", help="use the raw generator instead of its EMA")
    s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_threads(s)
    e = sub.add_parser("eval", help="FID / KID / IS of a trained generator")
    e.add_argument("run", help="a `nestvit generate train` run folder (or a generator*.safetensors file in it)")
    e.add_argument("-n", type=_at_least_2, default=10_000, help="samples (default 10000; the run's own "
                                                                "evaluations used its eval_n, 2000 in the recipes)")
    e.add_argument("--feature-net", metavar="SPEC", help="classifier run or weights file, or inception:PATH "
                                                         "(default: the run's own, so numbers match its curve; "
                                                         "a run with feature_net auto and none trained yet "
                                                         "trains it first into RUN/feature_net, ~3 CPU-min)")
    e.add_argument("--seed", type=int, default=None, help="latents' seed (default: the one training evaluates with)")
    e.add_argument("--raw", action="store_true", help="measure the raw generator instead of its EMA")
    e.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    e.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    add_threads(e)
    r = sub.add_parser("report", help="FID / KID table and plot of GAN runs against steps")
    from .report import add_arguments as report_arguments

    report_arguments(r)
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser.set_defaults(_gen_parser=parser)


def _at_least_2(text: str) -> int:
    from ..cli_args import positive_int

    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("FID needs at least 2 samples (a covariance), got 1")
    return value


def _recipe_list() -> str:
    from ..config import builtin_recipes, recipe_summary

    lines = ["built-in GAN recipes (src/nestvit/recipes/*.yaml with kind: gan):"]
    lines += [f"  {name:24s} {recipe_summary(path)}" for name, path in builtin_recipes("gan").items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.gen_command == "train":
        return _train(args)
    if args.gen_command == "sample":
        return _sample(args)
    if args.gen_command == "eval":
        return _eval(args)
    if args.gen_command == "report":
        from .report import run as report

        return report(args)
    args._gen_parser.print_help()
    return 2


def _train(args: argparse.Namespace) -> int:
    from .train import GanConfig, apply_overrides, config_from_dict, load_recipe, train_gan

    if args.list_keys:  # each key with its value in the recipe (the defaults without one) and its type
        from ..config import key_table

        print(key_table(load_recipe(args.recipe) if args.recipe else GanConfig()))
        return 0
    if args.resume:
        from ..config import read_run_config

        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        cfg = config_from_dict(read_run_config(run_dir, "gan"), str(cfg_file))
        if args.recipe:
            print(f"note: --resume uses {cfg_file}; recipe {args.recipe} is ignored", file=sys.stderr)
        if args.out and Path(args.out) != run_dir:
            print(f"note: --resume continues the run in {run_dir}; --out {args.out} is ignored", file=sys.stderr)
    else:
        if not args.recipe:
            raise ValueError("give a RECIPE (file or built-in name) or --resume DIR")
        cfg = load_recipe(args.recipe)
        run_dir = Path(args.out or Path("runs") / "generate" / Path(args.recipe).stem)  # train_gan refuses a used one
    cfg = apply_overrides(cfg, args.overrides)
    summary = train_gan(cfg, run_dir, resume=bool(args.resume), device=args.device)
    ev = summary.get("eval")
    line = (f"done: {summary['step']} steps on {summary['device']} in {summary['wall_seconds']:.0f}s wall "
            f"({summary['cpu_seconds']:.0f}s CPU) -> {run_dir}")
    if ev:
        line += (f"; FID {ev['fid']:.2f}, KID {ev['kid']:.4f}, IS {ev['is']:.2f} "
                 f"(features {ev['feature_net']}, n={ev['n']})")
    print(line)
    from ..cli_args import next_commands

    measured = [f"nestvit generate eval {run_dir} -n 10000", f"nestvit generate report {run_dir} --out fid.png"]
    print(next_commands(f"nestvit generate sample {run_dir} -n 64 --out grid.png", *(measured if ev else []),
                        f"nestvit export {run_dir}"))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from ..cli_args import writable_dir
    from .metrics import generate
    from .train import load_generator, save_grid, save_images

    out = Path(args.out)
    grid = out.suffix.lower() == ".png" and not out.is_dir()
    if out.suffix and not grid and not out.is_dir():
        raise ValueError(f"--out {out}: give a .png file (one grid) or a folder (one PNG per image)")
    writable_dir(out.parent if grid else out)  # before any work
    if not grid and any(out.glob("[0-9][0-9][0-9][0-9][0-9][0-9].png")):
        raise ValueError(f"--out {out} already holds sampled images (000000.png ...); give an empty or new folder, "
                         "so that FID tools read only these samples")
    G = load_generator(args.checkpoint, ema=not args.raw)
    images = generate(G, args.n, seed=args.seed)
    if grid:
        save_grid(images, out, nrow=args.nrow)
        print(f"wrote {out} ({args.n} images, {G.img_size}x{G.img_size})")
    else:
        save_images(images, out)
        print(f"wrote {args.n} images ({G.img_size}x{G.img_size}) to {out}/000000.png ...")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from ..fileio import atomic_write_text
    from .metrics import EVAL_SEED
    from .train import evaluate_run

    if args.out:
        from ..cli_args import writable_dir

        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give the JSON file's name, e.g. "
                             f"{Path(args.out) / 'eval.json'}")
        writable_dir(Path(args.out).parent)  # before the evaluation
    res = evaluate_run(args.run, n=args.n, ema=not args.raw, feature_net=args.feature_net,
                       seed=EVAL_SEED if args.seed is None else args.seed, device=args.device)
    print(f"{res['run']} ({res['generator']} generator, step {res['step']}): FID {res['fid']:.3f}  "
          f"KID {res['kid']:.5f} ± {res['kid_std']:.5f}  IS {res['is']:.3f} ± {res['is_std']:.3f}  "
          f"[{res['n']} samples vs {res['data']} {res['split']}, features {res['feature_net']}]")
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(res, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
