"""Occlusion sensitivity: the model-agnostic reference the other maps are judged by.

Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014 (Section 4.2):
slide a grey square over the image and record how much the class probability falls when each region
is hidden. It needs nothing but the logits, so it works for every model family, and it measures what
the gradient and attention maps (GradCAT, CAM, Grad-CAM, rollout) only estimate: the effect of
removing a region on the prediction. It costs one forward pass per window position.
"""

from __future__ import annotations

import torch
from torch import nn

from ._grad import explained
from .cam import _eval, _single_target

__all__ = ["occlusion"]


def _starts(size: int, window: int, stride: int) -> torch.Tensor:
    """Window start offsets along one axis: ``0, stride, 2 stride, ...``, plus ``size - window`` when the
    strided positions stop short of the border (so every pixel is covered by at least one window)."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return torch.tensor(starts)


def _axis_masks(size: int, window: int, stride: int, device) -> torch.Tensor:
    """``(positions, size)`` bool: row ``i`` marks the pixels that window position ``i`` hides."""
    s = _starts(size, window, stride).to(device)[:, None]
    r = torch.arange(size, device=device)[None, :]
    return (r >= s) & (r < s + window)


def _baseline(images: torch.Tensor, baseline) -> torch.Tensor:
    """The fill value as a ``(B or 1, C or 1, 1, 1)`` tensor."""
    if isinstance(baseline, str):
        if baseline == "zero":
            return images.new_zeros(1, 1, 1, 1)
        if baseline == "mean":
            return images.mean(dim=(2, 3), keepdim=True)
        raise ValueError(f"baseline must be 'zero', 'mean' or a number, got {baseline!r}")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)):
        raise ValueError(f"baseline must be 'zero', 'mean' or a number, got {baseline!r}")
    return images.new_full((1, 1, 1, 1), float(baseline))


def occlusion(model: nn.Module, images: torch.Tensor, target=None, *, window: int | None = None,
              stride: int | None = None, baseline: str | float = "zero", batch: int = 256) -> torch.Tensor:
    """Occlusion map ``(B, H, W)`` of class ``target`` (default: the prediction) for ``images (B, C, H, W)``.

    A ``window x window`` patch slides over each image with step ``stride``; in each occluded copy the
    patch is replaced by ``baseline``: ``"zero"`` (0 in normalised space, i.e. the data set mean colour),
    ``"mean"`` (each image's own per-channel mean) or a number (that normalised value). The score of a
    window position is the drop of the target's softmax probability, ``p(image) - p(occluded)``:
    positive where the region supports the class, negative where hiding it helps. The returned map gives
    every pixel the mean score of all window positions that cover it, so overlapping windows
    (``stride < window``) give a smooth map and ``stride == window`` a piecewise constant one.

    Args:
        model: any classifier ``images -> logits (B, num_classes)``; run in eval mode under ``no_grad``
            and put back into its previous mode.
        images: normalised ``(B, C, H, W)``.
        target: ``None`` (each image's predicted class), an int, or a ``(B,)`` tensor of classes.
        window: side of the square patch in pixels, ``1 <= window <= min(H, W)``. Default
            ``max(1, min(H, W) // 8)``: an 8x8 grid of 4-pixel windows on a 32x32 image.
        stride: step between window positions, ``1 <= stride <= window`` (a larger step would leave
            pixels never occluded). Default ``window`` (non-overlapping). When the steps stop short of
            the right / bottom border, one more position flush with the border is added.
        baseline: the fill value, see above.
        batch: occluded images per forward pass. ``B * positions`` images are evaluated in all, where
            ``positions = (ceil((H - window) / stride) + 1) * (ceil((W - window) / stride) + 1)``.

    The grid resolution matters when comparing methods like for like: a CAM or Grad-CAM map has one
    value per feature cell (8x8 for a 32x32 ViT with 4-pixel patches, 4x4 for ``nest_tiny_cifar``) and is
    upsampled, so compare it with occlusion at the same window (and ``stride == window``); smaller
    windows resolve finer detail but probe smaller, often less decisive, regions. Returns a float
    tensor on the CPU.
    """
    model = explained(model, images, "occlusion", internals=False)
    if images.ndim != 4:
        raise ValueError(f"occlusion expects images (B, C, H, W), got shape {tuple(images.shape)}")
    B, _C, H, W = images.shape
    if window is None:
        window = max(1, min(H, W) // 8)
    if stride is None:
        stride = window
    for name, v in (("window", window), ("stride", stride), ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"occlusion {name} must be a whole number >= 1, got {v!r}")
    if window > min(H, W):
        raise ValueError(f"occlusion window {window} does not fit the {H}x{W} image; use 1..{min(H, W)}")
    if stride > window:
        raise ValueError(f"occlusion stride {stride} is larger than the window {window}: pixels between windows "
                         f"would never be occluded; use a stride of 1..{window}")

    device = images.device
    rows = _axis_masks(H, window, stride, device)  # (ny, H)
    cols = _axis_masks(W, window, stride, device)  # (nx, W)
    ny, nx = rows.shape[0], cols.shape[0]
    P = ny * nx
    fill = _baseline(images, baseline).to(images.dtype).expand(B, -1, -1, -1)  # (B, C or 1, 1, 1)

    with _eval(model), torch.no_grad():
        logits = torch.cat([model(images[i:i + batch]) for i in range(0, B, batch)])
        t = _single_target(logits, target).to(device)  # (B,)
        p0 = logits.float().softmax(dim=1).gather(1, t[:, None])[:, 0]  # (B,)
        p_occ = torch.empty(B * P, device=device)
        for start in range(0, B * P, batch):  # one chunk of (image, position) pairs at a time
            k = torch.arange(start, min(start + batch, B * P), device=device)
            b, pos = k // P, k % P
            mask = rows[pos // nx][:, :, None] & cols[pos % nx][:, None, :]  # (n, H, W): one mask per position
            x = torch.where(mask[:, None], fill[b], images[b])
            p_occ[start:start + len(k)] = model(x).float().softmax(dim=1).gather(1, t[b][:, None])[:, 0]
    drops = p0[:, None] - p_occ.view(B, P)  # (B, P)

    # every pixel: mean of the drops of the windows covering it (the masks are separable: rows x cols)
    r, c = rows.float(), cols.float()
    total = torch.einsum("bij,ih,jw->bhw", drops.view(B, ny, nx), r, c)
    count = r.sum(0)[:, None] * c.sum(0)[None, :]  # (H, W), >= 1 everywhere
    return (total / count).float().cpu()
