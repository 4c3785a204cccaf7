"""Your own images as they are: a folder of class folders, a folder of split folders, or a CSV of path,label[,split].

``data.name=imagefolder`` reads ``data.root`` in one of three layouts, found by looking at it:

* ``root/<class>/*`` (class folders): one folder per class, images at any depth inside it;
* ``root/<split>/<class>/*`` (split folders): recognised by a folder named ``train``, ``training``, ``val``,
  ``valid``, ``validation``, ``dev``, ``test``, ``testing`` in any case (or ``data.train_split``) that holds
  folders and no images; every folder of ``root`` that holds folders is then a split, and a split asked for by
  one of those names is the one folder of its group (``data.train_split=train`` reads ``Training/``);
* ``labels.csv`` (a file): rows ``path,label`` or ``path,label,split`` (an optional header of those names; paths
  relative to the CSV's folder, or absolute; labels are class names; every row has the same number of fields).

The splits are the split folders, the CSV's split column (``train``, ``val``, ``test``, ... as written), or
``train`` for class folders and a CSV without a split column; ``holdout`` is a fixed share of the
training split's images, kept out of training for evaluation. An optional class-list file (``data.classes``:
one name a line) fixes the classes and their order (the label numbering); by default they are the sorted names.

The hold-out takes ``holdout_count(n, fraction)`` images of every class (``n * fraction`` rounded, at least one
of a class of two or more, never all): those whose path (relative to the root, ``/``-separated) ranks first by
SHA-256 of ``HOLDOUT_SALT + path``, ties by path. It depends only on the files' paths, not on the machine,
the order a folder lists them in, the run's seed or Python's hash seed, so every run, ``nestvit eval`` and
another machine find the same hold-out; adding images moves few others.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import listed
from .datasets import IMAGE_EXTENSIONS, DatasetError, ImageFolderDataset, ImageListDataset, same_name

__all__ = [
    "HOLDOUT",
    "HOLDOUT_SALT",
    "Layout",
    "default_eval_split",
    "eval_split_of",
    "find_layout",
    "holdout_count",
    "holdout_mask",
    "holds_image_folders",
    "load_images",
    "read_classes_file",
    "read_labels_csv",
    "split_folder",
]

HOLDOUT = "holdout"  # the name of the held-out split
HOLDOUT_SALT = b"nestvit-holdout-v1:"  # the hold-out's fixed seed: changing it changes every run's hold-out
# what marks root/<name>/<class>/* as a split folder, in any case ("Train", "VAL"); a split asked for by one name of a
# group (data.train_split=train) is the folder of that group when there is exactly one (Training/, train/, TRAIN/)
SPLIT_GROUPS = (("train", "training"), ("val", "valid", "validation", "dev"), ("test", "testing"))
SPLIT_NAMES = tuple(name for group in SPLIT_GROUPS for name in group)
EVAL_SPLITS = ("val", "test")  # the evaluation split by default, the first that exists (any name of its group)
LAYOUTS = ("root/<class>/*.jpg (a folder per class), root/<split>/<class>/*.jpg or a CSV file of path,label "
           "(or path,label,split)")


@dataclass(frozen=True)
class Layout:
    """What ``data.root`` is: ``kind`` "splits", "classes", "csv" or "csv-splits" (a CSV with a split column), or a
    shard layout (``nestvit.data.shards``); ``splits``: the split names it has."""

    root: Path
    kind: str
    splits: tuple[str, ...]

    @property
    def split_folders(self) -> bool:
        return self.kind in ("splits", "shard-splits", "csv-splits")

    def describe(self) -> str:
        return {"splits": "split folders root/<split>/<class>/*", "classes": "class folders root/<class>/*",
                "csv": "a CSV of path,label", "csv-splits": "a CSV of path,label,split",
                "shards": "tar shards root/*.tar",
                "shard-splits": "split folders of tar shards root/<split>/*.tar"}[self.kind]

    def available(self, holdout: float) -> tuple[str, ...]:
        """The split names ``data.train_split`` / ``data.eval_split`` may take (with the hold-out if any)."""
        return self.splits + ((HOLDOUT,) if holdout > 0 else ())


def _has_images(folder: Path) -> bool:
    exts = set(IMAGE_EXTENSIONS)
    return any(p.suffix.lower() in exts and p.is_file() for p in folder.iterdir())


def holds_image_folders(root: str | Path) -> bool:
    """Whether ``root`` looks like a folder of your own images (a folder with image files in a folder of it, or
    a CSV file): what an in-memory data set's ``data.root`` (IDX files, pickles) never is."""
    path = Path(root).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return path.is_dir() and any(_has_images(d) or any(_has_images(e) for e in _subdirs(d)[:3])
                                 for d in _subdirs(path)[:3])


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def stray_images(layout: Layout, split: str) -> list[str]:
    """Warnings for image files a folder layout does not use: loose in the class folders' root, or in a folder
    named as a split (``val/*.jpg``) that has no class folders, so it is no split."""
    if layout.kind not in ("classes", "splits"):
        return []
    notes = []
    exts = set(IMAGE_EXTENSIONS)
    for folder in (layout.root, layout.root / split) if layout.kind == "splits" else (layout.root,):
        loose = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in exts and p.is_file())
        if loose:
            notes.append(f"warning: {folder}: {len(loose)} image file(s) lie directly in it ({', '.join(loose[:3])}"
                         f"{', ...' if len(loose) > 3 else ''}), in no class folder, so they are not used; move "
                         "each into its class's folder")
    for d in _subdirs(layout.root):
        if layout.kind == "splits" and d.name.lower() in SPLIT_NAMES and d.name not in layout.splits \
                and _has_images(d):
            notes.append(f"warning: {d} holds images but no class folders, so it is not a split and is not used; "
                         f"put its images in {d.name}/<class>/ folders")
        elif layout.kind == "classes" and d.name.lower() in SPLIT_NAMES:
            notes.append(f"warning: {d.name}/ is read as a class named {d.name!r}; if it is a split, put the "
                         f"training images in {layout.root}/train/<class>/ and these in {d}/<class>/")
    return notes


def find_layout(root: str | Path | None, train_split: str = "train", *, name: str = "imagefolder") -> Layout:
    """The layout of ``root`` (see the module docstring), or one ``DatasetError`` saying what was expected."""
    if root is None:
        raise DatasetError(f"{name}: data.root is required: {LAYOUTS}")
    path = Path(root).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DatasetError(f"{name}: {path} is a file but not a .csv; data.root must be {LAYOUTS}")
        splits = sorted({row[2] for _, row in _labels_table(path) if len(row) == 3})
        return Layout(path, "csv-splits", tuple(splits)) if splits else Layout(path, "csv", ("train",))
    if not path.exists():
        where = (f" (a relative path, read from the current folder {Path.cwd()})" if not path.is_absolute() else
                 " (moved? a run reads its data from where it was: nestvit train --resume RUN --set "
                 "data.root=NEW_PATH, nestvit eval RUN --root NEW_PATH)")
        raise DatasetError(f"{name}: {path} does not exist{where}; data.root must be {LAYOUTS}")
    if not path.is_dir():
        raise DatasetError(f"{name}: {path} is neither a folder nor a CSV file; data.root must be {LAYOUTS}")
    subdirs = _subdirs(path)
    if not subdirs:
        loose = " (it holds images directly: put each class's images in a folder of its own)" \
            if _has_images(path) else ""
        raise DatasetError(f"{name}: {path} has no class folders{loose}; expected {LAYOUTS}")
    marked = [d for d in subdirs if d.name.lower() in (*SPLIT_NAMES, train_split.lower()) and _subdirs(d)
              and not _has_images(d)]
    if marked:
        return Layout(path, "splits", tuple(d.name for d in subdirs if _subdirs(d)))
    return Layout(path, "classes", ("train",))


def split_folder(layout: Layout, split: str) -> str:
    """The name in ``layout.splits`` that ``split`` asks for: itself when there, else the split of the same name
    in another case or of the same group (``train`` -> ``Training``; of several, the first in the group's order:
    ``valid`` before ``dev``); ``split`` unchanged when none matches (the error then lists what there is)."""
    if split in layout.splits or split == HOLDOUT:
        return split
    group = next((g for g in SPLIT_GROUPS if split.lower() in g), (split.lower(),))
    found = sorted((s for s in layout.splits if s.lower() in group), key=lambda s: group.index(s.lower()))
    return found[0] if found else split


def eval_split_of(layout: Layout, train_split: str) -> str | None:
    """The split folder to evaluate on by default: a ``val`` one (``valid``, ``validation``, any case), then a
    ``test`` one; None when there is neither."""
    train = split_folder(layout, train_split)
    candidates = (split_folder(layout, e) for e in EVAL_SPLITS)
    return next((s for s in candidates if s in layout.splits and s != train), None)


def default_eval_split(layout: Layout, train_split: str, holdout: float, *, name: str = "imagefolder") -> str:
    """The split to evaluate on when ``data.eval_split`` is not given: :func:`eval_split_of`, else the hold-out."""
    split = eval_split_of(layout, train_split)
    if split is not None:
        return split
    if holdout > 0:
        return HOLDOUT
    raise DatasetError(f"{name}: {layout.root} ({layout.describe()}) has no val or test split to evaluate on, and "
                       "data.holdout is 0; set data.holdout (e.g. 0.1: a tenth of each class held out for "
                       "evaluation) or data.eval_split")


def check_split(layout: Layout, split: str, holdout: float, *, key: str, name: str = "imagefolder") -> None:
    """One ``DatasetError`` naming the splits there are, if ``split`` is not one of them."""
    available = [s for s in layout.available(holdout) if s != HOLDOUT or key != "data.train_split"]
    if split not in available:
        share = ", the hold-out a share of them" if holdout > 0 else ""
        hint = "" if layout.split_folders else \
            f" ({layout.describe()} has no split folders: its images are the train split{share})"
        given = f"{key} {split}" if key.startswith("--") else f"{key}={split!r}"
        raise DatasetError(f"{name}: {given} does not exist in {layout.root}; it has: "
                           f"{', '.join(available)}{hint}")


def holdout_count(n: int, fraction: float) -> int:
    """Images of a class of ``n`` that the hold-out takes: ``n * fraction`` rounded (halves up), at least 1 when
    ``n >= 2``,
    never all (a class keeps an image to learn from); 0 when ``fraction`` is 0 or ``n < 2``."""
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, int(n * fraction + 0.5)))


def holdout_mask(keys: Sequence[str], labels: Sequence[int], fraction: float) -> list[bool]:
    """Which samples the hold-out takes: per class, the ``holdout_count`` keys ranked first by SHA-256 of
    ``HOLDOUT_SALT + key`` (ties by key). ``keys`` are the samples' paths relative to the data's root."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    held = [False] * len(keys)
    for members in by_class.values():
        ranked = sorted(members, key=lambda i: (hashlib.sha256(HOLDOUT_SALT + keys[i].encode()).digest(), keys[i]))
        for i in ranked[:holdout_count(len(members), fraction)]:
            held[i] = True
    return held


def read_classes_file(path: str | Path) -> list[str]:
    """Class names, one a line (blank lines skipped): line k names label k."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"data.classes: {path} does not exist; give a text file of class names, one a line") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"data.classes: cannot read {path} as UTF-8 text ({e})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DatasetError(f"data.classes: {path} names no classes; write one class name a line")
    seen: dict[str, int] = {}
    for n, name in enumerate(names, 1):
        if name in seen:
            raise DatasetError(f"data.classes: {path} names {name!r} twice (entries {seen[name]} and {n})")
        seen[name] = n
    return names


def _labels_table(path: Path) -> list[tuple[int, list[str]]]:
    """The non-empty rows ``(line, fields)`` of a CSV of ``path,label[,split]`` without its header; one
    ``DatasetError`` for an unreadable table, rows of two or three fields mixed, or an empty field."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"imagefolder: cannot read {path} as UTF-8 text ({e})") from None
    try:
        table = list(csv.reader(text.splitlines()))
    except csv.Error as e:
        raise DatasetError(f"imagefolder: {path} is not a valid CSV table ({e})") from None
    rows: list[tuple[int, list[str]]] = []
    width = None
    for line, row in enumerate(table, 1):
        row = [field.strip() for field in row]
        if not any(row):
            continue
        if not rows and [f.lower() for f in row] in (["path", "label"], ["path", "label", "split"]):
            width = len(row)
            continue  # the header
        width = width or len(row)
        if len(row) != width or width not in (2, 3) or not all(row):
            fields = "path,label,split" if width == 3 else "path,label"
            raise DatasetError(f"imagefolder: {path}, line {line}: expected {width if width in (2, 3) else 2} "
                               f"fields {fields} (every row the same), found {','.join(row)!r}")
        rows.append((line, row))
    return rows


def _listed_file(csv_file: Path, written: str) -> Path:
    """The file a CSV row names: absolute, or relative to the CSV's folder."""
    file = Path(written).expanduser()
    return file if file.is_absolute() else csv_file.parent / file


def read_labels_csv(path: str | Path) -> list[tuple[str, Path, str, str | None]]:
    """The rows ``(path as written, file, label, split or None)`` of a CSV of ``path,label[,split]``; one
    ``DatasetError`` for an unreadable or empty table, a malformed row, a file listed twice, or listed files that
    do not exist."""
    path = Path(path).expanduser()
    rows, first, missing = [], {}, []
    for line, row in _labels_table(path):
        written, label, split = row[0], row[1], (row[2] if len(row) == 3 else None)
        if "\\" in written and not _listed_file(path, written).is_file() \
                and _listed_file(path, written.replace("\\", "/")).is_file():
            written = written.replace("\\", "/")  # written on Windows: its separators
        if written in first:
            raise DatasetError(f"imagefolder: {path}, line {line}: {written} is listed twice (first on line "
                               f"{first[written]}); give each image one row")
        first[written] = line
        file = _listed_file(path, written)
        if not file.is_file():
            missing.append(written)
        rows.append((written, file, label, split))
    if not rows:
        raise DatasetError(f"imagefolder: {path} has no rows; expected lines of path,label or path,label,split "
                           f"(paths relative to {path.parent})")
    if missing:
        header = rows[0][0] in missing and len(rows) > 1 and Path(rows[0][0]).suffix.lower() not in IMAGE_EXTENSIONS
        if header and missing == [rows[0][0]]:
            raise DatasetError(f"imagefolder: {path}: its first line ({rows[0][0]},{rows[0][2]}) looks like a header; "
                               "a header must be path,label or path,label,split (or leave it out)")
        drive = any(re.match(r"[A-Za-z]:[\\/]", w) for w in missing)
        raise DatasetError(f"imagefolder: {path}: {len(missing)} listed file(s) do not exist: {listed(missing)} "
                           f"(paths are relative to the CSV's folder, {path.parent}"
                           + ("; Windows paths with a drive letter: write them relative to the CSV's folder"
                              if drive else "")
                           + ("; its first line looks like a header: a header must be path,label[,split]"
                              if header else "") + ")")
    return rows


def _csv_samples(layout: Layout, split: str, names: list[str] | None, fixed: bool
                 ) -> tuple[list[tuple[Path, int]], list[str], list[str], list[str]]:
    """``(samples, classes, keys, unlisted)`` of a CSV's ``split`` (all rows without a split column); ``fixed``:
    ``names`` came from a class-list file."""
    rows = [(w, f, label) for w, f, label, s in read_labels_csv(layout.root) if s is None or s == split]
    found = sorted({label for _, _, label in rows})
    classes = names if names is not None else found
    index = {same_name(c): k for k, c in enumerate(classes)}
    unknown = [(w, label) for w, _, label in rows if same_name(label) not in index]
    if unknown and fixed:
        shown = ", ".join(f"{w} ({label})" for w, label in unknown[:3])
        raise DatasetError(f"imagefolder: {layout.root}: {len(unknown)} row(s) have a label that is not in the class "
                           f"list: {shown}; the classes are: {', '.join(classes)}")
    kept = [(w, f, label) for w, f, label in rows if same_name(label) in index]
    samples = [(f, index[same_name(label)]) for _, f, label in kept]
    keys = [same_name(Path(w).as_posix()) for w, _, _ in kept]
    return samples, classes, keys, sorted({label for _, label in unknown})


def load_images(root: str | Path | None, split: str, *, train_split: str = "train", eval_split: str | None = None,
                holdout: float = 0.1, classes: Sequence[str] | None = None, classes_file: str | Path | None = None,
                size: int = 224, crop_scale: tuple[float, float] | None = None, channels: int = 3
                ) -> ImageListDataset:
    """The images of ``split`` of ``root`` (any layout of the module docstring) as an :class:`ImageListDataset`.

    ``classes``: the training split's classes, to number an evaluation split's labels the same way (a class
    folder or label outside them is skipped, listed in ``unlisted``); else those of ``classes_file``, else the
    sorted names found, and a folder or label outside the class file is an error. ``split`` may be
    ``"holdout"``: the held-out share of ``train_split``; ``train_split`` itself leaves the hold-out out when
    there is one: always with class folders and a CSV (``holdout > 0``), with split folders only when
    ``eval_split`` is ``"holdout"``. The result's ``description`` says which images it holds.
    """
    if not 0 <= holdout < 1 or channels not in (1, 3, None) or (size is not None and size < 1):
        raise DatasetError(f"load_images: holdout must be in [0, 1) (got {holdout}), channels 1 or 3 (got {channels}), "
                           f"size at least 1 (got {size})")
    if not isinstance(split, str):
        raise DatasetError(f"load_images: split must be a split's name, such as 'train' or 'test', not {split!r}")
    layout = find_layout(root, train_split)
    split, train_split = split_folder(layout, split), split_folder(layout, train_split)
    eval_split = eval_split if eval_split is None else split_folder(layout, eval_split)
    key = "data.train_split" if classes is None else "data.eval_split"
    check_split(layout, split, holdout, key=key)
    fixed = classes is None and classes_file is not None
    names = list(classes) if classes is not None else read_classes_file(classes_file) if fixed else None
    base = train_split if split == HOLDOUT else split
    split_holdout = (holdout > 0 and (split == HOLDOUT or not layout.split_folders or eval_split == HOLDOUT)
                     and base == (train_split if layout.split_folders else "train"))
    if layout.kind in ("csv", "csv-splits"):
        samples, found, keys, unlisted = _csv_samples(layout, base, names, fixed)
        if not samples and unlisted and classes is not None:  # another model's classes
            raise DatasetError(f"imagefolder: none of the labels of {layout.root} ({', '.join(unlisted[:5])}"
                               f"{', ...' if len(unlisted) > 5 else ''}) is one of the model's classes "
                               f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); label the rows with "
                               "the class names it was trained on")
        ds = ImageListDataset(samples, found, root=layout.root, size=size, crop_scale=crop_scale, channels=channels)
        ds.unlisted = unlisted
    else:
        folder = layout.root / base if layout.kind == "splits" else layout.root
        ds = ImageFolderDataset(layout.root, split=base if layout.kind == "splits" else None, size=size,
                                classes=names, crop_scale=crop_scale, channels=channels)
        if fixed and ds.unlisted:
            raise DatasetError(f"imagefolder: class folder(s) {', '.join(ds.unlisted)} of {folder} are not in the "
                               f"class list {classes_file}; add them to it or move them out of {folder}")
        keys = [same_name(p.relative_to(folder).as_posix()) for p, _ in ds.samples]
    if classes is None:  # the training split: what the layout leaves out is said once
        ds.stray = stray_images(layout, base)
    where = f"{layout.root} ({layout.describe()})"
    if not split_holdout:
        ds.description = f"{where}: {split} = {len(ds)} images"
        return ds
    held = holdout_mask(keys, [label for _, label in ds.samples], holdout)
    want = split == HOLDOUT
    n_held = sum(held)
    total = len(ds)
    ds.samples = [s for s, h in zip(ds.samples, held) if h == want]
    ds.counts = [0] * len(ds.classes)
    for _, label in ds.samples:
        ds.counts[label] += 1
    ds.description = (f"{where}: {total - n_held} {base} / {n_held} {HOLDOUT} images (data.holdout={holdout:g} of "
                      "each class, chosen by a fixed hash of each file's path: the same in every run)")
    if not ds.samples:
        raise DatasetError(f"imagefolder: the {split} split of {where} has no images: with data.holdout={holdout:g} "
                           "every class keeps its images for training (a class needs 2 or more to give one); add "
                           "images, or set data.eval_split to a split that exists")
    return ds
