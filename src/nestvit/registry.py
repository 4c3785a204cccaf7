"""A registry small enough to read in a minute: ``@register_model``, ``create_model``, ``list_models``.

An entry is a function ``name(**overrides) -> nn.Module`` that fills a config dataclass; overrides
(``num_classes``, ``img_size``, ``in_chans``, ``drop_path_rate``, ``attn``, ``act``, ...) replace fields
of that dataclass (``build_config``): an unknown key is refused with the list of valid ones, and each value is
checked against its field's type and range (``check_values``).
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


class UnknownModelError(UserError, ValueError):
    """A model name the registry does not have."""


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
    cfg = dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]
    check_values(cfg)
    return cfg


# the ranges of the model configs' fields, by name (every family uses the same names for the same things)
_AT_LEAST_1 = ("in_chans", "out_chans", "patch_size", "num_levels", "depth", "latent_dim", "base_size", "block_size",
               "embed_dim", "embed_dims", "num_heads", "dims", "token_sizes", "channels", "widths", "img_size",
               "convs_per_block")
_AT_LEAST_0 = ("num_classes", "depths")
_POSITIVE = ("mlp_ratio", "mlp_ratios", "norm_eps")
_HEADS_OF = ("embed_dims", "embed_dim", "dims")  # widths that num_heads must divide, level by level


def check_values(cfg: Any) -> None:
    """``ModelOptionError`` for a value of a model config out of its field's range (a width of 0, a drop rate of
    2, heads that do not divide a width), naming the option."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    where = f"for {type(cfg).__name__}"

    def each(name: str) -> list[Any]:
        value = fields[name]
        return [] if value is None else list(value) if isinstance(value, (tuple, list)) else [value]

    for name in fields:
        values = each(name)
        if name in _AT_LEAST_1 and any(v < 1 for v in values):
            raise ModelOptionError(f"model option {name}={fields[name]!r} {where}: must be at least 1")
        if name in _AT_LEAST_0 and any(v < 0 for v in values):
            raise ModelOptionError(f"model option {name}={fields[name]!r} {where}: must not be negative")
        if name in _POSITIVE and any(v <= 0 for v in values):
            raise ModelOptionError(f"model option {name}={fields[name]!r} {where}: must be positive")
        if name.endswith("_rate") and any(not 0 <= v < 1 for v in values):
            raise ModelOptionError(f"model option {name}={fields[name]!r} {where}: a probability, in [0, 1)")
    for width in _HEADS_OF:
        if width in fields and "num_heads" in fields:
            dims, heads = each(width), each("num_heads")
            heads = heads * len(dims) if len(heads) == 1 else heads
            for level, (d, h) in enumerate(zip(dims, heads)):
                if d % h:
                    at = f" (level {level})" if len(dims) > 1 else ""
                    raise ModelOptionError(f"model options {width}={fields[width]!r} and num_heads="
                                           f"{fields['num_heads']!r} {where}: width {d}{at} is not divisible by {h} "
                                           "heads; choose widths that are multiples of the heads")


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
    for what, value, known in (("family", family, _FAMILY), ("kind", kind, _KIND)):
        if value is not None and value not in set(known.values()):
            raise UnknownModelError(f"unknown model {what} {value!r}; known: {', '.join(sorted(set(known.values())))}")
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern) and (family is None or _FAMILY[n] == family)
                  and (kind is None or _KIND[n] == kind))


def model_family(name: str) -> str:
    _ensure_loaded()
    return _FAMILY[name]


def model_kind(name: str) -> str:
    _ensure_loaded()
    return _KIND[name]


def _recorded(path: Path, name: str) -> tuple[str, dict[str, Any], Any] | None:
    """``(registry name, constructor arguments, run contract)`` a nestvit weights file records for model ``name``
    (as ``RunContract.build`` reads them: an older file's retired options too); None: another model or none."""
    from .contract import RunContract, _tuples
    from .interop import read_state_dict
    from .models.nest_variants import legacy_nest_kwargs

    if path.suffix != ".safetensors":
        return None
    contract = RunContract.from_metadata(read_state_dict(path, tensors=False)[1], source=str(path))
    if contract is None or contract.model != name:
        return None
    return (*legacy_nest_kwargs(contract.model, _tuples(dict(contract.kwargs))), contract)


def create_model(name: str, *, pretrained: bool | str | Path = False, weights: str | Path | None = None,
                 features_only: bool = False, out_indices: int | list[int] | tuple[int, ...] | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model; ``weights`` loads a nestvit safetensors file, a run folder's best weights, a
    ``save_pretrained`` folder (local or ``hf-hub:org/name``) or a timm checkpoint.

    ``pretrained`` starts from published weights (``nestvit.pretrained``): True (the tag in ``name``, as
    ``"nest_tiny_224.jx_in1k"``, else the model's first published file), a tag, a downloaded file, or your own
    run or ``save_pretrained`` folder (the architecture it records, as a published file's); they are
    downloaded once into the torch hub cache, checked and converted, and adapt to ``num_classes``,
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
        recorded = _recorded(path, name) if published is None else None  # a nestvit file of this model
        if recorded is not None:
            name, kwargs, contract = recorded
            overrides = {**kwargs, **overrides}  # its sizes and channels; what you override is adapted
        model = create_model(name, **overrides)
        model.adapt_notes = load_pretrained(model, published or path)
        if published is not None:
            model.registry_spec.update(transform=published.transform(model), classes=published.class_names(model),
                                       info={"pretrained": published.tag})
        elif recorded is not None:  # the run's input, where the model still takes it; its classes, same head
            if (t := contract.transform) is not None and t.channels == model.in_chans \
                    and t.size == tuple(model.img_size):
                model.registry_spec.update(transform=t)
            if contract.classes is not None and len(contract.classes) == getattr(model, "num_classes", None):
                model.registry_spec.update(classes=contract.classes)
        return _backbone(model, features_only, out_indices)
    _ensure_loaded()
    if not isinstance(name, str):
        raise UnknownModelError(f"create_model takes a model's name (a str, see nestvit.list_models()), not "
                                f"{type(name).__name__}")
    if name not in _MODELS and name.partition(".")[0] in _MODELS:  # a published tag's architecture (timm's way)
        name = name.partition(".")[0]
    if name not in _MODELS:
        import difflib

        close = [n for n in _MODELS if n.split("_")[0] == name.split("_")[0]] or \
            difflib.get_close_matches(name, list(_MODELS), n=6, cutoff=0.5)
        raise UnknownModelError(f"unknown model {name!r}; "
                                + (f"did you mean one of: {', '.join(sorted(close))}? " if close else "")
                                + "nestvit.list_models() lists the classifiers (`nestvit models`)")
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
