"""Models from a training config, and trained models back from a run directory or a weights file.

Every ``.safetensors`` a run writes carries, in its metadata, the model name and the exact keyword
arguments it was built with, the class names and the input normalisation; ``load_trained`` needs
nothing else, so a weights file copied out of its run directory still evaluates and predicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config import ModelSection, TrainConfig

WEIGHT_FILES = ("best", "last", "ema")


def build_model(section: ModelSection, *, num_classes: int, in_chans: int, img_size: tuple[int, int] | int,
                ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, keyword arguments it was built with)``; ``section.overrides`` win over the data's sizes."""
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans,
                              "img_size": list(img_size) if isinstance(img_size, tuple) else img_size,
                              **section.overrides}
    return create(section.name, kwargs, weights=section.weights), kwargs


def create(name: str, kwargs: dict[str, Any], *, weights: str | Path | None = None) -> nn.Module:
    """``create_model(name, **kwargs)``, where ``name="convnet"`` is ``distill.SmallConvNet``."""
    if name == "convnet":
        from ..interop import load_weights
        from .distill import SmallConvNet

        model: nn.Module = SmallConvNet(**kwargs)
        if weights is not None:
            load_weights(model, weights)
        return model
    from ..registry import create_model

    return create_model(name, weights=weights, **kwargs)


def weights_metadata(model_name: str, model_kwargs: dict[str, Any], *, classes: list[str], mean: tuple, std: tuple,
                     pad_to: int | None, **extra: Any) -> dict[str, str]:
    """String metadata stored in every weights file of a run (see ``load_trained``)."""
    meta = {"model": model_name, "model_kwargs": json.dumps(model_kwargs), "classes": json.dumps(classes),
            "mean": json.dumps(list(mean)), "std": json.dumps(list(std)), "pad_to": json.dumps(pad_to)}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    return meta


@dataclass
class Trained:
    """A trained model ready for inference, and how to feed it."""

    model: nn.Module
    weights: Path
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pad_to: int | None = None  # the training images were zero-padded to this size ...
    unpadded: tuple[int, int] | None = None  # ... from this (H, W)
    resize_to: int | None = None  # the stored training images were resized to this size first
    config: TrainConfig | None = None  # the run's config, when the weights sit in a run directory
    metadata: dict[str, str] = field(default_factory=dict)


def resolve_weights(checkpoint: str | Path, which: str = "best") -> Path:
    """A weights file: ``checkpoint`` itself, or ``<run dir>/<which>.safetensors`` (``best`` falls back to ``last``)."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory or weights file")
    if which not in WEIGHT_FILES:
        raise ValueError(f"unknown weights {which!r}; choose one of {', '.join(WEIGHT_FILES)}")
    order = [which, "last"] if which == "best" else [which]
    for name in order:
        candidate = path / f"{name}.safetensors"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {which}.safetensors; is it a nestvit run directory that reached its "
                            "first checkpoint?")


def load_trained(checkpoint: str | Path, which: str = "best") -> Trained:
    """The model of a run directory or a run's ``.safetensors`` file, with its classes and normalisation."""
    from safetensors import safe_open

    from ..interop import WeightsError, load_weights
    from .config import load_config

    weights = resolve_weights(checkpoint, which)
    try:
        with safe_open(str(weights), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"{weights}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if "model" not in meta or "model_kwargs" not in meta:
        raise WeightsError(f"{weights}: no model metadata; it was not written by `nestvit train` (build the model "
                           "with nestvit.create_model and load it with nestvit.interop.load_weights)")
    model = create(meta["model"], json.loads(meta["model_kwargs"]))
    load_weights(model, weights)
    config_file = weights.parent / "config.yaml"
    config = load_config(config_file) if config_file.is_file() else None
    return Trained(model=model.eval(), weights=weights, classes=json.loads(meta["classes"]),
                   mean=tuple(json.loads(meta["mean"])), std=tuple(json.loads(meta["std"])),
                   pad_to=json.loads(meta.get("pad_to", "null")), unpadded=_pair(meta.get("unpadded")),
                   resize_to=json.loads(meta.get("resize_to", "null")), config=config, metadata=meta)


def _pair(text: str | None) -> tuple[int, int] | None:
    value = json.loads(text) if text else None
    return tuple(value) if value else None
