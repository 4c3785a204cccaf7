"""Forward FLOPs of a model, counted by ``torch.utils.flop_counter.FlopCounterMode``.

Conventions: a multiply-add is **2 FLOPs** (PyTorch's counter); papers that quote "FLOPs" for ViT,
DeiT or NesT usually mean multiply-adds, i.e. half of these numbers. Only matrix products and
convolutions are counted (linear layers, convolutions, attention's ``Q K^T`` and ``P V``); norms,
activations, softmax and pooling are not.

Attention: ``F.scaled_dot_product_attention`` on CPU dispatches to
``aten._scaled_dot_product_flash_attention_for_cpu``, which PyTorch (2.4 ... 2.13 at least) has no
formula for, so its FLOPs were silently dropped. Importing this module registers formulas (forward
and backward, via ``register_flop_formula``) for every fused SDPA kernel PyTorch leaves uncounted;
kernels PyTorch already counts (CUDA flash / efficient / cuDNN) are left alone, and the math path
decomposes into counted ``bmm`` calls. ``Q K^T`` costs ``2*B*H*Nq*Nk*D`` and ``P V`` ``2*B*H*Nq*Nk*Dv``
(causal masks are not discounted, as in PyTorch's own formulas).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = ["count_flops", "flops_by_operator", "attention_flops", "attention_backward_flops",
           "registered_attention_ops"]


def attention_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int]) -> int:
    """``Q K^T`` plus ``P V`` for ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``.

    K/V heads are broadcast over query heads (grouped / multi-query attention), so ``Hq`` counts.
    """
    *lead, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    bh = 1
    for s in lead:
        bh *= int(s)
    return 2 * bh * nq * nk * d + 2 * bh * nq * nk * dv


def attention_backward_flops(grad_shape: Sequence[int], q_shape: Sequence[int], k_shape: Sequence[int],
                             v_shape: Sequence[int]) -> int:
    """Backward of SDPA as PyTorch counts it: recompute ``Q K^T``, then ``dP = dO V^T``, ``dV = P^T dO``,
    ``dQ = dS K``, ``dK = dS^T Q`` (5 products; the math path's autograd does 4, without the recompute)."""
    *lead, nq, d = q_shape
    nk, dv = k_shape[-2], v_shape[-1]
    bh = 1
    for s in lead:
        bh *= int(s)
    return 2 * bh * nq * nk * (3 * d + 2 * dv)


def _forward_formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return attention_flops(query_shape, key_shape, value_shape)


def _backward_formula(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                      **kwargs) -> int:
    return attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape)


# fused SDPA kernels whose first arguments are (query, key, value) / (grad_out, query, key, value) in
# (B, H, N, D) layout
_FORWARD_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_fused_attention_overrideable",
                "_scaled_dot_product_attention_math_for_mps",
                "_scaled_dot_product_efficient_attention",
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_cudnn_attention")
_BACKWARD_OPS = ("_scaled_dot_product_flash_attention_for_cpu_backward",
                 "_scaled_dot_product_fused_attention_overrideable_backward",
                 "_scaled_dot_product_efficient_attention_backward",
                 "_scaled_dot_product_flash_attention_backward",
                 "_scaled_dot_product_cudnn_attention_backward")


def _aten_op(name: str):
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):  # not in this PyTorch build
        return None


def _register_attention_formulas() -> list[str]:
    """Register formulas for the SDPA kernels PyTorch does not count; returns the names registered."""
    added = []
    for names, formula in ((_FORWARD_OPS, _forward_formula), (_BACKWARD_OPS, _backward_formula)):
        for name in names:
            op = _aten_op(name)
            if op is None or op in flop_counter.flop_registry:
                continue
            register_flop_formula(op)(formula)
            added.append(name)
    return added


_ADDED = _register_attention_formulas()


def registered_attention_ops() -> list[str]:
    """The SDPA kernels whose formulas this module added (those PyTorch itself leaves uncounted)."""
    return list(_ADDED)


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _default_shape(model: nn.Module) -> tuple[int, ...]:
    img_size, in_chans = getattr(model, "img_size", None), getattr(model, "in_chans", None)
    if img_size is None or in_chans is None:
        raise ValueError(f"{type(model).__name__} has no img_size / in_chans; pass input_shape=(1, C, H, W)")
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    return (1, int(in_chans), int(h), int(w))


def _count(model: nn.Module, input_shape: Sequence[int] | None, dtype: torch.dtype,
           device: torch.device | str | None) -> tuple[FlopCounterMode, int]:
    shape = tuple(int(s) for s in (input_shape or _default_shape(model)))
    x = torch.zeros(shape, dtype=dtype, device=device if device is not None else _model_device(model))
    modes = {m: m.training for m in model.modules()}
    model.eval()  # inference FLOPs (a DeiT distilled model then also returns one tensor)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, training in modes.items():
            m.training = training
    return counter, shape[0]


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> int:
    """Forward FLOPs **per image** (multiply-add = 2) of ``model`` in eval mode, without gradients.

    ``input_shape`` defaults to ``(1, model.in_chans, *model.img_size)``. The input is made on
    ``device``, by default the model's device, so a model built under ``with torch.device("meta")``
    is counted without computing anything (fast; attention then runs the math path, which counts the
    same). Counts are exact for any batch (they are divided by it).
    """
    counter, batch = _count(model, input_shape, dtype, device)
    return counter.get_total_flops() // batch


def flops_by_operator(model: nn.Module, input_shape: Sequence[int] | None = None, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
                      ) -> dict[str, int]:
    """Per-image forward FLOPs split by ATen operator (``{"aten.addmm": ..., "aten.convolution": ...}``),
    largest first; the values sum to ``count_flops``."""
    counter, batch = _count(model, input_shape, dtype, device)
    per_op = counter.get_flop_counts().get("Global", {})
    items = sorted(((str(op), n // batch) for op, n in per_op.items() if n), key=lambda kv: (-kv[1], kv[0]))
    return dict(items)
