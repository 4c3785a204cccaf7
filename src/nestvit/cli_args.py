"""What the sub-commands share in their arguments: types that refuse bad values, model overrides of --set."""

from __future__ import annotations

import argparse
import errno
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def add_threads(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: the CPU threads the command uses (``nestvit.cli.main`` applies it before the command runs)."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads (torch.set_num_threads; default: PyTorch's, every core)")


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, top-k)."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (sizes where 0 means "all")."""
    return _int(text, 0)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value:
        raise argparse.ArgumentTypeError("expected a number, got nan")
    return value


def nonnegative_float(text: str) -> float:
    """A number >= 0 (tolerances)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1] (shares, thresholds of a map scaled to [0, 1])."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def writable_dir(path: str | Path, *, create: bool = True, flag: str = "--out") -> Path:
    """Check, before any work, that ``path`` is (or can be made) a writable folder; returns it as a Path.

    Raises ``ValueError`` naming the folder and ``flag`` (the option that gave it), so an unwritable ``--out``
    fails at once instead of after the whole evaluation. ``create=False`` makes nothing: the nearest existing
    folder above is checked (a training run makes its folder once its data and model are read, so a refused
    run leaves none behind)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder; choose another path")
    probe = path
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            from .fileio import why_unwritable

            raise ValueError(f"{flag} {path}: cannot create the folder ({why_unwritable(e)}); choose a writable "
                             "path") from None
    else:
        probe = next(p for p in (path, *path.absolute().parents) if p.exists())
        if not probe.is_dir():
            raise ValueError(f"{flag} {path}: cannot create the folder ({probe} is a file); choose another path")
    try:  # a real write: os.access says yes to root in read-only places such as /proc
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        why = f" ({e.strerror.lower()})" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""
        place = "the folder" if probe == path else f"{probe}, where it would be made,"
        raise ValueError(f"{flag} {path}: {place} is not writable{why}; choose a writable path") from None
    return path


def image_files(items: Sequence[str | Path]) -> list[Path]:
    """The files of ``items``, a folder standing for every image file below it (sorted), in the order given."""
    from .data.datasets import IMAGE_EXTENSIONS, class_images

    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = class_images(path)
            if not found:
                raise ValueError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder or below it")
            paths += found
        elif path.is_file():
            paths.append(path)  # an unreadable file is named when it is read
        else:
            raise ValueError(f"{path}: no such image file or folder")
    return paths


def parse_sets(items: list[str]) -> dict[str, Any]:
    """Model overrides of ``--set``: ``["attn=mha", "depths=[1,1,1,1]"] -> {"attn": "mha", "depths": (1, 1, 1, 1)}``.

    Values are read as YAML (JSON is YAML too); one ``ValueError`` naming the item for anything else.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ValueError(f"--set {key.strip()}: cannot read the value {text.strip()!r} "
                             f"({getattr(e, 'problem', None) or 'not valid YAML'}); write a list as [1, 2]") from None
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


def next_commands(*commands: str) -> str:
    """The commands that read what a command just wrote, one a line under ``next:`` (no ``|`` between them,
    which a shell would read as a pipe)."""
    return "next: " + "\n      ".join(commands)


def output_stems(paths: list[Path]) -> list[str]:
    """A distinct name per path for its output (an image's PNG, a run's folder of ``eval``): the file's stem,
    with its extension where files of one name differ in it (``sq.png``, ``sq.bmp`` -> ``sq_png``, ``sq_bmp``),
    and as many of its folders as it takes to tell paths of the same name apart (``cats/0.png``,
    ``dogs/0.png`` -> ``cats_0``, ``dogs_0``); the same file given twice is numbered."""
    parts = [p.with_suffix("").parts for p in paths]
    depth = [1] * len(paths)  # how many trailing parts of each path its name takes
    ext = [False] * len(paths)  # whether its name ends with its extension
    while True:
        stems = ["_".join(x[-k:]) + (f"_{p.suffix.lstrip('.')}" if e else "")
                 for x, k, p, e in zip(parts, depth, paths, ext)]
        folded = [s.casefold() for s in stems]  # a.PNG and a.png are one file name on macOS and Windows
        taken = {s for s in folded if folded.count(s) > 1}
        grown = False
        for name in taken:
            group = [i for i, s in enumerate(folded) if s == name]
            suffixes = [paths[i].suffix.casefold() for i in group]
            if all(suffixes) and len(set(suffixes)) == len(group) and not any(ext[i] for i in group):
                for i in group:
                    ext[i] = grown = True
                continue
            for i in group:
                if depth[i] < len(parts[i]):
                    depth[i], grown = depth[i] + 1, True
        if not grown:  # all distinct, or the same file given twice: numbered
            return [f"{i}_{s}" if f in taken else s for i, (s, f) in enumerate(zip(stems, folded))]


class SkippedImages:
    """The unreadable files a command over many images skips (one does not cost the others their results)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __len__(self) -> int:
        return len(self.errors)

    def read(self, transform: Any, paths: Sequence[Path]) -> tuple[list[int], Any]:
        """``(positions in paths of the readable files, uint8 (B, C, H, W) tensor of them or None)``; each
        unreadable file's error is kept."""
        import torch

        from .contract import UnreadableImageError

        kept, images = [], []
        for i, path in enumerate(paths):
            try:
                images.append(transform.read(path))
                kept.append(i)
            except UnreadableImageError as e:
                self.errors.append(str(e))
        return kept, torch.stack(images) if images else None

    def report(self, done: int) -> None:
        """Raise the error when nothing was read (``done == 0``); else warn about the files skipped."""
        from .contract import UnreadableImageError
        from .errors import listed

        if not done and self.errors:
            raise UnreadableImageError(self.errors[0] if len(self.errors) == 1 else f"none of the {len(self.errors)} "
                                       f"files is a readable image: {listed(self.errors, sep='; ')}")
        if self.errors:  # every one (up to 20), a line each: the results leave them out
            print(f"warning: skipped {len(self.errors)} unreadable file(s), left out of the results:\n  "
                  + listed(self.errors, 20, sep="\n  "), file=sys.stderr)


def note_weights_of_a_file(checkpoint: str | Path, weights: str | None) -> str | None:
    """Say that ``--weights`` is ignored for one weights file (it chooses among a run folder's); the ``which`` to
    load ``checkpoint`` with (None for a file)."""
    from .contract import EXPORTED_SUFFIXES

    if weights is not None and Path(checkpoint).expanduser().is_file() \
            and Path(checkpoint).suffix.lower() not in EXPORTED_SUFFIXES:  # an export: nestvit.load refuses which=
        print(f"note: --weights {weights} chooses among a run folder's weights; {checkpoint} is one file, used as "
              "given", file=sys.stderr)
        return None
    return weights


def size_arg(text: str) -> int | str:
    """A generator size argument: pixels (``32``) or a preset's name (``tiny``); ``check_sizes`` judges it."""
    return int(text) if text.isascii() and text.isdecimal() else text
