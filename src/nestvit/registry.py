"""A registry small enough to read in a minute: ``@register_model``, ``create_model``, ``list_models``.

An entry is a function ``name(**overrides) -> nn.Module`` that fills a config dataclass; overrides
(``num_classes``, ``img_size``, ``in_chans``, ``drop_path_rate``, ``attn``, ``act``, ...) replace fields
of that dataclass, and an unknown key is refused with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from .errors import UserError, did_you_mean

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILY: dict[str, str] = {}
_KIND: dict[str, str] = {}
# classifier: the papers' families, which the generic test suite runs; baseline: a classifier outside them (the
# small conv net of distillation and of the FID features); generator / discriminator: the GAN's
KINDS = ("classifier", "baseline", "generator", "discriminator")

C = TypeVar("C")


class ModelOptionError(UserError, TypeError):
    """A keyword argument a model's config does not have (a ``TypeError``, as Python's own for unknown arguments)."""


def register_model(family: str, *, kind: str = "classifier", name: str | None = None,
                   ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``@register_model("nest")`` registers the function under its own name (or ``name``).

    ``kind`` tells classifiers (the default; ``list_models`` and the generic test suite) from the GAN's
    generators and discriminators, which ``create_model`` builds the same way.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or fn.__name__
        if key in _MODELS:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key], _FAMILY[key], _KIND[key] = fn, family, kind
        return fn

    return wrap


def build_config(cfg: C, overrides: dict[str, Any]) -> C:
    """``dataclasses.replace(cfg, **overrides)``, each value checked against its field's type (a list for a
    tuple is converted), with a clear error for keys the config does not have and values of the wrong type."""
    from .config import ConfigError, coerce

    names = [f.name for f in dataclasses.fields(cfg)]  # type: ignore[arg-type]
    bad = sorted(set(overrides) - set(names))
    if bad:
        near = "".join(did_you_mean(k, names) for k in bad)
        raise ModelOptionError(f"unknown option(s) {bad}{near} for {type(cfg).__name__}; valid options: "
                               f"{', '.join(names)}")
    hints = typing.get_type_hints(type(cfg))
    try:
        overrides = {k: coerce(v, hints[k], k) for k, v in overrides.items()}
    except ConfigError as e:
        raise ModelOptionError(f"model option {e} (for {type(cfg).__name__})") from None
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]


def _backbone(model: nn.Module, features_only: bool, out_indices: Any) -> nn.Module:
    if not features_only:
        return model
    from .features import FeatureListNet

    return FeatureListNet(model, out_indices)


def _ensure_loaded() -> None:
    from . import models  # noqa: F401  (importing the package registers every family)
    from .generate import models as _gan  # noqa: F401  (generators and discriminators)
    from .train import distill  # noqa: F401  (the small conv net of distillation and of the FID features)


def list_models(pattern: str = "*", *, family: str | None = None, kind: str | None = "classifier") -> list[str]:
    """Registered names matching a shell pattern (``"nest_*"``), sorted; one family and/or kind (None: all)."""
    _ensure_loaded()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (family is None or _FAMILY[n] == family)
                  and (kind is None or _KIND[n] == kind))


def model_family(name: str) -> str:
    _ensure_loaded()
    return _FAMILY[name]


def model_kind(name: str) -> str:
    _ensure_loaded()
    return _KIND[name]


def create_model(name: str, *, pretrained: bool | str | Path = False, weights: str | Path | None = None,
                 features_only: bool = False, out_indices: int | list[int] | tuple[int, ...] | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model; ``weights`` loads a nestvit safetensors file, a run folder's best weights, a
    ``save_pretrained`` folder (local or ``hf-hub:org/name``) or a timm checkpoint.

    ``pretrained`` starts from published weights (``nestvit.pretrained``): True (the tag in ``name``, as
    ``"nest_tiny_224.jx_in1k"``, else the model's first published file), a tag, or a downloaded file; they
    are downloaded once into the torch hub cache, checked and converted, and adapt to ``num_classes``,
    ``img_size`` and ``in_chans`` overrides (``model.adapt_notes`` says what changed).
    Any kind builds here: classifiers, the conv baseline, GAN generators and discriminators.
    ``features_only=True`` returns the model (weights loaded) as a backbone whose forward gives a list of
    NCHW maps, those of ``out_indices`` (``nestvit.features.FeatureListNet``; default: all).
    """
    if out_indices is not None and not features_only:
        raise ModelOptionError("out_indices selects the maps of a backbone: pass features_only=True with it")
    if pretrained is not False and pretrained is not None:
        if weights is not None:
            raise ModelOptionError("pass pretrained= or weights=, not both")
        from .pretrained import load_pretrained, resolve

        name, published, path = resolve(name, pretrained)
        if published is not None:
            overrides = {**published.kwargs, **overrides}
        model = create_model(name, **overrides)
        model.adapt_notes = load_pretrained(model, published or path)
        if published is not None:
            model.registry_spec.update(transform=published.transform(model), info={"pretrained": published.tag})
        return _backbone(model, features_only, out_indices)
    _ensure_loaded()
    if name not in _MODELS and name.partition(".")[0] in _MODELS:  # a published tag's architecture (timm's way)
        name = name.partition(".")[0]
    if name not in _MODELS:
        close = [n for n in _MODELS if n.split("_")[0] == name.split("_")[0]] or list(_MODELS)
        raise ValueError(f"unknown model {name!r}; did you mean one of: {', '.join(sorted(close))}?")
    model = _MODELS[name](**overrides)
    # what built it: nestvit.interop.save_weights writes this into the file's run contract
    model.registry_spec = {"model": name, "kwargs": dict(overrides)}
    if weights is not None:
        from .contract import HUB_PREFIX, resolve_weights
        from .interop import load_weights

        if str(weights).startswith(HUB_PREFIX) or Path(weights).is_dir():  # a run or save_pretrained folder
            weights = resolve_weights(weights)
        load_weights(model, weights)
    return _backbone(model, features_only, out_indices)
