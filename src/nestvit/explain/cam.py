"""Class activation maps for every nestvit family: CAM, Grad-CAM and attention rollout.

- :func:`nest_cam` (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization"): for
  a model whose head is global average pooling followed by a linear layer (NesT), the class score
  is the spatial mean of ``w_c . F(x, y)`` (plus the bias), so ``w_c . F`` is an exact per-location
  decomposition of the logit. ``F`` is the normalized final map of ``forward_features``.
- :func:`grad_cam` (Selvaraju et al. 2017): ``ReLU(sum_k alpha_k A_k)`` with ``alpha_k`` the spatial
  mean of ``dY_c / dA_k``, on any map of ``forward_intermediates`` (every family has one).
- :func:`attention_rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
  average the heads, add the identity for the residual path, renormalise the rows, multiply over
  the layers; the class token's row over the patch tokens is the map. ViT exposes its attention
  (``forward_attention_maps``); for TNT / RTNT the outer (level-0, sentence) transformer's attention
  is recomputed from forward hooks on ``blocks[i].layers[0].attn.qkv``.

All functions take preprocessed ``images (B, C, H, W)`` and return ``(B, H, W)`` maps (bilinearly
upsampled to the input size unless ``upsample=False``) on the CPU; the model is run in eval mode
and put back into its previous mode.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..layers import attention_probs, split_qkv
from ._grad import explained, intermediate_gradients
from .gradcat import _prepare_targets, upsample_map

__all__ = ["nest_cam", "grad_cam", "attention_rollout", "predict", "cam_layer_default"]


@contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, top_k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes (B, k), probabilities (B, k))`` of the ``top_k`` predictions."""
    with _eval(model):
        probs = model(images).softmax(dim=1)
    p, c = probs.topk(top_k, dim=1)
    return c.cpu(), p.cpu()


def _single_target(logits: torch.Tensor, target) -> torch.Tensor:
    t = _prepare_targets(logits, target, 1)
    if t.shape[1] != 1:
        raise ValueError("CAM methods explain one class per image; pass an int or a (B,) tensor as target")
    return t[:, 0]


@torch.no_grad()
def nest_cam(model: nn.Module, images: torch.Tensor, target=None, *, upsample: bool = True) -> torch.Tensor:
    """CAM ``w_c . F`` of class ``target`` (default: the prediction) for a GAP + linear head.

    At the feature resolution, ``cam.mean((1, 2)) + head.bias[c]`` is exactly the logit ``Y_c``.
    """
    model = explained(model, images, "nest_cam")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"CAM needs a linear classification head; {type(model).__name__} has {type(head).__name__}")
    with _eval(model):
        feats = model.forward_features(images)
        if feats.ndim != 4:
            raise ValueError(f"CAM needs a model whose features are a (B, C, H, W) map pooled by averaging "
                             f"(NesT); {type(model).__name__} gives {tuple(feats.shape)}. Use grad_cam or "
                             f"attention_rollout (method gradcam / rollout) for token models")
        logits = model.forward_head(feats)
        c = _single_target(logits, target).to(feats.device)
        cam = torch.einsum("bchw,bc->bhw", feats, head.weight[c])
    cam = cam.float().cpu()
    return upsample_map(cam, tuple(images.shape[-2:])) if upsample else cam


def _pools_class_token(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "global_pool", "avg") == "token"


def cam_layer_default(model: nn.Module) -> int:
    """The last ``forward_intermediates`` map the logits depend on: ``-1``, or ``-2`` for models that
    classify from a class token (its final value reads the previous block's patch tokens, never the
    last block's)."""
    return -2 if _pools_class_token(model) else -1


def grad_cam(model: nn.Module, images: torch.Tensor, target=None, layer: int | None = None, *,
             upsample: bool = True, relu: bool = True) -> torch.Tensor:
    """Grad-CAM of class ``target`` (default: the prediction) on map ``layer`` of ``forward_intermediates``.

    ``layer=None`` picks :func:`cam_layer_default` (``-1`` for NesT, ``-2`` for class-token ViT / TNT /
    RTNT). An explicitly chosen map that the logit does not depend on is refused.
    """
    model = explained(model, images, "grad_cam")
    if layer is None:
        layer = cam_layer_default(model)
        if layer == -2 and len(getattr(model, "feature_info", None) or [None, None]) < 2:
            raise ValueError(f"Grad-CAM has no map to use in this {type(model).__name__}: it classifies from a class "
                             "token, which never reads its last (here: only) block's patch tokens; explain it with "
                             "occlusion or attention_rollout, or give it two or more blocks")
    _, _, maps, grads = intermediate_gradients(model, images, lambda logits: _single_target(logits, target)[:, None],
                                               only=[layer])
    a, g = maps[0], grads[0][0]
    if not bool(g.abs().amax() > 0):
        raise ValueError(f"the logits do not depend on intermediate map {layer} (a class-token model reads the "
                         f"last block's class token only); use layer={cam_layer_default(model)} or layer=None")
    alpha = g.mean(dim=(2, 3), keepdim=True)
    cam = (alpha * a).sum(dim=1)
    if relu:
        cam = cam.clamp_min(0)
    cam = cam.float().cpu()
    return upsample_map(cam, tuple(images.shape[-2:])) if upsample else cam


def _probs_from_qkv(attn: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(B, H, N, N)`` from ``layers.Attention``'s fused ``qkv`` output ``(B, N, C + 2 kv D)``."""
    q, k, _v = split_qkv(qkv, attn.num_heads, attn.kv_heads)  # one K head broadcasts for multi-query attention
    return attention_probs(q, k)


def outer_attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """TNT / RTNT: the outer (level-0) transformer's attention ``[(B, heads, 1 + N0, 1 + N0)]`` per block
    where level 0 runs, recomputed from hooks on ``blocks[i].layers[0].attn.qkv``."""
    out: list[torch.Tensor] = []
    handles = []
    for block in model.blocks:
        layer0 = block.layers[0]
        if not hasattr(layer0, "attn"):
            continue  # level 0 switched off in this block (level_blocks)
        attn = layer0.attn
        handles.append(attn.qkv.register_forward_hook(
            lambda mod, inp, output, attn=attn: out.append(_probs_from_qkv(attn, output.detach()))))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return out


def _attention_maps(model: nn.Module, images: torch.Tensor) -> tuple[list[torch.Tensor], int, tuple[int, int]]:
    """``(per-layer attention (B, H, T, T), prefix tokens, patch grid)`` for ViT, TNT and RTNT."""
    family = getattr(model, "family", "")
    if hasattr(model, "forward_attention_maps"):
        with torch.no_grad():
            maps = model.forward_attention_maps(images)
        prefix = getattr(model, "num_prefix_tokens", 1)
        grid = tuple(getattr(model, "grid", None) or model.cfg.grid)
        return maps, prefix, grid
    if family in ("tnt", "rtnt"):
        return outer_attention_maps(model, images), 1, tuple(model.cfg.grid)
    raise ValueError(f"attention rollout needs one global attention over all patches (ViT, TNT, RTNT); "
                     f"{type(model).__name__} (family {family!r}) attends inside local blocks only. Use "
                     f"GradCAT, CAM or Grad-CAM for NesT")


def rollout(attentions: list[torch.Tensor], discard_ratio: float = 0.0) -> torch.Tensor:
    """Abnar & Zuidema's rollout ``R = A'_L ... A'_1`` with ``A' = rownorm(0.5 * mean_heads(A) + 0.5 * I)``.

    ``discard_ratio`` zeroes that fraction of the smallest head-averaged weights of each layer first
    (never the class token's attention to itself), as the common ViT implementations do. Returns the
    ``(B, T, T)`` product; each row sums to 1.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio}")
    result = None
    for a in attentions:
        a = a.float().mean(dim=1)  # (B, T, T)
        B, T, _ = a.shape
        if discard_ratio > 0:
            flat = a.reshape(B, T * T).clone()
            n = int(T * T * discard_ratio)
            idx = flat.topk(n, dim=1, largest=False).indices
            keep00 = idx == 0
            flat.scatter_(1, idx, 0.0)
            flat[:, 0] = torch.where(keep00.any(dim=1), a.reshape(B, -1)[:, 0], flat[:, 0])
            a = flat.reshape(B, T, T)
        eye = torch.eye(T, dtype=a.dtype, device=a.device)
        a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("the model returned no attention maps")
    return result


def attention_rollout(model: nn.Module, images: torch.Tensor, discard_ratio: float = 0.0, *,
                      upsample: bool = True) -> torch.Tensor:
    """Attention rollout map ``(B, H, W)``: the class token's rolled-out attention over the patches.

    Class-agnostic (attention does not depend on the class). Models without a class token use the
    mean row of the patch tokens.
    """
    model = explained(model, images, "attention_rollout")
    with _eval(model):
        attentions, prefix, (gh, gw) = _attention_maps(model, images)
    R = rollout(attentions, discard_ratio)  # (B, T, T)
    rows = R[:, 0, prefix:] if prefix > 0 else R[:, prefix:, prefix:].mean(dim=1)
    m = rows.reshape(-1, gh, gw).cpu()
    return upsample_map(m, tuple(images.shape[-2:])) if upsample else m
