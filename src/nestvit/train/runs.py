"""A training config's model, and the run contract its weights files carry.

``build_model`` turns the config's model section into a model; ``run_contract`` describes what that
model is and how its input was prepared (``nestvit.contract``), so ``nestvit.load`` needs nothing else
to evaluate, predict or explain from a weights file copied out of its run directory.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..contract import InputTransform, RunContract
from ..data.datasets import DATASETS
from .config import DataSection, ModelSection


def build_model(section: ModelSection, *, num_classes: int, in_chans: int, img_size: tuple[int, int] | int,
                ) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, keyword arguments it was built with)``; ``section.overrides`` win over the data's sizes."""
    from ..registry import create_model

    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans,
                              "img_size": list(img_size) if isinstance(img_size, tuple) else img_size,
                              **section.overrides}
    return create_model(section.name, weights=section.weights, **kwargs), kwargs


def input_transform(data: DataSection, *, channels: int, size: tuple[int, int],
                    unpadded: tuple[int, int] | None) -> InputTransform:
    """How the run prepared its images: in-memory sets are resized (``resize_to``) and zero-padded (``pad_to``),
    image folders resized and centre-cropped."""
    folder = data.name in DATASETS and not DATASETS[data.name].in_memory
    return InputTransform(channels=channels, size=tuple(size), mean=tuple(data.mean), std=tuple(data.std),
                          resize="center-crop" if folder else "stretch",
                          content=tuple(unpadded) if data.pad_to and unpadded and not folder else None)


def run_contract(model_name: str, model_kwargs: dict[str, Any], *, classes: list[str], transform: InputTransform,
                 **info: Any) -> RunContract:
    """The contract written into every weights file of a run (``info``: data set, epoch, step, top-1)."""
    return RunContract(model=model_name, kwargs=dict(model_kwargs), kind="classifier", classes=tuple(classes),
                       transform=transform, info={k: v for k, v in info.items() if v is not None})
