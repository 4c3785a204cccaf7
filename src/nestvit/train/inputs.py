"""The input pipeline of training: which images each rank sees at each step, as uint8 on the device.

Small data sets (``nestvit.data.load_dataset``) are held whole in memory as uint8 tensors, moved once
to the training device and batched by indexing with a permutation; augmentation then runs on the
device (``nestvit.data.augment.BatchAugment``), so no worker processes are needed. ImageNet-style
folders stream through a ``DataLoader`` (decode + resize + centre crop in ``workers`` processes)
with the same per-step index lists; tar shards (``webdataset``) stream in the order of
``nestvit.data.shards`` (split across ranks and workers by shard), with the same number of steps.

Defaults left open in the config are filled by :func:`resolve_data` before anything loads: the image
size of folders and shards from the model, the evaluation split from what exists (``val``, then ``test``,
else the hold-out), the channels of folders from their images (greyscale files: 1) and, when fine-tuning a
run on images of its channel count, the normalisation from its run contract; ``data.workers`` by
:func:`default_workers` when the loaders start.

Order: epoch ``e`` uses ``torch.randperm(N)`` from a CPU generator seeded with ``(seed, e)``; global
step ``s`` of the epoch takes ``perm[s * G:(s + 1) * G]`` (``G`` the global batch; the last partial
batch is dropped) and rank ``r`` its ``r``-th contiguous share. The order is therefore a pure
function of ``(seed, epoch, step)``: a resumed run continues mid-epoch without saved sampler state,
and one process with batch ``G`` sees exactly the images that ``W`` processes see together.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.datasets import (
    DATASETS,
    DatasetError,
    ImageListDataset,
    load_dataset,
    pixel_moments,
    resize_images,
    same_name,
)
from ..data.folders import HOLDOUT, default_eval_split, find_layout, holds_image_folders, load_images
from ..data.shards import ShardEpoch, ShardPass, ShardSet, find_shard_layout, load_shards
from ..errors import listed
from .config import ConfigError, DataSection, ModelSection
from .interrupt import leave_signals_to_the_trainer, starting_workers

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEW_IMAGES = 5  # an image-folder class of the training split with fewer images than this is warned about


@dataclass
class Split:
    """One split of a data set: in memory (``images``) or read from disk (``folder`` or ``stream``)."""

    name: str
    labels: torch.Tensor  # (N,) int64 on the CPU
    classes: list[str]
    channels: int
    size: tuple[int, int]  # (H, W) of the images the model sees
    images: torch.Tensor | None = None  # (N, C, H, W) uint8, on the training device
    folder: ImageListDataset | None = None  # image files, decoded by DataLoader workers
    stream: ShardSet | None = None  # tar shards (nestvit.data.shards), streamed
    unpadded: tuple[int, int] | None = None  # (H, W) of the images before data.pad_to (after data.resize_to)
    notes: list[str] = field(default_factory=list)  # warnings about the data, printed when the run starts
    about: str = ""  # where images read from disk come from: the layout, the hold-out (printed when the run starts)

    def __len__(self) -> int:
        return len(self.labels)


def _pad(images: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """Zero-pad ``(N, C, H, W)`` to ``pad_to`` x ``pad_to``, the image centred."""
    if pad_to is None:
        return images
    h, w = images.shape[-2:]
    if pad_to < max(h, w):
        raise ValueError(f"data.pad_to={pad_to} is smaller than the {h}x{w} images")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))


def synthetic(split: str, *, size: int, count: int, channels: int = 1, num_classes: int = 10) -> tuple[
        torch.Tensor, torch.Tensor]:
    """A learnable stand-in data set (tests, benchmarks, CI without downloads): class ``k`` is a bright
    square at the ``k``-th cell of a grid over the image, on uniform noise. Deterministic per split."""
    gen = torch.Generator().manual_seed({"train": 1, "test": 2}.get(split, 3))
    labels = torch.randint(0, num_classes, (count,), generator=gen)
    images = torch.randint(0, 96, (count, channels, size, size), generator=gen, dtype=torch.uint8)
    cells = math.ceil(math.sqrt(num_classes))
    cell = size // cells
    for k in range(num_classes):
        r, c = divmod(k, cells)
        images[labels == k, :, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 255
    return images, labels


def default_workers() -> int:
    """DataLoader processes when ``data.workers`` is not given: ``min(4, cores - 1)`` (0 on one core).

    The cores are those this process may run on (its CPU affinity, which container limits set). Decoding in
    the training process is single-threaded: while Pillow decodes, the other cores that torch's threads use
    for the model wait. A worker decodes while the model computes, so on 2 cores one worker keeps both busy;
    measured on the project's 2-core VM (640 JPEGs of 1280x960 resized to 32x32, ``mnist5k_nest``'s model,
    one epoch, 4 runs each, alternating, on a machine shared with other work): 17.7-32.8 s with one worker
    against 19.6-32.2 s without (means 23.6 s and 26.3 s; the input pipeline alone 600-840 against 310-370
    images/s); starting a worker costs about 0.06 s an epoch. More than 4 rarely pays for small models.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(4, cores - 1))


def model_img_size(model: ModelSection | None) -> int:
    """The square input size of ``model``, what folders and shards are resized to when ``data.img_size`` is not
    given: its ``img_size`` override, else that of its ``weights`` (their run contract), else the registered
    model's default; 224 without a model."""
    if model is None:
        return 224
    size = model.overrides.get("img_size")
    if size is None and model.weights is not None:
        from ..contract import read_contract

        try:
            contract = read_contract(model.weights)
            size = contract.transform.size if contract.transform is not None else contract.kwargs.get("img_size")
        except Exception:  # noqa: BLE001 (weights without a contract, e.g. timm's: the model's default below)
            size = None
    if size is None:
        if model.name is None:
            return 224
        from ..registry import create_model

        kwargs = {k: v for k, v in model.overrides.items() if k != "num_classes"}
        try:
            with torch.device("meta"):  # only its size is needed
                size = create_model(model.name, **kwargs).img_size
        except Exception:  # noqa: BLE001 (a model that does not build says why when the run builds it)
            return 224
    if isinstance(size, int):
        return size
    h, w = size
    if h != w:
        raise ConfigError(f"model {model.name} takes {h}x{w} images but folders and shards give square ones; "
                          "set data.img_size (and model.overrides.img_size to the same square size)")
    return int(h)


def is_streamed(name: str) -> bool:
    """Whether data set ``name`` is read from image files as it trains (``imagefolder``, ``webdataset``), not held
    in memory."""
    return name in DATASETS and not DATASETS[name].in_memory


def resolve_data(cfg: DataSection, model: ModelSection | None = None) -> DataSection:
    """``cfg`` with ``root`` made absolute and the defaults it leaves open filled: ``img_size`` (folders, shards,
    synthetic) from ``model``, ``eval_split`` from what the data has (in-memory sets: ``test``), ``channels``
    (folders: 1 for greyscale files, else 3; shards: 3), ``mean``/``std`` from published weights
    (``model.weights`` a tag of ``nestvit pretrained``) or, for folders and shards, from the run contract of
    ``model.weights`` when its channel count is the data's (the normalisation the weights learnt). ``workers``
    stays as it is (:func:`default_workers` when the loaders start: a resumed run on another machine uses that
    machine's)."""
    from ..pretrained import published as published_file

    changes: dict[str, object] = {}
    streamed = is_streamed(cfg.name)
    if cfg.root is not None and cfg.name != "synthetic":  # recorded absolute: eval and resume work from any folder
        root = str(Path(cfg.root).expanduser().absolute())
        if root != cfg.root:
            cfg = dataclasses.replace(cfg, root=root)
            changes["root"] = root
    published = published_file(model.weights) if model is not None else None
    if cfg.img_size is None and (streamed or cfg.name == "synthetic"):
        changes["img_size"] = model_img_size(model)
    if cfg.eval_split is None:
        if cfg.name == "imagefolder":
            changes["eval_split"] = default_eval_split(find_layout(cfg.root, cfg.train_split), cfg.train_split,
                                                       cfg.holdout)
        elif cfg.name == "webdataset":
            changes["eval_split"] = default_eval_split(find_shard_layout(cfg.root)[0], cfg.train_split, cfg.holdout,
                                                       name="webdataset")
        else:
            changes["eval_split"] = "test"
    if cfg.channels is None and streamed:  # a normalisation of the recipe's own fixes them; else the files do
        changes["channels"] = (len(cfg.mean) if cfg.mean is not None and len(cfg.mean) in (1, 3) else
                               folder_channels(dataclasses.replace(cfg, **changes)) if cfg.name == "imagefolder"
                               else 3)
    if cfg.mean is None and cfg.std is None:  # the normalisation the weights learnt, for the same channel count
        learnt = ((published.mean, published.std) if published is not None
                  else _learnt_normalization(model.weights) if streamed and model is not None and model.weights
                  else None)
        channels = changes.get("channels", cfg.channels)
        if learnt is not None and (channels is None or len(learnt[0]) == channels):
            changes.update(mean=tuple(learnt[0]), std=tuple(learnt[1]))
    return dataclasses.replace(cfg, **changes) if changes else cfg


def folder_channels(cfg: DataSection) -> int:
    """1 when the image folder's training images are greyscale files, else 3 (:func:`image_channels`)."""
    from ..data.datasets import image_channels

    files = load_images(cfg.root, cfg.train_split, train_split=cfg.train_split, eval_split=cfg.eval_split,
                        holdout=cfg.holdout, classes_file=cfg.classes).samples
    return image_channels([path for path, _ in files])


def _learnt_normalization(weights: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The ``(mean, std)`` of a nestvit run's contract (the normalisation its weights learnt); None for weights
    without one (timm's or ``torch.save`` files: the data's defaults then)."""
    from ..contract import read_contract

    try:
        t = read_contract(weights).transform
    except Exception:  # noqa: BLE001 (no contract: the data's defaults)
        return None
    return None if t is None else (tuple(t.mean), tuple(t.std))


def load_split(cfg: DataSection, split: str | None, device: torch.device, *, classes: list[str] | None = None,
               limit: int | None = None, model_classes: bool = False) -> Split:
    """Load ``split`` of ``cfg.name`` (None: the evaluation split); in-memory sets go to ``device`` as uint8.

    ``classes`` (the training split's; with ``model_classes``, a trained model's: ``nestvit eval``) numbers an
    evaluation split's labels as the training split's.
    ``synthetic`` (not a real data set) makes ``limit`` images (default 512) of ``img_size`` pixels.
    Defaults ``cfg`` leaves open are filled by :func:`resolve_data` (without a model: 224 pixels).
    """
    streamed = is_streamed(cfg.name)
    if streamed and (cfg.resize_to is not None or cfg.pad_to is not None):
        keys = [f"data.{k}={v}" for k, v in (("resize_to", cfg.resize_to), ("pad_to", cfg.pad_to)) if v is not None]
        unset = " ".join(f"--set {k.split('=')[0]}=null" for k in keys)
        raise ValueError(f"{' and '.join(keys)} (a recipe's sizing of its built-in data set) "
                         f"{'applies' if len(keys) == 1 else 'apply'} to in-memory data sets; {cfg.name} images are "
                         f"resized to data.img_size instead: add {unset} (and set data.img_size for another size than "
                         "the model's)")
    if not streamed and cfg.root is not None and cfg.name != "synthetic" \
            and not (Path(cfg.root).expanduser() / cfg.name).exists() and holds_image_folders(cfg.root):
        what = "a built-in data set that does not read them" if cfg.name in DATASETS else "no data set nestvit knows"
        raise ValueError(f"data.root={cfg.root} holds image files in folders, but data.name={cfg.name} is {what}; "
                         "for your own images set data.name=imagefolder"
                         + (" (and data.pad_to=null)" if cfg.pad_to is not None else ""))
    if not streamed and cfg.channels is not None and cfg.name != "synthetic":
        raise ValueError(f"data.channels applies to image folders and shards; {cfg.name} images have their own "
                         "channel count: leave data.channels unset")
    cfg = resolve_data(cfg)
    split = cfg.eval_split if split is None else split
    if cfg.name == "synthetic":
        images, labels = synthetic(split, size=cfg.img_size, count=limit or 512)
        images = resize_images(images, cfg.resize_to)
        unpadded = tuple(images.shape[-2:])
        images = _pad(images, cfg.pad_to)
        return Split(name=f"synthetic:{split}", labels=labels, classes=[f"class{k}" for k in range(10)],
                     channels=1, size=tuple(images.shape[-2:]), images=images.to(device), unpadded=unpadded)
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {cfg.name!r}; known: {', '.join(DATASETS)}, synthetic; your own images: "
                         "imagefolder with data.root=FOLDER (nestvit eval: --data FOLDER)")
    if streamed:
        crop = (cfg.random_resized_crop, 1.0) if split == cfg.train_split and cfg.random_resized_crop else None
        load = load_images if cfg.name == "imagefolder" else load_shards
        data = load(cfg.root, split, train_split=cfg.train_split, eval_split=cfg.eval_split, holdout=cfg.holdout,
                    classes=classes, classes_file=cfg.classes, size=cfg.img_size, crop_scale=crop,
                    channels=cfg.channels)
        notes = _class_notes(data, split, training=classes is None, model_classes=model_classes)
        if limit is not None and limit < len(data):
            if isinstance(data, ImageListDataset):
                data.samples = data.samples[:limit]
            else:
                data.select([i < limit for i in range(len(data))])
        labels = torch.tensor([label for _, label in data.samples] if isinstance(data, ImageListDataset)
                              else data.labels, dtype=torch.int64)
        folder = data if isinstance(data, ImageListDataset) else None
        return Split(name=f"{cfg.name}:{split}", labels=labels, classes=list(data.classes), channels=cfg.channels,
                     size=(cfg.img_size, cfg.img_size), folder=folder, stream=data if folder is None else None,
                     notes=notes, about=data.description)
    ds = load_dataset(cfg.name, root=cfg.root, split=split, download=cfg.download)
    images, labels = ds.images, ds.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = resize_images(images, cfg.resize_to)
    unpadded = tuple(images.shape[-2:])
    images = _pad(images, cfg.pad_to)
    return Split(name=ds.name, labels=labels, classes=list(ds.classes), channels=images.shape[1],
                 size=tuple(images.shape[-2:]), images=images.to(device), unpadded=unpadded)


def _class_notes(data: ImageListDataset | ShardSet, split: str, *, training: bool,
                 model_classes: bool = False) -> list[str]:
    """Check the classes of images read from disk: warnings to print, or a ``DatasetError`` for an empty
    training class.

    A class of the training split without images is an error, not a warning: it would still get an output of
    the model, a label that no image has, which training only learns to never predict (and the evaluation then
    counts its images as misses); the fix is to add images or remove the class. A training class with fewer
    than ``FEW_IMAGES`` images is a warning, as are the classes of an evaluation split (``training=False``: its
    classes are the training split's) that differ from the training split's: a training class it has no images
    of (its accuracy is undefined), a class the training split does not have (its images are skipped). With
    ``model_classes`` (``nestvit eval`` of a trained model) they are said against the model's classes.
    """
    counts = dict(zip(data.classes, data.counts))
    empty = [c for c, n in counts.items() if n == 0]
    folders = isinstance(data, ImageListDataset) and data.root.is_dir()
    if training and len(data.classes) < 2:
        found = f"one class, {data.classes[0]!r}," if data.classes else "no class"
        inside = (f" (if the class folders are inside {data.root / data.classes[0]}, set data.root to it)"
                  if folders and data.classes and (data.root / data.classes[0]).is_dir() else "")
        raise DatasetError(f"{data.root}: {found} in the training split; a classifier needs two or more classes to "
                           f"tell apart{inside}")
    what = ("class director" + ("ies" if len(empty) > 1 else "y")) if folders else \
        ("class" + ("es" if len(empty) > 1 else ""))
    present = {same_name(p.name) for p in data.root.iterdir() if p.is_dir()} if folders and empty else set()
    absent = [c for c in empty if folders and same_name(c) not in present]
    if absent and training:  # named by data.classes only
        es, have, them = ("es", "have", "them") if len(absent) > 1 else ("", "has", "it")
        raise DatasetError(f"imagefolder: class{es} {', '.join(absent)} of the class list (data.classes) {have} no "
                           f"folder in {data.root}; add a folder of images for {them} or remove {them} from the "
                           "class list")
    if empty and training:
        raise DatasetError(f"{'imagefolder' if isinstance(data, ImageListDataset) else 'webdataset'}: {what} "
                           f"{', '.join(empty)} of {data.root} {'have' if len(empty) > 1 else 'has'} no images; a "
                           "class without images cannot be learnt: add images or remove "
                           f"{'the directory' if folders else 'it from the class list'}")
    notes = []
    if not training:
        theirs, owner, lacking = (("the model's", "the model's", "that the model does not have") if model_classes
                                  else ("the training split's", "the training", "not in the training split"))
        differ = ([f"no images of {owner} class(es) {listed(empty, 5)} (their accuracy is n/a)"] if empty else []) \
            + ([f"class(es) {listed(data.unlisted, 5)} {lacking} (their images are skipped)"] if data.unlisted else [])
        fix = ("a class needs 2 or more images to have one held out: add images" if split == HOLDOUT else
               "the scores cover the other classes" if model_classes else "give both splits the same classes")
        where = str(data.root) if model_classes else f"the {split} split of {data.root}"
        if differ:
            notes.append(f"warning: {where}: its classes differ from {theirs}: {'; '.join(differ)}; {fix}")
    if training:
        notes += getattr(data, "stray", [])
    numbers = [c for c in data.classes if c.isdecimal() and c.isascii()]
    if training and len(numbers) == len(data.classes) and numbers != sorted(numbers, key=int) \
            and isinstance(data, ImageListDataset):  # shards number integer labels themselves
        notes.append(f"note: the class names are numbers, sorted as text (as torchvision's ImageFolder sorts them): "
                     f"outputs 0, 1, 2, ... are classes {', '.join(numbers[:6])}{', ...' if len(numbers) > 6 else ''}"
                     "; a class list (data.classes, one name a line) fixes another order")
    few = [f"{c} ({n})" for c, n in counts.items() if 0 < n < FEW_IMAGES]
    if few and training:
        notes.append(f"warning: {data.root}: class(es) with fewer than {FEW_IMAGES} images: "
                     f"{', '.join(few)}; the model will hardly learn them: add images")
    return notes


def normalization(cfg: DataSection, train: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel: the config's, else measured on the training images (ImageNet's for folders)."""
    if cfg.mean is not None and cfg.std is not None:
        return cfg.mean, cfg.std
    if train.images is None:  # folders and shards: ImageNet's (its channel mean for greyscale, as timm)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if train.channels == 1:
            mean, std = (round(sum(mean) / 3, 4),), (round(sum(std) / 3, 4),)
        return cfg.mean or mean, cfg.std or std
    mean, std = (tuple(round(v, 4) for v in m) for m in pixel_moments(train.images))  # as padded for the model
    return cfg.mean or mean, cfg.std or std


class TrainBatches:
    """Per-step uint8 batches of one rank (see the module docstring for the order)."""

    def __init__(self, split: Split, *, global_batch: int, rank: int, world_size: int, seed: int,
                 device: torch.device, workers: int | None = 0) -> None:
        if len(split) < global_batch:
            raise ValueError(f"{split.name} has {len(split)} images, fewer than global_batch={global_batch}; "
                             "lower global_batch")
        self.split, self.device, self.seed = split, device, seed
        self.workers = default_workers() if workers is None else workers
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.per_rank = global_batch // world_size
        self.steps_per_epoch = len(split) // global_batch

    def step_indices(self, epoch: int) -> torch.Tensor:
        """``(steps_per_epoch, per_rank)`` indices of this rank for every step of ``epoch``."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(len(self.split), generator=gen)[:self.steps_per_epoch * self.global_batch]
        perm = perm.view(self.steps_per_epoch, self.global_batch)
        return perm[:, self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images uint8 (b, C, H, W), labels (b,))`` on the device for steps ``start_step..`` of ``epoch``."""
        if self.split.stream is not None:
            shards = ShardEpoch(self.split.stream, seed=self.seed, epoch=epoch, rank=self.rank,
                                world_size=self.world_size, batch=self.per_rank, steps=self.steps_per_epoch,
                                start_step=start_step)
            loader = _loader(shards, self.workers, batch_size=None, pin_memory=self.device.type == "cuda")
            for images, batch_labels in loader:
                yield images.to(self.device, non_blocking=True), batch_labels.to(self.device, non_blocking=True)
            return
        indices = self.step_indices(epoch)[start_step:]
        labels = self.split.labels
        if self.split.images is not None:
            images = self.split.images
            for idx in indices:
                yield images[idx.to(images.device)], labels[idx].to(self.device)
            return
        loader = _loader(self.split.folder, self.workers, batch_sampler=indices.tolist(),
                         pin_memory=self.device.type == "cuda")
        for images, batch_labels in loader:
            yield images.to(self.device, non_blocking=True), batch_labels.to(self.device, non_blocking=True)


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes leave the stop signals to the trainer (``.interrupt``)."""

    def __iter__(self):
        with starting_workers():  # the workers are forked here, for every epoch and evaluation
            return super().__iter__()


def _loader(data: Any, workers: int, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader of ``workers`` processes that leave the stop signals to the trainer (``.interrupt``)."""
    return _Loader(data, num_workers=workers, worker_init_fn=leave_signals_to_the_trainer, **kwargs)


def eval_batches(split: Split, *, batch: int, rank: int, world_size: int, device: torch.device,
                 workers: int | None = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``split`` exactly once over all ranks (rank ``r`` takes indices ``r, r + W, ...``; shards:
    its streams' shards). ``workers`` None: :func:`default_workers`."""
    workers = default_workers() if workers is None else workers
    if split.stream is not None:
        loader = _loader(ShardPass(split.stream, rank=rank, world_size=world_size, batch=batch), workers,
                         batch_size=None)
        for images, labels in loader:
            yield images.to(device), labels.to(device)
        return
    idx = torch.arange(rank, len(split), world_size)
    chunks = list(idx.split(batch))
    if split.images is not None:
        for c in chunks:
            yield split.images[c.to(split.images.device)], split.labels[c].to(device)
        return
    loader = _loader(split.folder, workers, batch_sampler=[c.tolist() for c in chunks])
    for images, labels in loader:
        yield images.to(device), labels.to(device)
