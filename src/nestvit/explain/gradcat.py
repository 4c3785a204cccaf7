"""GradCAT: gradient-based class-aware tree traversal through NesT's block hierarchy.

Paper: Zhang et al., "Nested Hierarchical Transformer: Towards Accurate, Data-Efficient and
Interpretable Visual Understanding", AAAI 2022 (arXiv:2105.12723), Section 3.2 and Algorithm 1 (experiments:
Section 4.6). The paper publishes no code for it; this follows Algorithm 1:

    input  {A_l | l = 2..T_d} (the feature maps of every hierarchy), alpha_{T_d} = A_{T_d}, P = []
    for l = T_d, ..., 2:
        h_l   = alpha_l . (-dY_c / d alpha_l)       # activation times negative gradient, summed over channels
        h'_l  = AvgPool_{2x2}(h_l)                   # one score per quadrant of the current node
        n*_l  = argmax h'_l;  P = P + [n*_l]
        alpha_{l-1} = [A_{l-1}]_{n*_l}               # descend into that quadrant's block at level l-1

NesT's hierarchy is a tree: the single block of the top level ``T_d`` has four children (the 2x2
blocks of level ``T_d - 1`` that block aggregation merged into it), and so on down to level 1, whose
blocks are the leaves. Paper levels are numbered 1 (lowest, many small blocks) to ``T_d`` (top);
``Nest.levels[i]`` is paper level ``i + 1``.

Where each quadrant lies: at code level ``l`` the map has ``(H_l, W_l) = block * block_grid(l)``
pixels and one block covers ``block x block`` of them, i.e. ``e_l = block * 2**l * patch_size`` image
pixels a side. The 2x2 quadrants of a block's region on the level-``l`` map cover exactly the image
regions of its four children, the blocks ``(2r + i, 2c + j)`` of level ``l - 1``. (An odd ``block``
splits the middle row/column between two quadrants by area.)

Sign: ``h = A . (sign * dY/dA)``. To first order, setting a region's activations to zero changes the
logit by ``-sum(A . dY/dA)``; so with ``sign=-1`` (the paper's choice) the score is the logit *gain*
from removing that region's features, and with ``sign=+1`` (Grad-CAM's "activation x gradient"
convention) it is the logit *loss*, i.e. the region's first-order contribution to the class
evidence. ``experiments/localization.py`` measures which of the two finds objects on a trained model
(see ``docs/interpretability.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._grad import explained, intermediate_gradients

__all__ = ["GradCATResult", "gradcat", "block_box", "check_nest"]


@dataclass
class GradCATResult:
    """GradCAT output for ``B`` images and ``K`` classes each (all tensors on the CPU).

    - ``classes (B, K)``: the explained classes (predicted top-k, or the given targets)
    - ``probs (B, K)``: softmax probability of each explained class
    - ``logits (B, K)``: its logit ``Y_c``
    - ``path (B, K, L)``: block index of each node on the path, top level first, the leaf last;
      the index is ``row * grid_w + col`` in that level's block grid (``Nest``'s block order)
    - ``levels``: paper level of each path entry, ``(L, L-1, ..., 1)`` (code level = paper level - 1)
    - ``boxes (B, K, L, 4)``: each path node's region in input pixels, ``(x0, y0, x1, y1)`` half-open
      (``x1 - x0`` is the width); each box lies inside the previous one and has half its size
    - ``scores (B, K, L-1, 4)``: the four quadrant scores ``h'`` at each visited level (paper levels
      ``L .. 2``), quadrants ordered top-left, top-right, bottom-left, bottom-right; ``choice`` holds
      the argmax
    - ``choice (B, K, L-1)``: chosen quadrant (0..3) at each visited level
    - ``root_scores (B, K, T_top)``: mean score of every top-level block (one block for square input;
      several for rectangular images, where the best one starts the path)
    - ``maps``: ``h_l`` for every level, top first, each ``(B, K, H_l, W_l)`` (for plots)
    - ``sign``: the sign used for the gradient (-1: the paper)
    """

    classes: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor
    path: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    choice: torch.Tensor
    root_scores: torch.Tensor
    levels: tuple[int, ...]
    maps: list[torch.Tensor] = field(default_factory=list)
    sign: int = -1

    @property
    def leaf_boxes(self) -> torch.Tensor:
        """``(B, K, 4)``: the leaf block (paper level 1) each path ends in."""
        return self.boxes[..., -1, :]


def check_nest(model: nn.Module) -> None:
    """GradCAT needs NesT's block hierarchy; refuse other models with a pointer to what works for them."""
    cfg = getattr(model, "cfg", None)
    if getattr(model, "family", "") != "nest" or not hasattr(cfg, "block_grid"):
        raise ValueError(f"GradCAT traverses NesT's block hierarchy; {type(model).__name__} "
                         f"(family {getattr(model, 'family', '?')!r}) has none. Use grad_cam or "
                         f"attention_rollout (method gradcam / rollout) for ViT, TNT and RTNT")
    if cfg.num_levels < 2:
        raise ValueError("GradCAT needs at least 2 NesT levels (a one-level NesT has no tree to traverse)")
    if cfg.block < 2:
        raise ValueError(f"GradCAT needs blocks of at least 2x2 tokens to split into quadrants; block_size is "
                         f"{cfg.block}")


def block_edge(model: nn.Module, level: int) -> int:
    """Pixel edge of one block at code level ``level`` (``block * 2**level * patch_size``)."""
    cfg = model.cfg
    return cfg.block * 2 ** level * cfg.patch_size


def block_box(model: nn.Module, level: int, index: torch.Tensor) -> torch.Tensor:
    """Pixel boxes ``(..., 4)`` (x0, y0, x1, y1, half-open) of blocks ``index`` at code level ``level``."""
    gw = model.cfg.block_grid(level)[1]
    e = block_edge(model, level)
    row, col = index // gw, index % gw
    return torch.stack([col * e, row * e, (col + 1) * e, (row + 1) * e], dim=-1)


def _quadrant_scores(region: torch.Tensor) -> torch.Tensor:
    """``(N, b, b) -> (N, 4)`` mean over the 2x2 quadrants (TL, TR, BL, BR); odd ``b`` splits by area."""
    if region.shape[-1] % 2:
        region = region.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
    N, b, _ = region.shape
    return region.reshape(N, 2, b // 2, 2, b // 2).mean(dim=(2, 4)).reshape(N, 4)


def _node_region(h: torch.Tensor, block: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``h (N, H, W)``, node ``(row, col)`` per sample -> the node's ``(N, block, block)`` region."""
    N, H, W = h.shape
    blocks = h.reshape(N, H // block, block, W // block, block).transpose(2, 3)  # (N, gh, gw, b, b)
    return blocks[torch.arange(N, device=h.device), row, col]


def _prepare_targets(logits: torch.Tensor, target, top_k: int) -> torch.Tensor:
    B, num_classes = logits.shape
    if target is None:
        if not 1 <= top_k <= num_classes:
            raise ValueError(f"top_k (--top-k) must be between 1 and {num_classes}, the model's classes; got {top_k}")
        return logits.detach().topk(top_k, dim=1).indices
    t = torch.as_tensor(target, dtype=torch.long)
    if t.ndim == 0:
        t = t.expand(B)
    if t.ndim == 1:
        t = t.unsqueeze(1)
    if t.shape[0] != B:
        raise ValueError(f"target has {t.shape[0]} rows but there are {B} images")
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        raise ValueError(f"target classes must lie in 0..{num_classes - 1}")
    return t


@torch.no_grad()
def _traverse(model: nn.Module, heat: list[torch.Tensor]):
    """Algorithm 1 on per-level score maps ``heat[l] (N, H_l, W_l)`` (code levels, 0 = lowest)."""
    cfg = model.cfg
    L, b = cfg.num_levels, cfg.block
    N = heat[0].shape[0]
    top = L - 1
    gh, gw = cfg.block_grid(top)
    root_scores = heat[top].reshape(N, gh, b, gw, b).mean(dim=(2, 4)).reshape(N, gh * gw)
    node = root_scores.argmax(dim=1)  # best top block (the only one for square input)
    row, col = node // gw, node % gw
    path, boxes, scores, choice = [node], [block_box(model, top, node)], [], []
    for level in range(top, 0, -1):  # paper levels T_d .. 2
        q = _quadrant_scores(_node_region(heat[level], b, row, col))  # (N, 4)
        best = q.argmax(dim=1)
        row, col = 2 * row + best // 2, 2 * col + best % 2  # the chosen child at level - 1
        child = row * cfg.block_grid(level - 1)[1] + col
        scores.append(q)
        choice.append(best)
        path.append(child)
        boxes.append(block_box(model, level - 1, child))
    return (torch.stack(path, 1), torch.stack(boxes, 1), torch.stack(scores, 1), torch.stack(choice, 1),
            root_scores)


def gradcat(model: nn.Module, images: torch.Tensor, *, target=None, top_k: int = 1, sign: int = -1,
            top: str = "normalized", keep_maps: bool = True) -> GradCATResult:
    """Explain NesT predictions with GradCAT (Algorithm 1 of the NesT paper).

    ``images (B, C, H, W)`` preprocessed as the model expects. ``target``: ``None`` explains the
    ``top_k`` predicted classes of each image; an int, a ``(B,)`` or a ``(B, K)`` tensor of classes
    explains those. ``sign=-1`` is the paper's ``h = A . (-dY/dA)``; ``+1`` uses the plain gradient.
    ``top``: which map stands for the top level ``A_{T_d}``: ``"normalized"`` (default) the final
    LayerNorm's output that the head pools (then ``h`` there is ``sign * CAM / (H W)`` exactly);
    ``"raw"`` the level's output before that norm, where ``A . dY/dA`` vanishes up to LayerNorm's
    epsilon (a per-token LayerNorm is scale invariant), leaving the first choice to terms of the
    order of that epsilon and of float rounding.
    Lower levels always use the raw level outputs (each feeds block aggregation's conv, which is not
    scale invariant). Returns a :class:`GradCATResult` (one path per image and class).
    """
    model = explained(model, images, "gradcat")
    check_nest(model)
    if sign not in (-1, 1):
        raise ValueError(f"sign must be -1 (the paper) or +1, got {sign}")
    if top not in ("normalized", "raw"):
        raise ValueError(f"top must be 'normalized' or 'raw', got {top!r}")
    classes, logits, maps, grads = intermediate_gradients(
        model, images, lambda logits: _prepare_targets(logits, target, top_k), features=top == "normalized")
    if top == "normalized":  # the features replace the raw top map
        maps = maps[:-2] + maps[-1:]
        grads = [gk[:-2] + gk[-1:] for gk in grads]
    B, K = classes.shape
    # h_l = sum_c A_l * (sign * dY/dA_l): (B, K, H_l, W_l) for each level
    heat = [torch.stack([(a * (sign * gk[i])).sum(dim=1) for gk in grads], dim=1) for i, a in enumerate(maps)]
    path, boxes, scores, choice, root_scores = _traverse(model, [h.flatten(0, 1) for h in heat])
    L = len(maps)
    probs = logits.softmax(dim=1)
    return GradCATResult(
        classes=classes.cpu(), probs=probs.gather(1, classes).cpu(), logits=logits.gather(1, classes).cpu(),
        path=path.reshape(B, K, L).cpu(), boxes=boxes.reshape(B, K, L, 4).cpu(),
        scores=scores.reshape(B, K, L - 1, 4).cpu(), choice=choice.reshape(B, K, L - 1).cpu(),
        root_scores=root_scores.reshape(B, K, -1).cpu(), levels=tuple(range(L, 0, -1)),
        maps=[h.cpu() for h in reversed(heat)] if keep_maps else [], sign=sign)


def upsample_map(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, h, w) -> (B, H, W)`` bilinear (``align_corners=False``)."""
    return F.interpolate(m.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
