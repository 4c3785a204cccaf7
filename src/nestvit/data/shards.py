"""WebDataset tar shards, for data sets that outgrow a folder: streamed, split across DDP ranks and DataLoader workers.

``data.name=webdataset`` reads ``data.root``: a folder of shards ``root/*.tar`` (the train split; the
hold-out is a share of it), split folders of shards ``root/<split>/*.tar``, or one ``.tar`` file
(``.tar.gz`` / ``.tgz`` also read). A sample is the files of a shard that share a name up to the first dot
(WebDataset's rule): ``key.jpg`` (or ``.png``, ``.webp``, ...) and ``key.cls``, the label: an integer
(class names ``0``..``K-1``, or the names of ``data.classes``, line k naming label k) or a class name.
Tar parsing and grouping (``tar_file_expander``, ``group_by_keys``) and the shuffle buffer are the
``webdataset`` package's (imported here only; it needs neither torchvision nor another torch: ``pip install
webdataset``); which shards each rank and worker reads, the epoch length and the order are nestvit's.

When a split is opened its shards' headers are scanned (the image bytes are skipped, only the tiny ``.cls``
files are read): the scan counts the samples (the epoch's length: every rank takes the same number of steps,
as DDP needs), gives the labels (class checks, the per-class hold-out of ``nestvit.data.folders``) and names
a shard that is not a tar file or a sample without an image or label. A shard's scan is kept in an index
(``$NESTVIT_CACHE_DIR`` or ``~/.cache/nestvit``, ``shard_index/``, keyed by the shard's path, size and
modification time), so later runs, evaluations and ranks read it instead of the shard; a shard rewritten in
place is scanned again. Where the index cannot be written, every run scans.

Order of a training epoch (``ShardEpoch``): the shards are shuffled by ``(seed, epoch)``; with ``W`` ranks and
``K`` workers each, stream ``v`` of rank ``r`` reads shards ``r * K + v``, ``+ W * K``, ... (with fewer shards than
``W * K`` streams, every stream reads every shard and keeps every ``W * K``-th sample), through a
``SHUFFLE_BUFFER``-sample shuffle seeded by ``(seed, epoch, stream)``, cycling through its shards again if
they run out before its share of the epoch (``steps_per_epoch * batch / K`` samples). Stream ``v`` makes the
rank's batches of steps ``v``, ``v + K``, ...; a run resumed mid-epoch skips the samples of the steps done
without decoding them, so it sees the batches the uninterrupted run would have seen (with the same world
size and workers). Evaluation (``ShardPass``) reads every sample once over all ranks and workers.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..fileio import atomic_write_text, cache_home
from .datasets import IMAGE_EXTENSIONS, DatasetError, decode_image, random_crop_box
from .folders import HOLDOUT, SPLIT_NAMES, Layout, check_split, holdout_mask, read_classes_file

__all__ = ["SHUFFLE_BUFFER", "ShardEpoch", "ShardPass", "ShardSet", "find_shard_layout", "load_shards", "scan_shard",
           "scan_shard_indexed", "shard_index_dir"]

SHUFFLE_BUFFER = 1000  # samples (encoded) each stream holds to shuffle across shard boundaries
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members (skipped, as it does)
LAYOUTS = "root/*.tar (tar shards), root/<split>/*.tar or one .tar file"


def _wds() -> Any:
    try:
        import webdataset
    except ImportError:
        raise DatasetError("data.name=webdataset needs the webdataset package: pip install webdataset "
                           "(the extra nestvit[shards])") from None
    return webdataset


def _is_shard(path: Path) -> bool:
    return path.name.lower().endswith(SHARD_SUFFIXES) and path.is_file()


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_shard(p))


def holds_shards(root: str | Path) -> bool:
    """Whether ``root`` is a tar shard, or a folder of them (or of split folders of them)."""
    path = Path(root).expanduser()
    if path.is_file():
        return _is_shard(path)
    if not path.is_dir():
        return False
    splits = (d for d in path.iterdir() if d.is_dir() and d.name.lower() in SPLIT_NAMES)
    return any(_is_shard(p) for p in path.iterdir()) or any(any(_is_shard(p) for p in d.iterdir()) for d in splits)


def find_shard_layout(root: str | Path | None) -> tuple[Layout, dict[str, list[Path]]]:
    """``(layout, shards of each split)`` of ``root``, or one ``DatasetError`` saying what was expected."""
    if root is None:
        raise DatasetError(f"webdataset: data.root is required: {LAYOUTS}")
    path = Path(root).expanduser()
    if path.is_file():
        if not _is_shard(path):
            raise DatasetError(f"webdataset: {path} is not a tar shard ({', '.join(SHARD_SUFFIXES)}); data.root "
                               f"must be {LAYOUTS}")
        return Layout(path, "shards", ("train",)), {"train": [path]}
    if not path.is_dir():
        raise DatasetError(f"webdataset: {path} does not exist; data.root must be {LAYOUTS}")
    files = _shards(path)
    dirs = {d.name: _shards(d) for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    dirs = {name: shards for name, shards in dirs.items() if shards}
    if files and dirs:
        raise DatasetError(f"webdataset: {path} holds both shards and split folders of shards ({', '.join(dirs)}); "
                           "put the loose shards in a split folder (e.g. train/)")
    if files:
        return Layout(path, "shards", ("train",)), {"train": files}
    if dirs:
        return Layout(path, "shard-splits", tuple(dirs)), dirs
    raise DatasetError(f"webdataset: no tar shards ({', '.join(SHARD_SUFFIXES)}) in {path} or its folders; "
                       f"expected {LAYOUTS}")


def _base_plus_ext(name: str) -> tuple[str | None, str | None]:
    return _wds().tariterators.base_plus_ext(name)


def scan_shard(path: Path) -> list[tuple[str, str]]:
    """``(key, label text)`` of every sample of a shard, in order, reading only the headers and ``.cls`` files."""
    samples: list[tuple[str, str]] = []
    current: dict[str, Any] = {}

    def finish() -> None:
        if not current:
            return
        key, found = current["key"], current["suffixes"]
        if not current["image"] or current["label"] is None:
            lacks = " and ".join(w for w, ok in (("an image (.jpg, .png, ...)", current["image"]),
                                                ("a label (.cls)", current["label"] is not None)) if not ok)
            raise DatasetError(f"webdataset: {path}: sample {key!r} lacks {lacks} (found "
                               f"{', '.join('.' + s for s in found)}); a sample is files sharing a name: key.jpg + "
                               "key.cls")
        samples.append((key, current["label"]))

    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isreg() or _META.match(member.name):
                    continue
                key, suffix = _base_plus_ext(member.name)
                if key is None:
                    continue
                suffix = suffix.lower()
                if current.get("key") != key:
                    finish()
                    current.clear()
                    current.update(key=key, suffixes=[], image=False, label=None)
                current["suffixes"].append(suffix)
                if suffix in IMAGE_KEYS:
                    current["image"] = True
                elif suffix == "cls":
                    raw = tar.extractfile(member).read()
                    try:
                        current["label"] = raw.decode("utf-8").strip()
                    except UnicodeDecodeError:
                        raise DatasetError(f"webdataset: {path}: {member.name} is not UTF-8 text; a .cls file holds "
                                           "a class index or name") from None
                    if not current["label"]:
                        raise DatasetError(f"webdataset: {path}: {member.name} is empty; a .cls file holds a class "
                                           "index or name")
            finish()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"webdataset: {path}: not a readable tar shard ({e}); rewrite it") from None
    return samples


def shard_index_dir() -> Path:
    """Where shard scans are kept: ``shard_index/`` of nestvit's cache (``~/.cache/nestvit`` or
    ``$NESTVIT_CACHE_DIR``)."""
    return cache_home() / "shard_index"


def scan_shard_indexed(path: Path) -> list[tuple[str, str]]:
    """:func:`scan_shard`, read from the index when this shard (same path, size and mtime) was scanned before."""
    st = path.stat()
    ident = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = shard_index_dir() / (hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(entry.read_text())
        if saved.get("shard") == ident:
            return [(str(k), str(v)) for k, v in saved["samples"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not indexed yet, or an unreadable entry: scan
    samples = scan_shard(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(entry, json.dumps({"shard": ident, "samples": samples}))
    except OSError:
        pass  # a read-only home: scan every time
    return samples


def _as_index(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def _labels(raws: Sequence[str], names: list[str] | None) -> tuple[list[str], dict[str, int]]:
    """``(classes, label text -> index)``: with ``names``, a text is one of them or an index into them (texts
    that are neither are left out of the map); without, all-integer texts are indices (classes ``0``..``max``),
    else the texts are class names (sorted)."""
    distinct = sorted(set(raws))
    if names is not None:
        index = {n: k for k, n in enumerate(names)}
        mapping = {}
        for raw in distinct:
            k = index.get(raw, _as_index(raw))
            if k is not None and k < len(names):
                mapping[raw] = k
        return names, mapping
    ints = {raw: _as_index(raw) for raw in distinct}
    if all(v is not None for v in ints.values()):
        return [str(k) for k in range(max(ints.values()) + 1)], ints  # type: ignore[type-var]
    return distinct, {raw: k for k, raw in enumerate(distinct)}


class ShardSet:
    """The samples of one split of tar shards: what was scanned (ids, labels, classes) and how to stream them.

    ``ids`` are ``<shard path relative to the split's folder>/<key>``; ``keep`` / ``drop`` (sets of ids, or
    None) select the samples of a hold-out or a limit. ``len()`` counts the selected samples; ``counts`` the
    selected images of each class. Images decode as :class:`nestvit.data.ImageListDataset`'s do.
    """

    def __init__(self, root: Path, shards: list[Path], rels: list[str], ids: list[str], labels: list[int],
                 classes: list[str], mapping: dict[str, int], *, size: int, crop_scale: tuple[float, float] | None,
                 channels: int = 3):
        self.root, self.shards, self.classes, self.mapping = root, shards, classes, mapping
        self.channels = channels
        self.rel = {str(p): r for p, r in zip(shards, rels)}
        self.ids, self.labels = ids, labels
        self.keep: frozenset[str] | None = None
        self.drop: frozenset[str] = frozenset()
        self.size, self.resize_size, self.crop_scale = size, round(size / 0.875), crop_scale
        self.exif_orientation = True  # turn images upright as their EXIF tag says (an older model's eval: as stored)
        self.interpolation = "bilinear"  # the centre crop's resize filter (a model's eval: its contract's)
        self.unlisted: list[str] = []
        self.description = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def select(self, mask: Sequence[bool]) -> None:
        """Keep the samples where ``mask`` (over the currently selected ones) is true."""
        kept = [i for i, m in zip(self.ids, mask) if m]
        dropped = [i for i, m in zip(self.ids, mask) if not m]
        if len(kept) <= len(dropped):
            self.keep = frozenset(kept)
        else:
            self.drop = self.drop | frozenset(dropped)
        self.labels = [label for label, m in zip(self.labels, mask) if m]
        self.ids = kept

    def accepts(self, sample_id: str) -> bool:
        return (self.keep is None or sample_id in self.keep) and sample_id not in self.drop

    def _read(self, shards: Sequence[Path]) -> Iterator[dict[str, Any]]:
        """The samples of ``shards`` in order, as WebDataset groups them (``__key__``, ``__url__``, suffix: bytes)."""
        wds = _wds()

        def opened() -> Iterator[dict[str, Any]]:
            for path in shards:
                with open(path, "rb") as stream:
                    yield {"url": str(path), "stream": stream}

        try:
            yield from wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(opened()))
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            raise DatasetError(f"webdataset: cannot read the shards of {self.root} ({e}); rewrite the shard") from None

    def stream(self, part: int, parts: int, *, seed: str | None, cycle: bool) -> Iterator[dict[str, Any]]:
        """The selected samples of stream ``part`` of ``parts`` (see the module docstring); ``seed`` None: in order,
        unshuffled; ``cycle``: start over (reshuffled) when the shards run out, for ever."""
        for pass_no in itertools.count():
            order = list(self.shards)
            if seed is not None:
                random.Random(f"{seed}:{pass_no}").shuffle(order)  # the same order in every stream
            every = len(order) < parts
            samples = (s for s in self._read(order if every else order[part::parts])
                       if self.accepts(f"{self.rel[s['__url__']]}/{s['__key__']}"))
            if every:
                samples = (s for i, s in enumerate(samples) if i % parts == part)
            if seed is not None:
                samples = _wds().shuffle(SHUFFLE_BUFFER, initial=SHUFFLE_BUFFER,
                                         rng=random.Random(f"{seed}:{part}:{pass_no}"))(samples)
            n = 0
            for sample in samples:
                n += 1
                yield sample
            if not cycle:
                return
            if n == 0:
                raise DatasetError(f"webdataset: stream {part} of {parts} of {self.root} holds no samples; use fewer "
                                   "data.workers or more shards")

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """``(uint8 channels x size x size image, label)`` of a streamed sample."""
        where = f"{sample['__url__']}:{sample['__key__']}"
        suffix = next(s for s in IMAGE_KEYS if s in sample)
        label = self.mapping[sample["cls"].decode("utf-8").strip()]
        box = (lambda w, h: random_crop_box(w, h, self.crop_scale)) if self.crop_scale else None
        return decode_image(io.BytesIO(sample[suffix]), size=self.size, resize_size=self.resize_size, crop_box=box,
                            name=f"{where}.{suffix}", channels=self.channels,
                            exif_orientation=self.exif_orientation, interpolation=self.interpolation), label

    def collate(self, samples: Sequence[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        decoded = [self.decode(s) for s in samples]
        return torch.stack([d[0] for d in decoded]), torch.tensor([d[1] for d in decoded], dtype=torch.int64)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardEpoch(IterableDataset):
    """Rank ``rank``'s batches of ``batch`` images for steps ``start_step..steps - 1`` of ``epoch`` (see the module
    docstring for the order)."""

    def __init__(self, data: ShardSet, *, seed: int, epoch: int, rank: int, world_size: int, batch: int, steps: int,
                 start_step: int = 0) -> None:
        self.data, self.seed, self.epoch, self.rank, self.world_size = data, seed, epoch, rank, world_size
        self.batch, self.steps, self.start_step = batch, steps, start_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        v = (worker + self.start_step) % workers  # DataLoader asks worker 0 first: it plays the stream of that step
        skip, todo = len(range(v, self.start_step, workers)), len(range(v, self.steps, workers))
        if todo <= skip:
            return
        samples = self.data.stream(self.rank * workers + v, self.world_size * workers,
                                   seed=f"{self.seed}:{self.epoch}", cycle=True)
        for _ in range(skip * self.batch):  # the steps done before a resume: read, not decoded
            next(samples)
        for _ in range(todo - skip):
            yield self.data.collate([next(samples) for _ in range(self.batch)])


class ShardPass(IterableDataset):
    """Rank ``rank``'s share of every selected sample once, in batches of at most ``batch`` (evaluation)."""

    def __init__(self, data: ShardSet, *, rank: int, world_size: int, batch: int) -> None:
        self.data, self.rank, self.world_size, self.batch = data, rank, world_size, batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        samples = self.data.stream(self.rank * workers + worker, self.world_size * workers, seed=None, cycle=False)
        while chunk := list(itertools.islice(samples, self.batch)):
            yield self.data.collate(chunk)


def load_shards(root: str | Path | None, split: str, *, train_split: str = "train", eval_split: str | None = None,
                holdout: float = 0.1, classes: Sequence[str] | None = None, classes_file: str | Path | None = None,
                size: int = 224, crop_scale: tuple[float, float] | None = None, channels: int = 3) -> ShardSet:
    """The samples of ``split`` of the shards in ``root``; arguments as :func:`nestvit.data.folders.load_images`
    (``holdout``: the same per-class rule over the samples' ids)."""
    _wds()
    layout, splits = find_shard_layout(root)
    fixed = classes is None and classes_file is not None
    check_split(layout, split, holdout, key="data.train_split" if classes is None else "data.eval_split",
                name="webdataset")
    base = train_split if split == HOLDOUT else split
    shards = splits[base]
    folder = layout.root if layout.root.is_dir() and layout.kind == "shards" else \
        layout.root.parent if layout.root.is_file() else layout.root / base
    rels = [p.relative_to(folder).as_posix() for p in shards]
    ids, raws = [], []
    for path, rel in zip(shards, rels):
        for key, raw in scan_shard_indexed(path):
            ids.append(f"{rel}/{key}")
            raws.append(raw)
    where = f"{layout.root} ({layout.describe()})"
    if not ids:
        raise DatasetError(f"webdataset: the {base} shards of {where} hold no samples")
    names = list(classes) if classes is not None else read_classes_file(classes_file) if fixed else None
    found, mapping = _labels(raws, names)
    unknown = sorted({raw for raw in raws if raw not in mapping})
    if unknown and classes is None:
        raise DatasetError(f"webdataset: {where}: label(s) {', '.join(unknown[:5])} of the .cls files are not in the "
                           f"class list {classes_file} ({len(found)} classes; an integer label indexes it)")
    data = ShardSet(layout.root, shards, rels, ids, [mapping.get(r, -1) for r in raws], found, mapping, size=size,
                    crop_scale=crop_scale, channels=channels)
    if unknown:
        data.unlisted = unknown
        data.select([label >= 0 for label in data.labels])
    split_holdout = (holdout > 0 and (split == HOLDOUT or layout.kind == "shards" or eval_split == HOLDOUT)
                     and base == ("train" if layout.kind == "shards" else train_split))
    if not split_holdout:
        data.description = f"{where}: {split} = {len(data)} samples in {len(shards)} shard(s)"
        return data
    held = holdout_mask(data.ids, data.labels, holdout)
    total, n_held = len(held), sum(held)
    data.select([h == (split == HOLDOUT) for h in held])
    data.description = (f"{where}: {total - n_held} {base} / {n_held} {HOLDOUT} samples in {len(shards)} shard(s) "
                        f"(data.holdout={holdout:g} of each class, chosen by a fixed hash of each sample's shard and "
                        "key: the same in every run)")
    if not len(data):
        raise DatasetError(f"webdataset: the {split} split of {where} has no samples: with data.holdout={holdout:g} "
                           "every class keeps its samples for training; add samples or set data.eval_split")
    return data
