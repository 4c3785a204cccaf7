"""The input pipeline of training: which images each rank sees at each step, as uint8 on the device.

Small data sets (``nestvit.data.load_dataset``) are held whole in memory as uint8 tensors, moved once
to the training device and batched by indexing with a permutation; augmentation then runs on the
device (``nestvit.data.augment.BatchAugment``), so no worker processes are needed. ImageNet-style
folders stream through a ``DataLoader`` (decode + resize + centre crop in ``workers`` processes)
with the same per-step index lists.

Order: epoch ``e`` uses ``torch.randperm(N)`` from a CPU generator seeded with ``(seed, e)``; global
step ``s`` of the epoch takes ``perm[s * G:(s + 1) * G]`` (``G`` the global batch; the last partial
batch is dropped) and rank ``r`` its ``r``-th contiguous share. The order is therefore a pure
function of ``(seed, epoch, step)``: a resumed run continues mid-epoch without saved sampler state,
and one process with batch ``G`` sees exactly the images that ``W`` processes see together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.datasets import DATASETS, DatasetError, ImageFolderDataset, load_dataset
from .config import DataSection

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEW_IMAGES = 5  # an image-folder class of the training split with fewer images than this is warned about


@dataclass
class Split:
    """One split of a data set: in memory (``images``) or streamed (``folder``)."""

    name: str
    labels: torch.Tensor  # (N,) int64 on the CPU
    classes: list[str]
    channels: int
    size: tuple[int, int]  # (H, W) of the images the model sees
    images: torch.Tensor | None = None  # (N, C, H, W) uint8, on the training device
    folder: ImageFolderDataset | None = None
    unpadded: tuple[int, int] | None = None  # (H, W) of the images before data.pad_to (after data.resize_to)
    notes: list[str] = field(default_factory=list)  # warnings about the data, printed when the run starts

    def __len__(self) -> int:
        return len(self.labels)


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 resized to ``size`` x ``size`` (bilinear, antialiased, like PIL's), in chunks."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    out = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
           .round_().clamp_(0, 255).to(torch.uint8) for chunk in images.split(4096)]
    return torch.cat(out)


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


def load_split(cfg: DataSection, split: str, device: torch.device, *, classes: list[str] | None = None,
               limit: int | None = None) -> Split:
    """Load ``split`` of ``cfg.name``; in-memory sets go to ``device`` as uint8.

    ``synthetic`` (not a real data set) makes ``limit`` images (default 512) of ``img_size`` pixels.
    """
    if cfg.name == "synthetic":
        images, labels = synthetic(split, size=cfg.img_size, count=limit or 512)
        images = _resize(images, cfg.resize_to)
        unpadded = tuple(images.shape[-2:])
        images = _pad(images, cfg.pad_to)
        return Split(name=f"synthetic:{split}", labels=labels, classes=[f"class{k}" for k in range(10)],
                     channels=1, size=tuple(images.shape[-2:]), images=images.to(device), unpadded=unpadded)
    if cfg.name not in DATASETS:
        raise ValueError(f"unknown data set {cfg.name!r}; known: {', '.join(DATASETS)}, synthetic")
    if not DATASETS[cfg.name].in_memory:
        if cfg.resize_to is not None or cfg.pad_to is not None:
            raise ValueError(f"data.resize_to and data.pad_to apply to in-memory data sets; {cfg.name} images are "
                             "resized to data.img_size instead: set that")
        if cfg.root is None:
            raise ValueError(f"data.root is required for {cfg.name} (root/<split>/<class>/*.jpg)")
        crop = (cfg.random_resized_crop, 1.0) if split == cfg.train_split and cfg.random_resized_crop else None
        folder = ImageFolderDataset(cfg.root, split=split, size=cfg.img_size, classes=classes, crop_scale=crop)
        notes = _class_notes(folder, training=classes is None)
        if limit is not None:
            folder.samples = folder.samples[:limit]
        labels = torch.tensor([label for _, label in folder.samples], dtype=torch.int64)
        return Split(name=f"{cfg.name}:{split}", labels=labels, classes=list(folder.classes), channels=3,
                     size=(cfg.img_size, cfg.img_size), folder=folder, notes=notes)
    ds = load_dataset(cfg.name, root=cfg.root, split=split, download=cfg.download)
    images, labels = ds.images, ds.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = _resize(images, cfg.resize_to)
    unpadded = tuple(images.shape[-2:])
    images = _pad(images, cfg.pad_to)
    return Split(name=ds.name, labels=labels, classes=list(ds.classes), channels=images.shape[1],
                 size=tuple(images.shape[-2:]), images=images.to(device), unpadded=unpadded)


def _class_notes(folder: ImageFolderDataset, *, training: bool) -> list[str]:
    """Check an image folder's classes: warnings to print, or a ``DatasetError`` for an empty training class.

    A class directory of the training split without images is an error, not a warning: it would still get
    an output of the model, a label that no image has, which training only learns to never predict (and the
    evaluation then counts its images as misses); the fix is to add images or remove the directory. A
    training class with fewer than ``FEW_IMAGES`` images is a warning, as are the classes of an evaluation
    split (``training=False``: its classes are the training split's) that differ from the training split's:
    a training class it has no images of (its accuracy is undefined), a class directory the training split
    does not have (its images are skipped).
    """
    counts = dict(zip(folder.classes, folder.counts))
    empty = [c for c, n in counts.items() if n == 0]
    if empty and training:
        raise DatasetError(f"imagefolder: class director{'ies' if len(empty) > 1 else 'y'} {', '.join(empty)} of "
                           f"{folder.root} {'have' if len(empty) > 1 else 'has'} no images; a class without "
                           "images cannot be learnt: add images or remove the directory")
    notes = []
    if not training:
        extra = sorted(p.name for p in folder.root.iterdir() if p.is_dir() and p.name not in counts)
        differ = ([f"no images of the training class(es) {', '.join(empty)} (their accuracy is n/a)"] if empty
                  else []) + ([f"class(es) {', '.join(extra)} not in the training split (their images are "
                               "skipped)"] if extra else [])
        if differ:
            notes.append(f"warning: {folder.root}: its classes differ from the training split's: "
                         f"{'; '.join(differ)}; give both splits the same class directories")
    few = [f"{c} ({n})" for c, n in counts.items() if 0 < n < FEW_IMAGES]
    if few and training:
        notes.append(f"warning: {folder.root}: class(es) with fewer than {FEW_IMAGES} images: {', '.join(few)}; "
                     "the model will hardly learn them: add images")
    return notes


def normalization(cfg: DataSection, train: Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel: the config's, else measured on the training images (ImageNet's for folders)."""
    if cfg.mean is not None and cfg.std is not None:
        return cfg.mean, cfg.std
    if train.images is None:
        return cfg.mean or IMAGENET_MEAN, cfg.std or IMAGENET_STD
    c = train.channels
    s1 = torch.zeros(c, dtype=torch.float64, device=train.images.device)
    s2 = torch.zeros_like(s1)
    for chunk in train.images.split(4096):  # float64 sums a chunk at a time: no float copy of the whole set
        x = chunk.double().div_(255.0)
        s1 += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    n = train.images.numel() // c
    mean_t = s1 / n
    std_t = (s2 / n - mean_t.square()).clamp_min(0).sqrt()
    mean = tuple(round(v, 4) for v in mean_t.tolist())
    std = tuple(round(v, 4) for v in std_t.tolist())
    return cfg.mean or mean, cfg.std or std


class TrainBatches:
    """Per-step uint8 batches of one rank (see the module docstring for the order)."""

    def __init__(self, split: Split, *, global_batch: int, rank: int, world_size: int, seed: int,
                 device: torch.device, workers: int = 0) -> None:
        if len(split) < global_batch:
            raise ValueError(f"{split.name} has {len(split)} images, fewer than global_batch={global_batch}; "
                             "lower global_batch")
        self.split, self.device, self.seed, self.workers = split, device, seed, workers
        self.global_batch, self.rank = global_batch, rank
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
        indices = self.step_indices(epoch)[start_step:]
        labels = self.split.labels
        if self.split.images is not None:
            images = self.split.images
            for idx in indices:
                yield images[idx.to(images.device)], labels[idx].to(self.device)
            return
        loader = torch.utils.data.DataLoader(self.split.folder, batch_sampler=indices.tolist(),
                                             num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for images, batch_labels in loader:
            yield images.to(self.device, non_blocking=True), batch_labels.to(self.device, non_blocking=True)


def eval_batches(split: Split, *, batch: int, rank: int, world_size: int, device: torch.device,
                 workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of ``split`` exactly once over all ranks (rank ``r`` takes indices ``r, r + W, ...``)."""
    idx = torch.arange(rank, len(split), world_size)
    chunks = list(idx.split(batch))
    if split.images is not None:
        for c in chunks:
            yield split.images[c.to(split.images.device)], split.labels[c].to(device)
        return
    loader = torch.utils.data.DataLoader(split.folder, batch_sampler=[c.tolist() for c in chunks],
                                         num_workers=workers)
    for images, labels in loader:
        yield images.to(device), labels.to(device)
