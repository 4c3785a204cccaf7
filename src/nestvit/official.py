"""Parameters of the official JAX/Flax NesT (google-research/nested-transformer) in nestvit's ``Nest``.

``from_official(flat_params, **nest_config)`` builds the equivalent ``Nest`` (eval mode) from the official
model's Flax parameters, each keyed by its path in the Flax parameter tree joined with ``/``
(``EncoderNDBlock_3/MultiQueryAttention_0/Dense_0/kernel``); ``read_official_checkpoint(path)`` reads such a
dict from an official checkpoint file without JAX. Together::

    model = from_official(read_official_checkpoint("nest-b_imagenet/ckpt-39.flax"))

The architecture is read from the parameters' shapes: levels (one ``PositionEmbedding_i`` each), widths
and block size (the position embeddings, ``(1, blocks, block**2, C)``), heads (the query kernel), multi-query
or multi-head attention (the module's name), qkv bias, MLP ratio, patch size, input channels, classes, and
the layers per level (the encoder layers' widths; levels of equal width, as the CIFAR models, need
``depths=...``). Whatever cannot be seen in the parameters defaults to what the official code computes:
``act="gelu_tanh"`` (``flax.linen.gelu`` is the tanh form; timm's port of these weights uses the exact GELU),
``pool_pad="same"`` (``nn.max_pool(padding="SAME")``), LayerNorm eps 1e-6, conv -> LN -> max-pool block
aggregation on the image plane, no dropout. ``nest_config`` (``NestConfig`` keyword arguments) overrides any
of it; a value that contradicts the parameters (e.g. other heads) is an error, not a silently wrong model.

The mapping (official module path -> nestvit key; Flax kernels are ``(in, out)``, convs HWIO):

- ``PatchEmbedding_0/Conv_0`` -> ``patch_embed.proj`` (HWIO -> OIHW)
- ``PositionEmbedding_l/pos_embedding`` ``(1, T, N, C)`` -> ``levels.l.pos_embed`` as it is (both number blocks
  row-major over the block grid and tokens row-major inside a block)
- ``ConvPool_l/Conv_0``, ``ConvPool_l/LayerNorm_0`` (conv 3x3 SAME -> LN -> max-pool 3x3/2 SAME, after level
  ``l``) -> ``levels.(l+1).pool.conv`` / ``.pool.norm``
- ``EncoderNDBlock_k`` (numbered through all levels) -> ``levels.l.transformer_encoder.i``:
  ``LayerNorm_0`` / ``LayerNorm_1`` -> ``norm1`` / ``norm2``; ``MlpBlock_0/Dense_0`` / ``Dense_1`` ->
  ``mlp.fc1`` / ``mlp.fc2``; attention (``MultiQueryAttention_0`` or ``MultiHeadAttention_0``):
  query ``DenseGeneral_0`` kernel ``(C, H, D)`` -> the ``q`` rows ``h*D + d`` of the fused ``attn.qkv``;
  keys and values: multi-query ``Dense_0`` kernel ``(C, 2D)`` (``[k | v]``) or multi-head ``DenseGeneral_1``
  kernel ``(C, H, 2D)`` (per head ``[k_h | v_h]``) -> the ``k`` and ``v`` rows (``[q | k | v]``, heads
  outermost, see ``layers.Attention``); ``proj_kernel`` ``(H, D, C)`` and ``bias`` -> ``attn.proj`` (heads
  merged ``h*D + d``, as nestvit, so no permutation -- unlike timm's port).
- ``LayerNorm_0`` -> ``norm``; ``Dense_0`` -> ``head`` (after the mean over all tokens, as nestvit).

Every parameter must be used and every one the model needs must be there; otherwise one ``WeightsError``
lists what is missing and what is left over (BatchNorm / GroupNorm variants, ``norm_type != "LN"``, are not
supported).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models.nest import Nest, NestConfig

__all__ = ["from_official", "nest_state_from_official", "official_config_from_params", "read_official_checkpoint"]

# What the official code computes that the parameters cannot show.
OFFICIAL_DEFAULTS: dict[str, Any] = {"act": "gelu_tanh", "pool_pad": "same", "norm_eps": 1e-6,
                                     "aggregation": "conv_maxpool", "aggregation_plane": "image"}
# NestConfig fields the parameters determine: an override must agree with them.
_STRUCTURAL = ("in_chans", "num_classes", "patch_size", "num_levels", "embed_dims", "num_heads", "depths",
               "mlp_ratio", "qkv_bias", "attn")


def _error(message: str) -> Exception:
    from .interop import WeightsError  # imported here: interop re-exports this module at its end

    return WeightsError(message)


# ----------------------------------------------------------------------------------------------
# Parameters -> architecture
# ----------------------------------------------------------------------------------------------

def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, path + "/"))
        else:
            out[path] = v
    return out


def _as_tensors(flat_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Flat ``/`` paths -> tensors (numpy arrays and nested dicts accepted; a leading ``params/`` dropped)."""
    if not isinstance(flat_params, Mapping) or not flat_params:
        raise _error("official NesT parameters: expected a non-empty mapping of Flax parameter paths to arrays "
                     "(e.g. read_official_checkpoint(path))")
    flat = _flatten(flat_params)
    if all(k.startswith("params/") for k in flat):
        flat = {k[len("params/"):]: v for k, v in flat.items()}
    out = {}
    for k, v in flat.items():
        try:
            out[k] = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.array(v))  # a writable copy
        except Exception as e:  # noqa: BLE001 - one clear message for any leaf that is not an array
            raise _error(f"official NesT parameter {k!r} is not an array ({type(v).__name__}: {e}); "
                         "pass tensors or numpy arrays") from None
    return out


def _need(params: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    if key not in params:
        raise _error(f"official NesT parameters lack {key!r}: not parameters of the official NestNet "
                     f"(models/nest_net.py)? Their top-level modules are {_top_modules(params)}")
    t = params[key]
    if t.ndim != ndim:
        raise _error(f"official NesT parameter {key!r} has shape {tuple(t.shape)}, expected {ndim} dimensions; "
                     "is it a checkpoint of another model?")
    return t


def _top_modules(params: Mapping[str, Any]) -> list[str]:
    return sorted({k.split("/", 1)[0] for k in params})


def _numbered(params: Mapping[str, Any], module: str) -> int:
    """How many ``module_0, module_1, ...`` the top level has (checked to be consecutive)."""
    found = {int(m.group(1)) for k in params if (m := re.fullmatch(rf"{module}_(\d+)", k.split("/", 1)[0]))}
    if found != set(range(len(found))):
        raise _error(f"official NesT parameters: {module} modules are numbered {sorted(found)}, not 0..n-1; "
                     "is the checkpoint complete?")
    return len(found)


def _attention_module(params: Mapping[str, Any], k: int) -> str:
    prefix = f"EncoderNDBlock_{k}/"
    for name in ("MultiQueryAttention_0", "MultiHeadAttention_0"):
        if any(key.startswith(prefix + name + "/") for key in params):
            return name
    raise _error(f"official NesT parameters: EncoderNDBlock_{k} has no MultiQueryAttention_0 or "
                 "MultiHeadAttention_0 (local_multi_query / local_multi_head are the official attention types)")


def _infer_depths(widths: list[int], dims: tuple[int, ...]) -> tuple[int, ...]:
    """Split the encoder layers into levels by their widths (runs of one width, in level order)."""
    runs: list[list[int]] = []  # [width, count]
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1][1] += 1
        else:
            runs.append([w, 1])
    if len(dims) == 1:
        return (len(widths),)
    if any(a == b for a, b in zip(dims, dims[1:])):
        raise _error(f"official NesT parameters: levels of equal width {list(dims)} hold {len(widths)} encoder "
                     "layers, which their shapes cannot split into levels; pass depths=(...) (the official "
                     "num_layers_per_block, e.g. depths=(3, 3, 3, 3) for the CIFAR models)")
    if [w for w, _ in runs] != list(dims):
        raise _error(f"official NesT parameters: the encoder layers' widths {[w for w, _ in runs]} (in order) do "
                     f"not follow the levels' widths {list(dims)}; is the checkpoint complete?")
    return tuple(n for _, n in runs)


def official_config_from_params(params: Mapping[str, torch.Tensor], *, depths: Any = None) -> dict[str, Any]:
    """The ``NestConfig`` keyword arguments that the official parameters' shapes determine.

    ``img_size`` is the square image of level 0's block grid (``None`` if that grid is not square);
    ``depths`` (layers per level) is needed only when adjacent levels have the same width.
    """
    num_levels = _numbered(params, "PositionEmbedding")
    if num_levels == 0:
        raise _error(f"official NesT parameters: no PositionEmbedding_0/pos_embedding; top-level modules are "
                     f"{_top_modules(params)} -- not the official NestNet?")
    pos = [_need(params, f"PositionEmbedding_{i}/pos_embedding", 4) for i in range(num_levels)]
    dims = tuple(int(p.shape[-1]) for p in pos)
    tokens = {int(p.shape[2]) for p in pos}
    block = math.isqrt(next(iter(tokens)))
    if len(tokens) != 1 or block * block != next(iter(tokens)):
        raise _error(f"official NesT parameters: position embeddings {[tuple(p.shape) for p in pos]} do not hold "
                     "square blocks of one size")
    side = math.isqrt(int(pos[0].shape[1]))
    patch = _need(params, "PatchEmbedding_0/Conv_0/kernel", 4)
    if patch.shape[0] != patch.shape[1]:
        raise _error(f"official NesT parameters: the patch embedding kernel {tuple(patch.shape)} is not square")
    head = _need(params, "Dense_0/kernel", 2)

    n = _numbered(params, "EncoderNDBlock")
    if n == 0:
        raise _error("official NesT parameters: no EncoderNDBlock_0; is the checkpoint complete?")
    attn_names = [_attention_module(params, k) for k in range(n)]
    if len(set(attn_names)) != 1:
        raise _error("official NesT parameters mix multi-query and multi-head attention layers; nestvit's NesT "
                     "uses one kind throughout")
    widths, heads, hidden = [], [], []
    for k, name in enumerate(attn_names):
        q = _need(params, f"EncoderNDBlock_{k}/{name}/DenseGeneral_0/kernel", 3)  # (C, H, D)
        widths.append(int(q.shape[0]))
        heads.append(int(q.shape[1]))
        hidden.append(int(_need(params, f"EncoderNDBlock_{k}/MlpBlock_0/Dense_0/kernel", 2).shape[1]))
    if isinstance(depths, int):
        depths = (depths,) * num_levels
    depths = tuple(int(d) for d in depths) if depths is not None else _infer_depths(widths, dims)
    if sum(depths) != n or len(depths) != num_levels:
        raise _error(f"official NesT parameters hold {n} encoder layers in {num_levels} levels, but "
                     f"depths={list(depths)}; pass the checkpoint's num_layers_per_block")
    starts = [sum(depths[:i]) for i in range(num_levels)]
    for i, (s, d) in enumerate(zip(starts, depths)):
        if any(w != dims[i] for w in widths[s:s + d]):
            raise _error(f"official NesT parameters: with depths={list(depths)}, level {i}'s encoder layers have "
                         f"widths {widths[s:s + d]}, not its width {dims[i]}; pass the checkpoint's "
                         "num_layers_per_block as depths")
    level_heads = tuple(heads[s] for s in starts)
    if any(heads[s + j] != level_heads[i] for i, (s, d) in enumerate(zip(starts, depths)) for j in range(d)):
        raise _error(f"official NesT parameters: the number of heads changes inside a level ({heads})")
    ratios = {h / w for h, w in zip(hidden, widths)}
    if len(ratios) != 1:
        raise _error(f"official NesT parameters: MLP widths {hidden} are not one ratio of the layer widths")
    square = side * side == int(pos[0].shape[1])
    return dict(
        img_size=side * block * int(patch.shape[0]) if square else None, in_chans=int(patch.shape[2]),
        num_classes=int(head.shape[1]), patch_size=int(patch.shape[0]), num_levels=num_levels, block_size=block,
        embed_dims=dims, num_heads=level_heads, depths=depths, mlp_ratio=ratios.pop(),
        qkv_bias=f"EncoderNDBlock_0/{attn_names[0]}/DenseGeneral_0/bias" in params,
        attn="mqa" if attn_names[0] == "MultiQueryAttention_0" else "mha")


def _config(params: Mapping[str, torch.Tensor], nest_config: Mapping[str, Any]) -> NestConfig:
    unknown = sorted(set(nest_config) - set(NestConfig.__dataclass_fields__))
    if unknown:
        raise _error(f"from_official: {unknown} are not NestConfig fields; nest_config takes "
                     f"{', '.join(NestConfig.__dataclass_fields__)}")
    inferred = official_config_from_params(params, depths=nest_config.get("depths"))
    if inferred["img_size"] is None and "img_size" not in nest_config:
        raise _error("official NesT parameters: level 0's blocks do not form a square grid; pass img_size=(H, W)")
    try:
        img_size = nest_config.get("img_size", inferred["img_size"])
        own = NestConfig(**{**OFFICIAL_DEFAULTS, **inferred, "img_size": img_size})
        cfg = NestConfig(**{**OFFICIAL_DEFAULTS, **inferred, **nest_config})
        cfg.block_grid(cfg.num_levels - 1)  # the whole hierarchy fits the image size
    except ValueError as e:
        raise _error(f"from_official: {e}") from None
    conflicts = [f"{name}={getattr(cfg, name)!r} (the parameters say {getattr(own, name)!r})"
                 for name in _STRUCTURAL if getattr(cfg, name) != getattr(own, name)]
    if cfg.block != own.block:
        conflicts.append(f"block_size={cfg.block} (the parameters say {own.block})")
    if conflicts:
        raise _error("from_official: nest_config contradicts the official parameters: " + "; ".join(conflicts)
                     + ". Drop these overrides (they are read from the parameters) or load the matching checkpoint")
    return cfg


# ----------------------------------------------------------------------------------------------
# Parameters -> nestvit state dict
# ----------------------------------------------------------------------------------------------

class _Taker:
    """Takes parameters by path, remembering what is missing; ``left`` is what nobody took."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.left = dict(params)
        self.missing: list[str] = []

    def __call__(self, key: str) -> torch.Tensor | None:
        if key not in self.left:
            self.missing.append(key)
            return None
        return self.left.pop(key)


def _dense(take: _Taker, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    w, b = take(f"{src}/kernel"), take(f"{src}/bias")
    if w is not None:
        out[f"{dst}.weight"] = w.reshape(w.shape[0], -1).t()
    if b is not None:
        out[f"{dst}.bias"] = b.reshape(-1)


def _conv(take: _Taker, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    w, b = take(f"{src}/kernel"), take(f"{src}/bias")
    if w is not None:
        out[f"{dst}.weight"] = w.permute(3, 2, 0, 1)  # HWIO -> OIHW
    if b is not None:
        out[f"{dst}.bias"] = b


def _norm(take: _Taker, src: str, dst: str, out: dict[str, torch.Tensor]) -> None:
    w, b = take(f"{src}/scale"), take(f"{src}/bias")
    if w is not None:
        out[f"{dst}.weight"] = w
    if b is not None:
        out[f"{dst}.bias"] = b


def _attention(take: _Taker, src: str, dst: str, *, mqa: bool, bias: bool, out: dict[str, torch.Tensor]) -> None:
    """Query / key-value / projection of one official attention -> nestvit's fused ``qkv`` and ``proj``."""
    kv_src = f"{src}/Dense_0" if mqa else f"{src}/DenseGeneral_1"
    q, kv = take(f"{src}/DenseGeneral_0/kernel"), take(f"{kv_src}/kernel")  # (C, H, D); (C, 2D) or (C, H, 2D)
    qb = take(f"{src}/DenseGeneral_0/bias") if bias else None
    kvb = take(f"{kv_src}/bias") if bias else None
    proj, proj_b = take(f"{src}/proj_kernel"), take(f"{src}/bias")  # (H, D, C); (C,)
    if q is not None and kv is not None:
        C, D = q.shape[0], kv.shape[-1] // 2
        k, v = kv[..., :D], kv[..., D:]  # (C, [H,] D) each
        out[f"{dst}.qkv.weight"] = torch.cat([t.reshape(C, -1) for t in (q, k, v)], dim=1).t()
        if qb is not None and kvb is not None:
            out[f"{dst}.qkv.bias"] = torch.cat([qb.reshape(-1), kvb[..., :D].reshape(-1), kvb[..., D:].reshape(-1)])
    if proj is not None:
        out[f"{dst}.proj.weight"] = proj.reshape(-1, proj.shape[-1]).t()  # (C, H*D), input column h*D + d
    if proj_b is not None:
        out[f"{dst}.proj.bias"] = proj_b


def nest_state_from_official(params: Mapping[str, torch.Tensor], cfg: NestConfig) -> dict[str, torch.Tensor]:
    """The official parameters (flat ``/`` paths) as a nestvit ``Nest`` state dict for ``cfg``.

    Raises one ``WeightsError`` listing the parameters the model needs that are missing and those left over.
    """
    take = _Taker(params)
    out: dict[str, torch.Tensor] = {}
    _conv(take, "PatchEmbedding_0/Conv_0", "patch_embed.proj", out)
    k = 0
    for level in range(cfg.num_levels):
        pos = take(f"PositionEmbedding_{level}/pos_embedding")
        if pos is not None:
            out[f"levels.{level}.pos_embed"] = pos
        if level > 0:
            _conv(take, f"ConvPool_{level - 1}/Conv_0", f"levels.{level}.pool.conv", out)
            _norm(take, f"ConvPool_{level - 1}/LayerNorm_0", f"levels.{level}.pool.norm", out)
        for i in range(cfg.depths[level]):
            src, dst = f"EncoderNDBlock_{k}", f"levels.{level}.transformer_encoder.{i}"
            _norm(take, f"{src}/LayerNorm_0", f"{dst}.norm1", out)
            mqa = cfg.attn == "mqa"
            _attention(take, f"{src}/{'MultiQueryAttention_0' if mqa else 'MultiHeadAttention_0'}", f"{dst}.attn",
                       mqa=mqa, bias=cfg.qkv_bias, out=out)
            _norm(take, f"{src}/LayerNorm_1", f"{dst}.norm2", out)
            _dense(take, f"{src}/MlpBlock_0/Dense_0", f"{dst}.mlp.fc1", out)
            _dense(take, f"{src}/MlpBlock_0/Dense_1", f"{dst}.mlp.fc2", out)
            k += 1
    _norm(take, "LayerNorm_0", "norm", out)
    if cfg.num_classes > 0:
        _dense(take, "Dense_0", "head", out)
    if take.missing or take.left:
        parts = []
        if take.missing:
            parts.append(f"{len(take.missing)} missing (e.g. {take.missing[:3]})")
        if take.left:
            left = sorted(take.left)
            parts.append(f"{len(left)} left over (e.g. {left[:3]})")
        raise _error("official NesT parameters do not fit the architecture: " + "; ".join(parts)
                     + ". Is it a complete checkpoint of the official LayerNorm NestNet? Pass the NestConfig "
                       "overrides it was trained with (depths, num_classes, ...)")
    return out


def from_official(flat_params: Mapping[str, Any], **nest_config: Any) -> Nest:
    """The ``Nest`` (eval mode) equivalent to the official Flax NesT with these parameters.

    ``flat_params`` maps each Flax parameter path joined with ``/`` to a tensor or numpy array (what
    ``read_official_checkpoint`` returns); the architecture is read from their shapes, the rest defaults to
    the official code's (tanh GELU, TF-SAME max-pool padding; see the module docstring), and
    ``nest_config`` (``NestConfig`` fields) overrides it. Outputs match the official model's to float32
    precision.
    """
    from .interop import load_state_strict

    params = _as_tensors(flat_params)
    cfg = _config(params, nest_config)
    sd = nest_state_from_official(params, cfg)
    model = Nest(cfg)
    load_state_strict(model, sd, source="official NesT parameters")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Reading official checkpoints (flax.serialization's msgpack format) without JAX
# ----------------------------------------------------------------------------------------------

# flax.serialization's msgpack extension types
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32,
           "int64": torch.int64, "bool": torch.bool}


class _Array:
    """An array as flax stored it, decoded to a tensor only if it is a parameter (optimizer state is not)."""

    __slots__ = ("shape", "dtype", "data")

    def __init__(self, shape: list[int], dtype: str, data: bytes) -> None:
        self.shape, self.dtype, self.data = tuple(int(s) for s in shape), dtype, data

    def tensor(self) -> torch.Tensor:
        if self.dtype not in _DTYPES:
            raise _error(f"official checkpoint: arrays of dtype {self.dtype!r} are not supported "
                         f"(supported: {', '.join(_DTYPES)})")
        if not self.data:
            return torch.empty(self.shape, dtype=_DTYPES[self.dtype])
        flat = torch.frombuffer(bytearray(self.data), dtype=_DTYPES[self.dtype])  # a copy: writable
        return flat.reshape(self.shape)


def _ext_hook(code: int, data: bytes) -> Any:
    import msgpack

    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)  # (shape, dtype name, C-order bytes)
        return _Array(shape, dtype.decode() if isinstance(dtype, bytes) else dtype, buffer)
    return msgpack.ExtType(code, data)  # complex scalars and others: never parameters


def _leaf(x: Any, path: str) -> torch.Tensor:
    if isinstance(x, Mapping) and x.get("__msgpack_chunked_array__"):  # flax splits arrays over 1 GiB
        chunks = [x["chunks"][str(i)].tensor().reshape(-1) for i in range(len(x["chunks"]))]
        shape = [int(x["shape"][str(i)]) for i in range(len(x["shape"]))]
        return torch.cat(chunks).reshape(shape)
    if isinstance(x, _Array):
        return x.tensor()
    raise _error(f"official checkpoint: parameter {path!r} is a {type(x).__name__}, not an array")


def _flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and not v.get("__msgpack_chunked_array__"):
            out.update(_flat_params(v, path + "/"))
        else:
            out[path] = _leaf(v, path)
    return out


def _params_subtree(state: Any, path: Path) -> Mapping[str, Any]:
    """The parameter tree of a restored state dict: ``optimizer/target`` (flax.optim), ``params`` (TrainState)."""
    if not isinstance(state, Mapping):
        raise _error(f"{path}: not a Flax checkpoint (its msgpack content is a {type(state).__name__}, not a "
                     "state dict)")
    node: Any = None
    for keys in (("optimizer", "target"), ("params",), ("target",)):
        sub: Any = state
        for key in keys:
            sub = sub.get(key) if isinstance(sub, Mapping) else None
        if isinstance(sub, Mapping):
            node = sub
            break
    if node is None:
        if any(str(k).startswith(("PatchEmbedding_", "EncoderNDBlock_")) for k in state):
            node = state  # a bare parameter tree
        else:
            raise _error(f"{path}: no parameters under optimizer/target or params (its top-level keys are "
                         f"{sorted(map(str, state))[:8]}); is it a checkpoint of the official NesT?")
    while isinstance(node, Mapping) and set(node) == {"params"} and isinstance(node["params"], Mapping):
        node = node["params"]  # variables saved whole: {"params": {...}}
    return node


def _checkpoint_file(path: Path) -> Path:
    """A file as it is; in a directory the newest CLU ``ckpt-N.flax`` (or flax ``checkpoint_N``)."""
    if path.is_file():
        return path
    if not path.exists() and Path(f"{path}.flax").is_file():  # a CLU checkpoint prefix: .../ckpt-39
        return Path(f"{path}.flax")
    if path.is_dir():
        for pattern, regex in (("*.flax", r".*-(\d+)\.flax"), ("checkpoint_*", r"checkpoint_(\d+)")):
            found = [(int(m.group(1)) if (m := re.fullmatch(regex, p.name)) else -1, p.name, p)
                     for p in path.glob(pattern) if p.is_file()]
            if found:
                return max(found)[2]
        raise _error(f"{path}: no Flax checkpoint in this folder (expected CLU's ckpt-N.flax or flax's "
                     "checkpoint_N); pass the checkpoint file")
    raise _error(f"{path}: no such checkpoint file or folder")


def read_official_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters of an official NesT checkpoint as ``{flax path joined with "/": tensor}``, without JAX.

    ``path`` is a checkpoint file, a CLU checkpoint prefix (``.../ckpt-39`` for ``ckpt-39.flax``) or a folder
    (its newest ``ckpt-N.flax``, as Google's ``nest-{t,s,b}_imagenet``, or flax's ``checkpoint_N``). The file
    is a msgpack-serialised state dict in the format of ``flax.serialization`` (``to_bytes`` /
    ``msgpack_restore``): arrays are msgpack ExtType 1 (scalars ExtType 3) holding the msgpack-encoded tuple
    ``(shape, dtype name, C-order bytes)`` in the writer's (little-endian) byte order, and arrays over
    1 GiB are split into ``{"__msgpack_chunked_array__": True, "shape": ..., "chunks": ...}``. Written against
    the flax.serialization of flax 0.12 (the version of the official golden files); the official checkpoints
    were saved by flax 0.3.4 through CLU 0.0.3's ``Checkpoint`` (``ckpt-N.flax``), whose array encoding is
    the same (chunking is newer and simply absent there) -- not yet checked on a downloaded file. The
    weights are read from ``optimizer/target`` (flax.optim, the official checkpoints) or ``params``
    (``flax.training.train_state``); a bare parameter tree works too. Needs the ``msgpack`` package.
    """
    try:
        import msgpack
    except ImportError:
        raise _error("reading official Flax checkpoints needs the msgpack package: pip install msgpack "
                     "(the extra nestvit[official])") from None
    file = _checkpoint_file(Path(path))
    try:
        data = file.read_bytes()
        state = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 - one clear message for any unreadable file
        raise _error(f"{file}: cannot read a Flax msgpack checkpoint ({type(e).__name__}: {e}); is the file "
                     "truncated, or another format (a TensorFlow ckpt-N.index/.data file is not the weights: "
                     "pass the .flax file)?") from None
    params = _flat_params(_params_subtree(state, file))
    if not params:
        raise _error(f"{file}: the checkpoint holds no parameters")
    return params
