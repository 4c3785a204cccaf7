"""A registry small enough to read in a minute: ``@register_model``, ``create_model``, ``list_models``.

An entry is a function ``name(**overrides) -> nn.Module`` that fills a config dataclass; overrides
(``num_classes``, ``img_size``, ``in_chans``, ``drop_path_rate``, ``attn``, ``act``, ...) replace fields
of that dataclass, and an unknown key is refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}

C = TypeVar("C")


def register_model(family: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("nest")`` registers the function under its own name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _MODELS[fn.__name__] = fn
        _FAMILY[fn.__name__] = family
        return fn

    return wrap


def build_config(cfg: C, overrides: dict[str, Any]) -> C:
    """``dataclasses.replace(cfg, **overrides)`` with a clear error for keys the config does not have."""
    names = [f.name for f in dataclasses.fields(cfg)]  # type: ignore[arg-type]
    bad = sorted(set(overrides) - set(names))
    if bad:
        raise TypeError(f"unknown option(s) {bad} for {type(cfg).__name__}; valid options: {', '.join(names)}")
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]


def _ensure_loaded() -> None:
    from . import models  # noqa: F401  (importing the package registers every family)


def list_models(pattern: str = "*", *, family: str | None = None) -> list[str]:
    """Registered names matching a shell pattern (``"nest_*"``), sorted; optionally one family only."""
    _ensure_loaded()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (family is None or _FAMILY[n] == family))


def model_family(name: str) -> str:
    _ensure_loaded()
    return _FAMILY[name]


def create_model(name: str, *, weights: str | Path | None = None, **overrides: Any) -> nn.Module:
    """Build a registered model; ``weights`` loads a nestvit safetensors file or a timm checkpoint."""
    _ensure_loaded()
    if name not in _MODELS:
        close = [n for n in _MODELS if n.split("_")[0] == name.split("_")[0]] or list(_MODELS)
        raise ValueError(f"unknown model {name!r}; did you mean one of: {', '.join(sorted(close))}?")
    model = _MODELS[name](**overrides)
    if weights is not None:
        from .interop import load_weights

        load_weights(model, weights)
    return model
