"""Gradients of class logits with respect to the maps of ``forward_intermediates``, for any family.

The maps a model returns are *views* of its stage outputs (``x.permute(...)``, the patch tokens
``x[:, prefix:]`` reshaped) that the rest of the forward pass does not consume, so autograd cannot
differentiate the logits with respect to them directly. Instead, forward hooks on the modules that
``feature_info`` names (``levels.i`` / ``blocks.i``) capture the stage outputs ``y`` that *are* on the
path; the logits are differentiated with respect to ``y``, and the gradient is carried into the map's
layout with the map's own Jacobian: ``dY/dm = J_f (dY/dy)`` for ``m = f(y)`` a selection of ``y``'s
entries, computed as a Jacobian-vector product by double backward. If a model's maps are already on
the path, they are used directly.
"""

from __future__ import annotations

import torch
from torch import nn


def explained(model, images: torch.Tensor, method: str, *, internals: bool = True) -> nn.Module:
    """The classifier ``method`` explains (a ``nestvit.load`` result gives its ``.model``), after one clear error
    for images the model cannot take, or, with ``internals`` (its maps, gradients, attention), an export."""
    from ..contract import Loaded
    from ..export import OnnxModel

    if isinstance(model, Loaded):
        model = model.model
    if internals and isinstance(model, OnnxModel):
        raise TypeError(f"{method} needs the PyTorch model (its maps, gradients or attention); an exported model is "
                        "explained by nestvit.explain.occlusion (forward passes only), or load the run: "
                        "nestvit.load(RUN).model")
    check = getattr(model, "check_input", None)
    if check is not None:  # uint8 or wrongly shaped images: the model's own message, before any gradient
        check(images)
    return model


def _stage_modules(model: nn.Module) -> list[nn.Module] | None:
    """The modules ``feature_info`` names (one per intermediate map), or None if it names none."""
    names = [f.get("module") for f in (getattr(model, "feature_info", None) or [])]
    if not names or not all(names):
        return None
    try:
        return [model.get_submodule(n) for n in names]
    except AttributeError:
        return None


def _jvp(m: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``J g`` for ``m = f(y)``: the double-backward trick (``u = J^T v``, then ``d<u, g>/dv = J g``)."""
    v = torch.zeros_like(m, requires_grad=True)
    (u,) = torch.autograd.grad(m, y, v, create_graph=True, allow_unused=True)
    if u is None or not u.requires_grad:  # f does not depend on y, or is constant in v (cannot happen for views)
        return torch.zeros_like(m)
    (out,) = torch.autograd.grad(u, v, g)
    return out


def intermediate_gradients(model: nn.Module, images: torch.Tensor, choose_targets, *, only: list[int] | None = None,
                           features: bool = False):
    """Run ``forward_intermediates`` once and differentiate selected logits.

    ``choose_targets(logits) -> classes (B, K)``; one backward pass per column ``k`` (each backs up the
    sum over images of ``Y[b, classes[b, k]]``; images do not interact in eval mode). ``only``: indices
    of the maps to differentiate (default all). Returns ``(classes, logits, maps, grads)`` with
    ``grads[k][i]`` the gradient for map ``only[i]`` (zeros where the logit does not depend on it).
    ``features=True`` appends the (normalized) features of ``forward_intermediates`` and their gradient
    as one more map.
    The model is run in eval mode and put back into its previous mode.
    """
    was_training = model.training
    model.eval()
    captured: list[torch.Tensor] = []
    handles = []
    try:
        with torch.enable_grad():
            x = images.detach().clone().requires_grad_(True)  # keeps a graph even with frozen weights
            for mod in _stage_modules(model) or []:
                handles.append(mod.register_forward_hook(
                    lambda _m, _i, out: captured.append(out[0] if isinstance(out, (list, tuple)) else out)))
            feats, maps = model.forward_intermediates(x)
            for h in handles:
                h.remove()
            handles = []
            mods = captured if len(captured) == len(maps) else None
            logits = model.forward_head(feats)
            classes = choose_targets(logits.detach()).to(logits.device)
            if only is not None and not all(-len(maps) <= i < len(maps) for i in only):
                raise ValueError(f"map index {only} out of range: the model gives {len(maps)} intermediate maps")
            idx = list(range(len(maps))) if only is None else [i % len(maps) for i in only]
            sel_maps = [maps[i] for i in idx]
            # differentiate w.r.t. the stage outputs (on the path) when hooks caught them, else the maps
            wrt = [mods[i] if mods is not None else maps[i] for i in idx]
            if features:
                sel_maps.append(feats)
                wrt.append(feats)
            grads = []
            K = classes.shape[1]
            for k in range(K):
                selected = logits.gather(1, classes[:, k:k + 1]).sum()
                g_y = torch.autograd.grad(selected, wrt, retain_graph=True, allow_unused=True)
                gk = []
                for m, y, g in zip(sel_maps, wrt, g_y):
                    if g is None:
                        gk.append(torch.zeros_like(m))
                    elif y is m:
                        gk.append(g)
                    else:
                        gk.append(_jvp(m, y, g).detach())
                grads.append(gk)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return classes, logits.detach(), [m.detach() for m in sel_maps], grads
