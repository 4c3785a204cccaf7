"""Weight interop with timm and safe weight loading.

``from_timm("Nest" | "TNT", timm_kwargs, state_dict)`` builds the equivalent nestvit model and loads a
timm state dict into it; ``load_weights(model, path)`` loads a nestvit safetensors file or a timm
checkpoint (``.pth``/``.bin`` through ``torch.load(weights_only=True)``, or ``.safetensors``), never
unpickling arbitrary objects. The official JAX/Flax NesT's parameters load through ``from_official`` and
``read_official_checkpoint`` (``nestvit.official``, re-exported here).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .models.nest import Nest, NestConfig


class WeightsError(UserError, ValueError):
    """A weights file that does not fit the model (wrong family, shapes or keys) or cannot be read."""


CHECKSUM_KEY = "nestvit.sha256"


def tensors_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: the weights' checksum."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# NesT
# ----------------------------------------------------------------------------------------------

def nest_config_from_timm(kw: Mapping[str, Any]) -> NestConfig:
    """Translate ``timm.models.nest.Nest`` constructor arguments to a ``NestConfig``."""
    kw = dict(kw)
    levels = kw.get("num_levels", 3)
    allowed = {"img_size", "in_chans", "patch_size", "num_levels", "embed_dims", "num_heads", "depths",
               "num_classes", "mlp_ratio", "qkv_bias", "drop_rate", "proj_drop_rate", "attn_drop_rate",
               "drop_path_rate", "pad_type", "global_pool", "weight_init", "norm_layer", "act_layer"}
    unknown = set(kw) - allowed
    if unknown:
        raise WeightsError(f"timm Nest arguments {sorted(unknown)} have no nestvit equivalent")
    if kw.get("global_pool", "avg") != "avg":
        raise WeightsError("only global_pool='avg' is supported for NesT")
    if kw.get("norm_layer") is not None or kw.get("act_layer") is not None:
        raise WeightsError("custom norm_layer / act_layer cannot be translated; nestvit uses LayerNorm(1e-6) and GELU")
    img = kw.get("img_size", 224)
    patch = kw.get("patch_size", 4)
    img = (img, img) if isinstance(img, int) else tuple(img)
    return NestConfig(
        img_size=img, in_chans=kw.get("in_chans", 3), num_classes=kw.get("num_classes", 1000), patch_size=patch,
        num_levels=levels, block_size=None, embed_dims=kw.get("embed_dims", (128, 256, 512)),
        num_heads=kw.get("num_heads", (4, 8, 16)), depths=kw.get("depths", (2, 2, 20)),
        mlp_ratio=kw.get("mlp_ratio", 4.0), qkv_bias=kw.get("qkv_bias", True), attn="mha", act="gelu",
        pool_pad="same" if kw.get("pad_type", "") == "same" else "symmetric",
        drop_rate=kw.get("drop_rate", 0.0), proj_drop_rate=kw.get("proj_drop_rate", 0.0),
        attn_drop_rate=kw.get("attn_drop_rate", 0.0), drop_path_rate=kw.get("drop_path_rate", 0.0))


def nest_state_from_timm(sd: Mapping[str, torch.Tensor], num_heads: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """timm NesT keys are nestvit's; only ``attn.proj.weight`` columns move from ``d*H + h`` to ``h*D + d``."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if k.endswith("attn.proj.weight") and v.ndim == 2 and len(parts) > 1 and parts[1].isdigit() \
                and int(parts[1]) < len(num_heads) and v.shape[1] % num_heads[int(parts[1])] == 0:
            H = num_heads[int(parts[1])]  # (a tensor that does not fit is left as it is: the load says so)
            D = v.shape[1] // H
            v = v.reshape(v.shape[0], D, H).transpose(1, 2).reshape(v.shape[0], H * D)
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------

def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrappers that checkpoints often carry: ``state_dict.``/``module.``/``_orig_mod.`` prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("state_dict.", "module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_state_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with one readable message listing what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with another shape (e.g. {shapes[:2]})")
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts)
                           + ". Is it a checkpoint of another model or size? Create the matching model "
                             "(see `nestvit models`) or pass the overrides it was trained with; to start from it "
                             "with another head, size or channel count: create_model(NAME, pretrained=PATH, ...) "
                             "adapts them.")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def from_timm(class_name: str, kwargs: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the nestvit model equivalent to ``timm.models.<class_name>(**kwargs)`` with its weights.

    Returns the model in eval mode; its logits match timm's to float32 precision.
    """
    sd = _strip(state_dict)
    if class_name == "Nest":
        cfg = nest_config_from_timm(kwargs)
        model: nn.Module = Nest(cfg)
        sd = nest_state_from_timm(sd, cfg.num_heads)
    elif class_name == "TNT":
        from .models.tnt import tnt_from_timm

        model, sd = tnt_from_timm(kwargs, sd)
    else:
        raise WeightsError(f"unsupported timm class {class_name!r}; nestvit converts 'Nest' and 'TNT'")
    load_state_strict(model, sd, source=f"timm {class_name} state dict")
    return model.eval()


def read_state_dict(path: str | Path, *, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``).

    A nestvit file's tensors are checked against the SHA-256 in its metadata; ``tensors=False`` reads
    only a safetensors file's metadata (``({}, metadata)``), unchecked.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder, not a weights file: give the file (e.g. {path / 'best.safetensors'}), "
                           "or read a run or save_pretrained folder with nestvit.load / "
                           "create_model(name, pretrained=FOLDER)")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    from .train.checkpoint import STATE_FILE

    if path.name == STATE_FILE and (path.parent / "config.yaml").is_file():  # a nestvit run's training state
        raise WeightsError(f"{path} is the run's training state (optimizer, random streams, step), not a model file: "
                           f"give the run folder, {path.parent}")
    if path.suffix.lower() in (".onnx", ".pt2"):  # an export: a program to run, not weights to load or train on
        raise WeightsError(f"{path} is an export (a program for onnxruntime or torch.export), not a weights file; "
                           f"use the run folder it was exported from ({path.parent}) or its .safetensors weights")
    meta: dict[str, str] = {}
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: not a weights file (empty); give a run folder, a .safetensors file or a PyTorch "
                           "state dict")
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
            if tensors and CHECKSUM_KEY in meta and tensors_sha256(sd) != meta[CHECKSUM_KEY]:
                raise WeightsError(f"{path}: the weights are damaged (their SHA-256 does not match the one recorded "
                                   "when they were saved); copy the file again or retrain")
            return sd, meta
        if not tensors:
            with open(path, "rb") as f:
                head = f.read(4)
            if head != b"PK\x03\x04" and head[:1] != b"\x80":  # neither a torch.save zip nor a legacy pickle
                raise WeightsError(f"{path}: not a weights file (neither safetensors nor a torch.save file); give a "
                                   "run folder, a .safetensors file or a PyTorch state dict")
            return {}, meta
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - one clear message for any unreadable file
        # torch's own text for a refused unpickling advises weights_only=False: never shown (nor followed) here
        why = "it holds objects other than tensors, or is no PyTorch file" if isinstance(e, pickle.UnpicklingError) \
            else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise WeightsError(f"{path}: cannot read weights ({why}). Expected a .safetensors file or a PyTorch state "
                           "dict of tensors saved with torch.save; is the file truncated?") from None
    for key in ("state_dict", "model", "state_dict_ema", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a mapping of parameter names to tensors")
    return obj, meta


def _is_safetensors(path: Path) -> bool:
    """A safetensors file under another suffix: 8-byte little-endian header length, then a JSON ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 31)


def save_weights(model: nn.Module, path: str | Path, *, metadata: Mapping[str, str] | None = None,
                 contract: Any = None, transform: Any = None, classes: Sequence[str] | None = None) -> Path:
    """Write ``model``'s weights as safetensors, atomically (temporary file, then rename).

    The metadata holds the run contract (``contract``, else -- unless ``metadata`` names a ``model`` itself --
    the one ``create_model`` recorded on the model, with ``transform``, a ``nestvit.contract.InputTransform``:
    how its inputs were prepared, and ``classes``, its class names; see ``nestvit.contract``) and a SHA-256 of
    the tensors that every load checks. A file without a transform is read as if its images were scaled to
    [-1, 1] (mean = std = 0.5).
    """
    from safetensors.torch import save_file

    from .contract import contract_of
    from .fileio import atomic_path

    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path} is a folder: save_weights writes one file (e.g. {path / 'model.safetensors'}); "
                           "nestvit.save_pretrained writes a folder")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if contract is None and "model" not in (metadata or {}):  # hand-written model metadata: read as it is
        given = {k: v for k, v in (("transform", transform), ("classes", tuple(classes) if classes else None))
                 if v is not None}
        contract = contract_of(model, **given)
    if contract is not None:
        _check_fits(model, contract, path)
    meta = {"format": "nestvit", "family": getattr(model, "family", ""),
            **(contract.to_metadata() if contract is not None else {}), **(metadata or {}),
            CHECKSUM_KEY: tensors_sha256(sd)}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    return path


def _check_fits(model: nn.Module, contract: Any, path: Path) -> None:
    """Refuse a contract that contradicts the model it is saved with: class names of another count, an input
    transform of another size or channel count (a later load would mislabel, or fail at the first image)."""
    n = getattr(model, "num_classes", None)
    if contract.classes is not None and isinstance(n, int) and len(contract.classes) != n:
        raise WeightsError(f"{path}: {len(contract.classes)} class names for a model of {n} classes; give one name "
                           "per output")
    t, chans, size = contract.transform, getattr(model, "in_chans", None), getattr(model, "img_size", None)
    if t is None or contract.kind != "classifier":
        return
    if isinstance(chans, int) and t.channels != chans:
        raise WeightsError(f"{path}: the input transform makes {t.channels}-channel images, the model takes {chans}; "
                           "give the transform the model was trained with")
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, tuple) and tuple(t.size) != size:
        raise WeightsError(f"{path}: the input transform makes {t.size[0]}x{t.size[1]} images, the model takes "
                           f"{size[0]}x{size[1]}; give the transform the model was trained with")


def _root_version(sd: Mapping[str, torch.Tensor]) -> int | None:
    """The ``_version`` of the module a state dict was taken from (``torch.save(model.state_dict())`` keeps it in
    ``_metadata``, also under a ``module.`` / ``_orig_mod.`` wrapper); None when the file does not say."""
    meta = getattr(sd, "_metadata", None) or {}
    for prefix in ("module._orig_mod", "module", "_orig_mod", ""):  # the wrapped model first, then the root
        if isinstance(meta.get(prefix), dict) and "version" in meta[prefix]:
            return meta[prefix]["version"]
    return None


def load_weights(model: nn.Module, path: str | Path, *, adapt: bool = False,
                 notes: list[str] | None = None, timm: bool = False) -> nn.Module:
    """Load nestvit weights (``save_weights``) or a timm checkpoint into ``model``.

    Files written by nestvit carry ``format=nestvit`` metadata and load as they are (their family must
    match), as does a ``torch.save`` of a nestvit NesT's ``state_dict()`` (its ``_version``, 2, says so);
    anything else is taken to be in timm's layout and converted. ``adapt=True`` (fine-tuning) lets
    weights of another class count, image size or channel count fit (``nestvit.adapt``); what it changed
    is appended to ``notes``. A NesT file that records neither (a bare state dict: timm's and nestvit's NesT
    share their key names) is read as timm's with a warning, unless ``timm=True`` says it is one.
    """
    sd, meta = read_state_dict(path)
    try:
        return _load_weights(model, path, sd, meta, adapt=adapt, notes=notes, timm=timm)
    except WeightsError as e:  # a file that records what it is: say what builds it
        if meta.get("format") != "nestvit" or not meta.get("model") or "does not fit" not in str(e):
            raise
        recorded = meta["model"]
        try:
            from .contract import CONTRACT_KEY, RunContract

            recorded += f" with {RunContract.from_json(meta[CONTRACT_KEY]).kwargs}"
        except Exception:  # noqa: BLE001 - an older file: its model name alone
            pass
        raise WeightsError(f"{e} The file records {recorded}: nestvit.load({str(path)!r}).model builds it as "
                           "saved") from None


def _load_weights(model: nn.Module, path: str | Path, sd: dict[str, torch.Tensor], meta: dict[str, str], *,
                  adapt: bool, notes: list[str] | None, timm: bool = False) -> nn.Module:
    own_nest = _root_version(sd) == getattr(model, "_version", 1) > 1  # a torch.save of nestvit's own NesT
    sd = _strip(sd)
    family = getattr(model, "family", "")
    if meta.get("format") == "nestvit":
        if meta.get("family") and family and meta["family"] != family:
            raise WeightsError(f"{path} holds a {meta['family']} model ({meta.get('model', '?')}), "
                               f"not a {family} model; create the model it was saved from")
    elif family == "nest" and not own_nest:
        if not timm and any(k.startswith("levels.") for k in sd):  # a NesT's keys, timm's or nestvit's: only the
            # attention projection's column order differs
            import warnings

            warnings.warn(f"{path} does not say whose layout it holds (no nestvit metadata): read as timm's NesT. "
                          "A state dict of nestvit's own NesT loads wrongly so; save those with "
                          "nestvit.interop.save_weights(model, path) or torch.save(model.state_dict()), which record "
                          "it (this one: model.load_state_dict(safetensors.torch.load_file(path)))", stacklevel=3)
        sd = nest_state_from_timm(sd, model.cfg.num_heads)
    elif family == "tnt":
        from .models.tnt import tnt_state_from_timm

        sd = tnt_state_from_timm(sd, model)
    if adapt:
        from .adapt import adapt_state_dict

        sd, changed = adapt_state_dict(model, sd)
        if notes is not None:
            notes.extend(changed)
    load_state_strict(model, sd, source=str(path))
    return model


from .official import from_official, read_official_checkpoint  # noqa: E402, F401
