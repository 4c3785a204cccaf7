"""``nestvit train RECIPE [--set key=value ...] [--out DIR] [--resume DIR] [--device cpu|cuda] [--epochs N]
[--threads N]``.

Several processes: ``torchrun --nproc-per-node 2 -m nestvit.cli train RECIPE`` (each process takes
its share of the global batch; rank 0 prints and writes the run directory).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..cli_args import positive_int
from .config import builtin_recipes, recipe_summary


def _recipe_list() -> str:
    lines = ["built-in recipes (src/nestvit/recipes/*.yaml):"]
    for name, path in builtin_recipes().items():
        lines.append(f"  {name:22s} {recipe_summary(path)}")
    lines.append("")
    lines.append("examples:")
    lines.append("  nestvit train mnist5k_nest                       # the demo: a few minutes on a laptop CPU")
    lines.append("  nestvit train mnist5k_nest --set optim.lr=2e-3 --set model.overrides.drop_path_rate=0.1")
    lines.append("  nestvit train --resume runs/mnist5k_nest-20250101-120000 --epochs 20")
    lines.append("  nestvit train --list-keys                        # every key --set accepts")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _recipe_list()
    parser.add_argument("recipe", nargs="?", help="a recipe YAML file or a built-in recipe name (listed below)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, dotted for sections (optim.lr=1e-3, model.overrides.depths=2); "
                             "the value is read as YAML; repeatable")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: runs/<recipe>-<date>-<time>)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint, with its own config")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--epochs", type=int, help="shorthand for --set epochs=N")
    parser.add_argument("--threads", type=positive_int, help="shorthand for --set threads=N (CPU threads)")
    parser.add_argument("--list-keys", action="store_true",
                        help="print every key --set accepts, with its value in RECIPE and its type, and exit")
    parser.add_argument("--callback", action="append", default=[], metavar="MODULE:CLASS",
                        help="your own hook of the training loop (a nestvit.train.Callback subclass, e.g. a "
                             "logger; see nestvit.train.hooks); repeatable")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """File-system errors (a run directory that holds a run, a read-only disk, an I/O error) become
    ``UserError``s, which ``nestvit`` prints as one line; anything else passes through as it is."""
    from ..errors import UserError

    try:
        yield
    except UserError:
        raise
    except OSError as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            raise  # nestvit prints these as one line already
        raise UserError(str(e)) from e


def run(args: argparse.Namespace) -> int:
    from ..config import read_run_config
    from .config import load_config, read_recipe
    from .loop import train

    if args.list_keys:  # each key with its value in the recipe (the defaults without one) and its type
        from ..config import key_table

        print(key_table(load_config(read_recipe(args.recipe)[0] if args.recipe else None)))
        return 0
    overrides = list(args.overrides) + ([f"epochs={args.epochs}"] if args.epochs is not None else []) \
        + ([f"threads={args.threads}"] if args.threads is not None else [])
    if args.resume:
        if args.recipe:
            raise ValueError("give either a RECIPE or --resume RUN_DIR (a resumed run keeps its own config.yaml; "
                             "change it with --set)")
        run_dir = Path(args.resume)
        raw = read_run_config(run_dir, "classifier")
    else:
        if not args.recipe:
            raise ValueError("a RECIPE is required (a YAML file or a built-in name; see nestvit train --help)")
        raw, name = read_recipe(args.recipe)
        run_dir = Path(args.out or Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = load_config(raw, overrides)
    from .hooks import load_callback

    callbacks = [load_callback(spec) for spec in args.callback]
    with one_line_errors():
        result = train(cfg, run_dir, resume=bool(args.resume), device=args.device, callbacks=callbacks)
    if os.environ.get("RANK", "0") == "0" and result.test is not None:  # what the run folder is for, once
        run = result.run_dir
        from ..cli_args import next_commands

        print(next_commands(f"nestvit eval {run}", f"nestvit predict {run} IMAGE_OR_FOLDER",
                            f"nestvit explain {run} IMAGE --method occlusion", f"nestvit export {run}"))
    return 0
