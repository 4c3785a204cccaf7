"""The one config system: typed frozen dataclasses read from a YAML recipe plus ``--set key=value``.

Every command that takes a recipe (``nestvit train``: ``nestvit.train.config.TrainConfig``; ``nestvit
generate train``: ``nestvit.generate.train.GanConfig``) goes through these functions:

- a recipe is a YAML mapping whose keys are the config's fields, nested sections are mappings, and its
  ``kind:`` key declares which command it is for (``classifier`` or ``gan``; the config class's ``KIND``);
- ``--set`` takes dotted keys of any depth (``optim.lr=1e-3``, ``model.overrides.depths=[1, 1]``,
  ``generator_overrides.embed_dims=[8, 8, 4]``), each value read as YAML;
- every key is checked against the dataclass fields and every value against the field's type hint;
  allowed values are declared once, as ``Literal`` types; every mistake is one :class:`ConfigError` that
  names the key and lists the valid ones (``valid_keys``: what ``--list-keys`` prints).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import numbers
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError, did_you_mean
from .fileio import atomic_write_text

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
KIND_KEY = "kind"
COMMANDS = {"classifier": "nestvit train", "gan": "nestvit generate train"}


class ConfigError(UserError, ValueError):
    """An unknown key, a value of the wrong type or an impossible combination in a config."""


def _derived(cls: type) -> dict[str, str]:
    """Keys a recipe cannot set because they are derived (``cls.DERIVED_KEYS``: key -> where it comes from)."""
    return getattr(cls, "DERIVED_KEYS", {})


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass, with type checks
# --------------------------------------------------------------------------------------------------

def valid_keys(cls: type, prefix: str = "", root: type | None = None) -> list[str]:
    """Every settable dotted key, e.g. ``["epochs", ..., "optim.lr", ...]`` (dict fields end in ``.*``)."""
    root = root or cls
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if prefix + f.name in _derived(root):
            continue
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, f"{prefix}{f.name}.", root)
        elif typing.get_origin(tp) is dict:
            keys.append(f"{prefix}{f.name}.*")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def key_table(cfg: Any) -> str:
    """Every key ``--set`` accepts with its value in ``cfg`` and its type, one a line, aligned:
    ``optim.lr  0.002  (float)``; what ``--list-keys`` prints for a recipe."""
    hints: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        for name, tp in typing.get_type_hints(cls).items():
            hints[prefix + name] = tp
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")

    walk(type(cfg), "")
    rows = []
    for key in valid_keys(type(cfg)):
        dotted = key.removesuffix(".*")
        value = cfg
        for part in dotted.split("."):
            value = getattr(value, part)
        shown = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").strip()
        rows.append((key, shown, _type_name(hints[dotted])))
    width = max(len(k) for k, _, _ in rows)
    vwidth = min(max(len(v) for _, v, _ in rows), 24)
    return "\n".join(f"{k:<{width}}  {v:<{vwidth}}  ({t})" for k, v, t in rows)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) is tuple:  # a list in YAML or on the command line
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is ...:
            return f"a list of {_type_name(args[0])}"
        return f"a list [{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and lightly converted to) the type hint ``tp``; ``ConfigError`` if it fails."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):  # numpy's integers too
            return int(value)
    elif tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(args) == 2 and args[1] is ...:
            value = [value]  # a scalar for a variable-length tuple, e.g. data.mean: 0.5
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is ...:
                return tuple(coerce(v, args[0], key) for v in value)
            if len(value) == len(args):
                return tuple(coerce(v, a, key) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    else:
        raise ConfigError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def check_choices(obj: Any, prefix: str = "") -> None:
    """Every ``Literal`` field of dataclass ``obj`` holds one of its values (for configs built in Python)."""
    for name, tp in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(tp) is typing.Literal and getattr(obj, name) not in typing.get_args(tp):
            raise ConfigError(f"{prefix}{name}: expected one of {', '.join(map(repr, typing.get_args(tp)))}, "
                              f"got {getattr(obj, name)!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None, root: type | None = None) -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types.

    Keys not given keep the value of ``base`` (default: the class defaults); a nested section starts
    from its field's default, so ``aug: {hflip: true}`` is the plain pipeline plus flips.
    """
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if prefix + name in _derived(root):
            raise ConfigError(f"{prefix}{name} cannot be set: it is taken from {_derived(root)[prefix + name]}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        bad = ", ".join(prefix + k for k in unknown)
        near = "".join(did_you_mean(prefix + k, valid_keys(cls, prefix, root)) for k in unknown)
        raise ConfigError(f"unknown key(s) {bad}{near}; valid keys: {', '.join(valid_keys(cls, prefix, root))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            default = getattr(base, name) if base is not None else fields[name].default_factory()
            kwargs[name] = from_dict(tp, value or {}, f"{prefix}{name}.", default, root)
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of builtins (tuples as lists) that ``from_dict`` reads back."""
    derived = _derived(type(cfg))

    def plain(v: Any, prefix: str = "") -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name), f"{prefix}{f.name}.") for f in dataclasses.fields(v)
                    if prefix + f.name not in derived}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


# --------------------------------------------------------------------------------------------------
# recipes and overrides
# --------------------------------------------------------------------------------------------------

def recipe_kind(raw: dict[str, Any]) -> str:
    """The ``kind`` a recipe declares (a recipe that declares none is a classifier recipe, as before kinds)."""
    kind = raw.get(KIND_KEY, "classifier")
    if kind not in COMMANDS:
        raise ConfigError(f"kind: expected one of {', '.join(map(repr, COMMANDS))}, got {kind!r}")
    return kind


def builtin_recipes(kind: str | None = None) -> dict[str, Path]:
    """Built-in recipe name -> file (``src/nestvit/recipes/*.yaml``), of one declared ``kind`` or all."""
    out = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        if isinstance(raw, dict) and (kind is None or raw.get(KIND_KEY, "classifier") == kind):
            out[path.stem] = path
    return out


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe (what it is for)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


RUN_CONFIG_FIX = ("the run's config is damaged; restore it from a copy (it is what the run was started with), or "
                  "start a new run")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (YAML would keep the last without a word:
    a second ``optim:`` section would drop every key of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (first at line {seen[key].line + 1}); merge the two",
                    key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _read_mapping(path: Path, run: bool = False) -> dict[str, Any]:
    """A recipe (or with ``run`` a run folder's config) as a dict: UTF-8 YAML, not empty, a mapping. One
    ``ConfigError`` otherwise, naming the problem and a fix that suits a recipe one writes, or with ``run`` a
    run's file one restores (never "write `{}`", which would resume the run with every default)."""
    what = "run config" if run else "recipe"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                          + (RUN_CONFIG_FIX if run else "save the recipe as UTF-8")) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e}); "
                          + (RUN_CONFIG_FIX if run else "fix the recipe there")) from None
    if raw is None:
        # An empty recipe (nothing but blanks and comments) would run every default without a word; it is
        # almost surely a mistake (a wrong or truncated file), so it is refused. `{}` still says "all defaults".
        raise ConfigError(f"{path}: the {what} is empty; " + (RUN_CONFIG_FIX if run else
                          "give at least one key (e.g. `epochs: 10`), or write `{}` to run with every default"))
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a {what} must be a mapping of keys to values"
                          + (f"; {RUN_CONFIG_FIX}" if run else ""))
    return raw


def read_recipe(recipe: str | Path, kind: str = "classifier") -> tuple[dict[str, Any], str]:
    """``(raw dict without its kind, name)`` of a recipe file path or a built-in recipe name of ``kind``."""
    path = Path(recipe)
    if not path.is_file():
        recipes = builtin_recipes(kind)
        name = path.stem if path.suffix in (".yaml", ".yml") and path.parent == Path(".") else str(recipe)
        if name not in recipes:
            other = builtin_recipes()
            if name in other:
                path = other[name]  # a built-in recipe of another kind: the kind check below says which command
            else:
                raise ConfigError(f"recipe {str(recipe)!r} is neither a file nor a built-in recipe"
                                  f"{did_you_mean(name, recipes)}; built-in {kind} recipes: {', '.join(recipes)}")
        else:
            path = recipes[name]
    raw = _read_mapping(path)
    declared = recipe_kind(raw)
    if declared != kind:
        if KIND_KEY not in raw:
            raise ConfigError(f"{path} declares no kind, so it is a classifier recipe for `nestvit train`; for "
                              f"`{COMMANDS[kind]}` add the line `kind: {kind}` to it")
        raise ConfigError(f"{path} is a {declared} recipe (kind: {declared}); run it with `{COMMANDS[declared]} "
                          f"{recipe}`")
    raw = {k: v for k, v in raw.items() if k != KIND_KEY}
    return raw, path.stem


def read_run_config(run_dir: str | Path, kind: str) -> dict[str, Any]:
    """The ``config.yaml`` of a run folder that ``--resume`` continues, without its kind.

    The errors speak of run folders: a folder with no config says what a run folder is, and a run of the
    other kind names the command that resumes it (not the one that would start a new run from its config)."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not run_dir.exists():
        raise ConfigError(f"{run_dir}: no such run folder (--resume continues a run in the folder it was trained in)")
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file; --resume takes the run folder it was trained in")
    if not path.is_file():
        when = ", e.g. while its feature network trained," if kind == "gan" else ""
        started = f" (a run stopped before its first step{when} has none yet: run the command that started it " \
            f"again, `{COMMANDS[kind]} RECIPE --out {run_dir}`)" if any(run_dir.iterdir()) else ""
        raise ConfigError(f"{run_dir}: no config.yaml; is it a `{COMMANDS[kind]}` run folder?{started}")
    raw = _read_mapping(path, run=True)
    # runs written before kinds existed name none: a GAN run's config has a generator
    declared = recipe_kind(raw) if KIND_KEY in raw else "gan" if "generator" in raw else "classifier"
    if declared != kind:
        said = f"says kind: {declared}" if KIND_KEY in raw else "has a generator" if declared == "gan" else \
            "has no generator"
        raise ConfigError(f"{run_dir} is a {declared} run (its config.yaml {said}); resume it with "
                          f"`{COMMANDS[declared]} --resume {run_dir}`")
    return {k: v for k, v in raw.items() if k != KIND_KEY}


def _takes_text(cls: type, key: str) -> bool:
    """Whether the field of dotted ``key`` accepts a string (``str``, ``str | None``); dict entries do not count."""
    tp: Any = cls
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return False
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return False
    return tp is str or str in typing.get_args(tp)


def apply_overrides(raw: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply ``["optim.lr=1e-3", "model.overrides.depths=[1, 1]"]`` to a nested dict (copied) for config ``cls``."""
    out = copy.deepcopy(raw)
    keys = valid_keys(cls)
    derived = _derived(cls)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key not in keys and not any(k.endswith(".*") and (key + ".").startswith(k[:-1]) for k in keys):
            if key in derived:
                raise ConfigError(f"{key} cannot be set: it is taken from {derived[key]}")
            near = did_you_mean(key, keys)
            raise ConfigError(f"unknown key {key!r} in --set {item}{near}; "
                              + ("--list-keys prints them all" if near else f"valid keys: {', '.join(keys)}"))
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            if not _takes_text(cls, key):  # a list, number or mapping that does not parse: never a silent string
                raise ConfigError(f"--set {key}: cannot read the value {text.strip()!r} "
                                  f"({getattr(e, 'problem', None) or 'not valid YAML'}); write a list as [1, 2], a "
                                  "mapping as {a: 1}, a string in quotes") from None
            value = text  # a string key (a path, a name): the text as it is
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping in the recipe")
            node = child
        node[parts[-1]] = value
    return out


def _dotted(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``: each leaf set on its own, as ``--set`` keys are."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    """A Python value as JSON (the YAML of ``--set``) takes it: tuples as lists, paths as strings."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def load(cls: type, recipe: str | Path | dict[str, Any] | None = None,
         overrides: Sequence[str] | Mapping[str, Any] | str = ()) -> Any:
    """A ``cls`` config from a recipe (path, built-in name, dict or None for defaults) and ``--set`` overrides:
    ``["epochs=3", "optim.lr=1e-3"]``, one such string, or a mapping ``{"epochs": 3, "optim.lr": 1e-3}``."""
    if isinstance(overrides, str):  # one override, not its characters one by one
        overrides = [overrides]
    elif isinstance(overrides, Mapping):  # {"optim.lr": 1e-3} or {"optim": {"lr": 1e-3}}
        overrides = [f"{k}={json.dumps(_plain(v))}" for k, v in _dotted(overrides).items()]
    elif not isinstance(overrides, (list, tuple)):
        raise ConfigError(f"overrides: give a list of 'key=value' strings, one such string or a mapping, not "
                          f"{type(overrides).__name__!r}")
    if recipe is None:
        raw: dict[str, Any] = {}
    elif isinstance(recipe, dict):
        raw = {k: v for k, v in recipe.items() if k != KIND_KEY}
    else:
        raw, _ = read_recipe(recipe, cls.KIND)
    return from_dict(cls, apply_overrides(raw, list(overrides), cls))


def dump(cfg: Any) -> str:
    """The YAML of a config, its ``kind`` first: what a run directory's ``config.yaml`` holds."""
    return yaml.safe_dump({KIND_KEY: type(cfg).KIND, **to_dict(cfg)}, sort_keys=False)


def save(cfg: Any, path: Path) -> None:
    atomic_write_text(path, dump(cfg))
