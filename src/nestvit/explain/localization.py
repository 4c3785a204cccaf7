"""Weakly supervised localization metrics: heat map -> box, IoU, top-1 / GT-known localization.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates, half-open: a box covering pixel columns
``3..7`` is ``x0=3, x1=8``; width ``x1 - x0``, area ``(x1 - x0) * (y1 - y0)``. Pascal VOC / ImageNet
XML files count inclusive 1-based pixels, which :func:`read_voc_xml` converts (``xmin - 1, xmax``).

The protocol follows CAM (Zhou et al. 2016) and the ImageNet localization challenge: a map is
min-max normalised to [0, 1], thresholded, and the box is drawn around the largest connected
region; a prediction is right when its IoU with a ground-truth box is at least 0.5 ("GT-known"
uses the true class's map; "top-1" also needs the predicted class to be right). The threshold is
searched in steps of 0.05 on the evaluation set (:func:`search_threshold`), as CAM papers do.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["largest_component", "map_to_box", "maps_to_boxes", "iou", "box_hits", "gt_known_loc_acc",
           "top1_loc_error", "search_threshold", "read_voc_xml", "read_boxes_csv", "THRESHOLDS"]

THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)  # 0.05, 0.10, ..., 0.95


def largest_component(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The largest connected region of a boolean ``(H, W)`` mask (4- or 8-connected), as a mask.

    Union-find over foreground pixels, vectorised over the image: each pass links every pixel to
    the smallest label among its neighbours (label propagation with pointer jumping) until nothing
    changes. Ties between equally large regions go to the one whose first pixel (row-major) comes first.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if not mask.any():
        return mask.copy()
    H, W = mask.shape
    big = H * W
    labels = np.where(mask, np.arange(big).reshape(H, W), big)  # background = big (never the minimum)
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        shifts += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    padded = np.full((H + 2, W + 2), big, dtype=labels.dtype)
    while True:
        padded[1:-1, 1:-1] = labels
        best = labels.copy()
        for dy, dx in shifts:
            best = np.minimum(best, padded[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx])
        best = np.where(mask, best, big)
        flat = best.reshape(-1)
        fg = flat < big
        flat[fg] = flat[flat[fg]]  # pointer jumping: adopt the label of the pixel one's label names
        flat[fg] = flat[flat[fg]]
        if np.array_equal(best, labels):
            break
        labels = best
    counts = np.bincount(labels[mask].ravel(), minlength=big)
    return labels == int(np.argmax(counts))


def map_to_box(cam, threshold: float, connectivity: int = 8) -> tuple[int, int, int, int]:
    """Box around the largest connected region of ``normalise(cam) >= threshold``.

    ``cam (H, W)`` (numpy or torch) is min-max normalised to [0, 1] first; a constant map gives the
    whole image. Returns a half-open ``(x0, y0, x1, y1)``.
    """
    m = np.asarray(cam.detach().cpu() if hasattr(cam, "detach") else cam, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {m.shape}")
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0, 1] (the map is scaled to [0, 1]), got {threshold}")
    H, W = m.shape
    lo, hi = m.min(), m.max()
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12:
        return (0, 0, W, H)
    m = (m - lo) / (hi - lo)
    comp = largest_component(m >= threshold, connectivity)
    ys, xs = np.nonzero(comp)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def maps_to_boxes(cams, threshold: float, connectivity: int = 8) -> np.ndarray:
    """:func:`map_to_box` for every map of ``(N, H, W)``: ``(N, 4)`` int boxes."""
    return np.array([map_to_box(c, threshold, connectivity) for c in cams], dtype=np.int64).reshape(-1, 4)


def iou(box_a, box_b) -> np.ndarray | float:
    """Intersection over union of half-open boxes; broadcasts over leading axes ``(..., 4)``."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)
    union = area(a) + area(b) - inter
    out = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    return float(out) if out.ndim == 0 else out


def _as_box_lists(gt_boxes) -> list[np.ndarray]:
    """``(N, 4)`` or a sequence of ``(M_i, 4)`` (several boxes per image, as ImageNet) -> list of ``(M_i, 4)``."""
    if isinstance(gt_boxes, np.ndarray) or hasattr(gt_boxes, "numpy"):
        arr = np.asarray(gt_boxes, dtype=np.float64)
        if arr.ndim == 2:
            return [arr[i:i + 1] for i in range(len(arr))]
        if arr.ndim == 3:
            return list(arr)
    return [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b in gt_boxes]


def box_hits(pred_boxes, gt_boxes, iou_threshold: float = 0.5) -> np.ndarray:
    """``(N,)`` bool: the predicted box has IoU >= ``iou_threshold`` with any of the image's GT boxes."""
    pred = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    gts = _as_box_lists(gt_boxes)
    if len(gts) != len(pred):
        raise ValueError(f"{len(pred)} predicted boxes but ground truth for {len(gts)} images")
    return np.array([bool(len(g)) and bool((iou(p[None], g) >= iou_threshold).any()) for p, g in zip(pred, gts)])


def gt_known_loc_acc(pred_boxes, gt_boxes, iou_threshold: float = 0.5) -> float:
    """GT-known localization accuracy: the fraction of images whose box (from the *true* class's map)
    reaches IoU >= 0.5 with a ground-truth box."""
    return float(box_hits(pred_boxes, gt_boxes, iou_threshold).mean())


def top1_loc_error(pred_classes, gt_classes, pred_boxes, gt_boxes, iou_threshold: float = 0.5) -> float:
    """Top-1 localization error: the fraction of images where the top-1 class is wrong *or* the box
    (from the predicted class's map) has IoU < 0.5 with every ground-truth box."""
    pc = np.asarray(pred_classes).reshape(-1)
    gc = np.asarray(gt_classes).reshape(-1)
    if len(pc) != len(gc):
        raise ValueError(f"{len(pc)} predicted classes but {len(gc)} true classes")
    right = (pc == gc) & box_hits(pred_boxes, gt_boxes, iou_threshold)
    return float(1.0 - right.mean())


def search_threshold(cams, gt_boxes, thresholds: Sequence[float] = THRESHOLDS, iou_threshold: float = 0.5,
                     connectivity: int = 8) -> tuple[float, dict[float, float]]:
    """The CAM threshold (default grid 0.05..0.95, step 0.05) with the best GT-known accuracy on this set.

    Returns ``(best threshold, {threshold: accuracy})``; ties go to the smallest threshold. Choosing
    the threshold on the evaluation set itself is the usual CAM protocol; report it as such.
    """
    cams = [np.asarray(c.detach().cpu() if hasattr(c, "detach") else c, dtype=np.float64) for c in cams]
    accs = {float(t): gt_known_loc_acc(maps_to_boxes(cams, float(t), connectivity), gt_boxes, iou_threshold)
            for t in thresholds}
    best = max(accs, key=lambda t: (accs[t], -t))
    return best, accs


# ----------------------------------------------------------------------------------------------
# Box files
# ----------------------------------------------------------------------------------------------

def read_voc_xml(path: str | Path, *, one_based: bool = True) -> dict:
    """One Pascal VOC / ImageNet localization XML file.

    Returns ``{"filename", "size": (width, height) or None, "boxes": (M, 4) float array, "labels": [name]}``
    with half-open 0-based boxes: ``(xmin - 1, ymin - 1, xmax, ymax)`` for the usual inclusive 1-based
    files (``one_based=False`` keeps ``(xmin, ymin, xmax, ymax)``).
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{path}: not a readable XML annotation ({e})") from None
    size = root.find("size")
    wh = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        wh = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    boxes, labels = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: an <object><bndbox> lacks numeric xmin/ymin/xmax/ymax") from None
        if one_based:
            x0, y0 = x0 - 1, y0 - 1
        boxes.append((x0, y0, x1, y1))
        labels.append(obj.findtext("name", default=""))
    return {"filename": root.findtext("filename", default=path.stem), "size": wh,
            "boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "labels": labels}


def read_boxes_csv(path: str | Path) -> dict[str, dict]:
    """Boxes from a CSV of rows ``filename,x0,y0,x1,y1[,label]`` (a header row is skipped if present).

    Coordinates are taken as half-open pixel edges as written. Several rows for one file give several
    boxes. Returns ``{filename: {"boxes": (M, 4) array, "labels": [label or ""]}}`` in file order.
    """
    path = Path(path)
    out: dict[str, dict] = {}
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 5:
                raise ValueError(f"{path}:{i + 1}: expected filename,x0,y0,x1,y1[,label], got {row}")
            try:
                coords = [float(v) for v in row[1:5]]
            except ValueError:
                if i == 0:
                    continue  # header
                raise ValueError(f"{path}:{i + 1}: non-numeric box coordinates {row[1:5]}") from None
            entry = out.setdefault(row[0].strip(), {"boxes": [], "labels": []})
            entry["boxes"].append(coords)
            entry["labels"].append(row[5].strip() if len(row) > 5 else "")
    for entry in out.values():
        entry["boxes"] = np.asarray(entry["boxes"], dtype=np.float64).reshape(-1, 4)
    return out
