"""``nestvit`` command line: one entry point, one sub-command per capability.

Sub-commands live next to the code they drive; each module exposes ``add_arguments(parser)`` and
``run(args) -> int`` and is imported only when its command is used, so ``nestvit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings

from .errors import UserError
from .system import keep_freed_memory

# A user's mistake (bad input, a missing or unreadable file, a config that does not fit): one line, exit 2.
# Any other exception is an internal error (a bug): said so, exit 1.
USER_ERRORS = (UserError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("nestvit.cli_models", "list the registered classifiers: params, GFLOPs, input size, family"),
    "pretrained": ("nestvit.pretrained", "list (and download) published weights: source, licence, top-1, SHA-256"),
    "train": ("nestvit.train.cli_train", "train a model from a recipe"),
    "eval": ("nestvit.train.cli_eval", "evaluate a checkpoint (or its ONNX export) on a data set or image folder"),
    "predict": ("nestvit.train.cli_predict", "classify image files or folders with a checkpoint (to CSV/JSONL)"),
    "bench": ("nestvit.bench", "measure throughput, FLOPs, MFU and memory"),
    "explain": ("nestvit.explain.cli", "GradCAT / CAM / Grad-CAM / rollout / occlusion explanations as PNG"),
    "generate": ("nestvit.generate.cli", "train the NesT generator (GAN), sample, measure FID/KID/IS, report"),
    "experiment": ("nestvit.experiments", "rerun the papers' experiments and write tables and plots"),
    "export": ("nestvit.export", "export a trained classifier or generator to ONNX or a torch.export program, checked"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module is installed (``find_spec`` raises when a parent package is missing)."""
    out = {}
    for name, (module, help_) in COMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            out[name] = (module, help_)
    return out


def _torch_oom() -> type[BaseException]:
    """``torch.OutOfMemoryError`` (a device ran out of memory), imported only when an error is being handled."""
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nestvit", description="Nested vision transformers (ViT, TNT, RTNT, NesT): train, compare, explain, "
                                    "generate.")
    parser.add_argument("--version", action="version", version=f"nestvit {__version__}")
    # its own dest: a sub-command's --debug default would otherwise overwrite `nestvit --debug COMMAND`
    parser.add_argument("--debug", dest="debug_all", action="store_true",
                        help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    keep_freed_memory()
    debug = bool(getattr(args, "debug", False) or getattr(args, "debug_all", False))
    threads = _set_threads(getattr(args, "threads", None))
    try:
        with warnings.catch_warnings():  # nestvit's own warnings as one line each, as its notes (restored after)
            warnings.showwarning = _show_warning
            return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt as e:  # training's Stopped says where its state is and how to go on
        _close_progress_bars()
        if os.environ.get("RANK", "0") == "0":  # torchrun: every rank stopped at the same step; one says so
            print(f"nestvit {args.command}: {e}" if str(e) else "interrupted", file=sys.stderr)
        return {"SIGTERM": 143, "SIGHUP": 129}.get(getattr(e, "signal_name", None), 130)  # the shells' 128 + signum
    except BrokenPipeError as e:
        if _stdout_reader_gone():  # `nestvit models | head`: the reader has what it wanted; be quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            return 141
        if debug:  # another pipe broke (a worker, a subprocess): a bug, reported as one
            raise
        return _internal_error(args.command, e)
    except USER_ERRORS as e:
        if debug:
            raise
        _close_progress_bars()
        print(f"nestvit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, _torch_oom()) as e:  # the machine's limit, not a bug
        if debug:
            raise
        print(f"nestvit {args.command}: error: out of memory ({type(e).__name__}); lower the batch size "
              "(global_batch / micro_batch, --batch-size, --batch) or the image size", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is a bug of nestvit, and said to be one
        if debug:
            raise
        return _internal_error(args.command, e)
    finally:
        _set_threads(threads)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if not filename.startswith(_PACKAGE_DIR):  # torch's and others': their own format, with the place
        _default_show_warning(message, category, filename, lineno, file, line)
        return
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):  # above an open progress bar, not inside it
        tqdm.tqdm.write(f"warning: {message}", file=sys.stderr)
    else:
        print(f"warning: {message}", file=sys.stderr if file is None else file)


_default_show_warning = warnings.showwarning
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end was closed (poll reports an error on the writing end)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (a test's capture)
        return False


def _internal_error(command: str, e: BaseException) -> int:
    """Say that ``e`` is a bug of nestvit (not the user's input) and how to report it; exit status 1."""
    _close_progress_bars()
    print(f"nestvit {command}: internal error (a bug in nestvit, not in your input): {type(e).__name__}: {e}",
          file=sys.stderr)
    print("please report it with the command line and the output of `nestvit --version`; run it again as "
          f"`nestvit --debug {command} ...` to see the traceback", file=sys.stderr)
    return 1


def _close_progress_bars() -> None:
    """End the progress bars a failing command left open, so that its error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _set_threads(n: int | None) -> int | None:
    """A command's ``--threads`` (eval, predict, explain, bench, experiment: every run), for the command only;
    returns the count it replaced, for ``main`` to put back (None: nothing changed)."""
    if n is None:
        return None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


if __name__ == "__main__":
    sys.exit(main())
