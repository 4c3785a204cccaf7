"""``nestvit generate``: train a GAN from a recipe, or sample a grid from a checkpoint.

    nestvit generate train RECIPE [--set key=value ...] [--out DIR] [--resume DIR] [--device cpu|cuda]
    nestvit generate sample CHECKPOINT -n N [--out grid.png] [--seed S] [--raw]

``RECIPE`` is a YAML file or the name of a built-in recipe (``gan_nest_fashion_mnist``,
``gan_conv_fashion_mnist``). ``--resume DIR`` continues the run in ``DIR`` from its latest checkpoint
with the configuration saved there (``--set`` may still change e.g. ``steps``). ``CHECKPOINT`` is a run
directory or a ``generator*.safetensors`` file (``nestvit.load``); the EMA generator is used unless ``--raw``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli_args import positive_int

    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="gen_command", metavar="ACTION")
    t = sub.add_parser("train", help="train a GAN from a recipe", epilog=_recipe_list(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", help="YAML recipe file (kind: gan) or built-in recipe name (omit with "
                                             "--resume)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value; dotted keys reach into *_overrides), repeatable")
    t.add_argument("--list-keys", action="store_true", help="print every key --set accepts and exit")
    t.add_argument("--out", help="run directory (default runs/generate/<recipe name>)")
    t.add_argument("--resume", metavar="DIR", help="resume the run in DIR from its latest checkpoint")
    t.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    t.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    s = sub.add_parser("sample", help="sample an image grid from a trained generator")
    s.add_argument("checkpoint", help="run dir, checkpoint dir or generator safetensors file")
    s.add_argument("-n", type=positive_int, default=64, help="number of images (default 64)")
    s.add_argument("--out", default="samples.png", help="PNG path (default samples.png)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--nrow", type=positive_int, default=None, help="images per row (default sqrt(n))")
    s.add_argument("--raw", action="store_true", help="use the raw generator instead of its EMA")
    s.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(_gen_parser=parser)


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
    args._gen_parser.print_help()
    return 2


def _train(args: argparse.Namespace) -> int:
    from .train import GanConfig, apply_overrides, config_from_dict, load_recipe, train_gan

    if args.list_keys:
        from ..config import valid_keys

        print("\n".join(valid_keys(GanConfig)))
        return 0
    if args.resume:
        from ..config import read_run_config

        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        cfg = config_from_dict(read_run_config(run_dir, "gan"), str(cfg_file))
        if args.recipe:
            print(f"note: --resume uses {cfg_file}; recipe {args.recipe} is ignored", file=sys.stderr)
    else:
        if not args.recipe:
            raise ValueError("give a RECIPE (file or built-in name) or --resume DIR")
        cfg = load_recipe(args.recipe)
        run_dir = Path(args.out or Path("runs") / "generate" / Path(args.recipe).stem)
        if (run_dir / "state.pt").exists() or (run_dir / "checkpoints" / "latest").exists():
            raise ValueError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    cfg = apply_overrides(cfg, args.overrides)
    summary = train_gan(cfg, run_dir, resume=bool(args.resume), device=args.device)
    ev = summary.get("eval")
    line = (f"done: {summary['step']} steps on {summary['device']} in {summary['wall_seconds']:.0f}s wall "
            f"({summary['cpu_seconds']:.0f}s CPU) -> {run_dir}")
    if ev:
        line += (f"; FID {ev['fid']:.2f}, KID {ev['kid']:.4f}, IS {ev['is']:.2f} "
                 f"(features {ev['feature_net']}, n={ev['n']})")
    print(line)
    print(f"next: nestvit generate sample {run_dir} -n 64 --out grid.png"
          + (f" | python -m nestvit.generate.report {run_dir} --out fid.png" if ev else ""))
    return 0


def _sample(args: argparse.Namespace) -> int:
    import torch

    from .train import load_generator, save_grid

    G = load_generator(args.checkpoint, ema=not args.raw)
    z = torch.randn(args.n, G.latent_dim, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        images = torch.cat([G(b) for b in z.split(256)])
    path = save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {path} ({args.n} images, {G.img_size}x{G.img_size})")
    return 0
