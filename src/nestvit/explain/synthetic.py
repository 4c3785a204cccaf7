"""A localization set whose truth is known: real digits / clothes pasted onto a larger cluttered canvas.

:func:`make_localization_set` takes 28x28 items from ``nestvit.data.load_dataset`` (MNIST-5k or
Fashion-MNIST), rescales each to a random size, pastes it at a random position on a dark canvas
(default 64x64) and records the tight box of the pasted item's pixels. Clutter, which a classifier
must learn to ignore, is drawn *before* the object:

- fragments: random crops (6-12 px) of *other* items at 25-50 % contrast, so they look like the
  object's strokes but carry no complete shape;
- blobs: soft Gaussian spots of 15-40 % brightness;
- noise: faint uniform pixel noise everywhere.

The object is combined with ``max(canvas, object)``, so clutter can touch it but never hides it.
The box is the half-open ``(x0, y0, x1, y1)`` around the object's pixels of value >= ``box_level``
(default 48 of 255) after rescaling, so faint interpolation fringes do not widen it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["make_localization_set", "SOURCES"]

SOURCES = ("mnist5k", "fashion_mnist", "mnist")


def _source_items(source: str, split: str, root=None):
    from nestvit.data import load_dataset

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    ds = load_dataset(source, split=split, root=root)
    return ds.images, ds.labels, list(ds.classes)


def _resize(item: torch.Tensor, size: int) -> torch.Tensor:
    """``(C, h, w)`` uint8 -> float ``(C, size, size)`` in [0, 255] (bilinear, antialiased when shrinking)."""
    x = item.float().unsqueeze(0)
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < item.shape[-1]).squeeze(0).clamp(0, 255)


def make_localization_set(source: str = "fashion_mnist", n: int = 1000, *, canvas: int = 64,
                          scale: tuple[int, int] = (24, 44), clutter: bool = True, fragments: tuple[int, int] = (2, 5),
                          blobs: tuple[int, int] = (1, 3), noise: float = 12.0, channels: int = 1,
                          split: str = "train", seed: int = 0, box_level: int = 48, root=None,
                          items: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Build ``n`` canvases. Returns ``(images uint8 (n, channels, canvas, canvas), labels (n,), boxes (n, 4))``.

    ``scale``: range (pixels, inclusive) of the pasted item's edge (the 28x28 item is rescaled to a
    square of that size). ``channels=3`` repeats the grey canvas into RGB.
    ``items=(images (M, C, h, w) uint8, labels (M,))`` replaces the data set (for tests).
    Deterministic for a given ``seed``; objects, labels and boxes do not depend on ``clutter`` (the
    clutter draws from its own random stream).
    """
    if items is None:
        src_images, src_labels, _ = _source_items(source, split, root)
    else:
        src_images, src_labels = items
    if src_images.dtype != torch.uint8 or src_images.ndim != 4:
        raise ValueError("items must be uint8 (M, C, h, w)")
    lo, hi = scale
    if not 4 <= lo <= hi <= canvas:
        raise ValueError(f"scale {scale} must satisfy 4 <= min <= max <= canvas ({canvas})")
    rng = np.random.default_rng([seed, 0])  # objects: item, size, position
    crng = np.random.default_rng([seed, 1])  # clutter: its own stream, so clutter=False keeps the same objects
    M = len(src_images)
    grey = src_images.float().mean(dim=1, keepdim=True).to(torch.uint8) if src_images.shape[1] > 1 else src_images
    images = torch.zeros(n, channels, canvas, canvas, dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.long)
    boxes = torch.zeros(n, 4, dtype=torch.long)
    yy, xx = np.mgrid[0:canvas, 0:canvas]
    for i in range(n):
        idx = int(rng.integers(M))
        img = np.zeros((canvas, canvas), dtype=np.float32)
        if clutter:
            if noise > 0:
                img += crng.uniform(0, noise, size=img.shape).astype(np.float32)
            for _ in range(int(crng.integers(blobs[0], blobs[1] + 1))):
                cy, cx = crng.uniform(0, canvas, size=2)
                s = crng.uniform(2.0, 6.0)
                amp = crng.uniform(0.15, 0.40) * 255
                img = np.maximum(img, amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
            for _ in range(int(crng.integers(fragments[0], fragments[1] + 1))):
                other = grey[int(crng.integers(M)), 0].numpy().astype(np.float32)
                fs = int(crng.integers(6, 13))
                oy, ox = crng.integers(0, other.shape[0] - fs + 1, size=2)
                frag = other[oy:oy + fs, ox:ox + fs] * crng.uniform(0.25, 0.5)
                py, px = crng.integers(0, canvas - fs + 1, size=2)
                img[py:py + fs, px:px + fs] = np.maximum(img[py:py + fs, px:px + fs], frag)
        size = int(rng.integers(lo, hi + 1))
        obj = _resize(grey[idx], size)[0].numpy()
        y0, x0 = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
        img[y0:y0 + size, x0:x0 + size] = np.maximum(img[y0:y0 + size, x0:x0 + size], obj)
        ys, xs = np.nonzero(obj >= box_level)
        if len(ys) == 0:  # an empty item: box of its whole square
            ys, xs = np.array([0, size - 1]), np.array([0, size - 1])
        boxes[i] = torch.tensor([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        out = torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        if channels == 1:
            images[i, 0] = out
        else:
            images[i] = out.expand(channels, -1, -1)
        labels[i] = int(src_labels[idx])
    return images, labels, boxes
