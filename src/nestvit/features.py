"""Backbones: a nestvit model as a list of feature maps, for detection and segmentation code (timm's interface).

    backbone = nestvit.create_model("nest_tiny_224", features_only=True, out_indices=(0, 1, 2))
    maps = backbone(images)                    # [(B, 96, 56, 56), (B, 192, 28, 28), (B, 384, 14, 14)]
    backbone.feature_info.channels()           # [96, 192, 384]
    backbone.feature_info.reduction()          # [4, 8, 16]: stride relative to the input

:class:`FeatureListNet` calls the model's ``forward_intermediates(x, indices=out_indices,
intermediates_only=True, stop_early=True)`` (what an intermediate is, per family, is in each model's
``forward_intermediates`` docstring: NesT's levels, ViT / TNT / RTNT's blocks, the conv net's stages) and
always returns NCHW maps, in index order. ``out_indices``: ``None`` every intermediate, an int ``n`` the
last ``n``, a list those (negative from the end), as ``forward_intermediates``'s ``indices``.
:class:`FeatureInfo` answers ``channels()``, ``reduction()`` and ``module_name()`` for them, as timm's.

The classifier head is dropped (``reset_classifier(0)``); weights are loaded before wrapping
(``create_model(name, weights=..., features_only=True)``), and the wrapped model is ``.model``, so its
parameters are ``model.<name>`` in the wrapper's state dict. Stages after the last requested index are not
run (their parameters get no gradient: with DistributedDataParallel, request the last one or use
``find_unused_parameters``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .layers import feature_indices


class FeatureInfo:
    """The model's ``feature_info`` (one dict per intermediate: ``num_chs``, ``reduction``, ``module``) and the
    ``out_indices`` a backbone returns; ``channels()`` / ``reduction()`` / ``module_name()`` list those, in order.

    ``idx`` picks among the returned maps (an int, or a list of ints); ``info[i]`` / ``len(info)`` index
    every intermediate of the model, as timm's ``FeatureInfo``.
    """

    def __init__(self, feature_info: Sequence[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [dict(f) for f in feature_info]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        """``key`` of every returned map (``idx=None``), of map ``idx``, or of the maps ``idx`` lists."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[self.out_indices[i]][key] for i in idx]
        return self.info[self.out_indices[idx]][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        """The dicts (only ``keys`` if given) of the returned maps, or of those ``idx`` picks."""
        picked = self.out_indices if idx is None else (
            [self.out_indices[i] for i in idx] if isinstance(idx, Sequence) else [self.out_indices[idx]])
        dicts = [dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys} for i in picked]
        return dicts if idx is None or isinstance(idx, Sequence) else dicts[0]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        """Channels of the returned maps (``num_chs``)."""
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        """Stride of the returned maps relative to the input (``reduction``)."""
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        """Names of the modules (in the wrapped model) whose outputs the returned maps are."""
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, channels={self.channels()}, reduction={self.reduction()})"


class FeatureListNet(nn.Module):
    """``model`` as a backbone: ``forward(x) -> [maps (B, C_i, H/r_i, W/r_i)]`` for ``out_indices``.

    ``norm=True`` passes ``norm`` to ``forward_intermediates`` (the final norm on the intermediates where the
    model has one). ``set_grad_checkpointing`` is the model's.
    """

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None, *,
                 norm: bool = False) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if not callable(getattr(model, "forward_intermediates", None)) or not info:
            raise ValueError(f"{type(model).__name__} has no forward_intermediates / feature_info: "
                             "features_only needs a classifier or the conv net")
        self.out_indices = tuple(feature_indices(len(info), out_indices))
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)  # a backbone has no classifier
        self.model = model
        self.norm = bool(norm)
        self.feature_info = FeatureInfo(info, self.out_indices)
        for attr in ("family", "img_size", "in_chans"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), norm=self.norm,
                                                output_fmt="NCHW", intermediates_only=True, stop_early=True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
