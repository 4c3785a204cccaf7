"""Building blocks shared by every nestvit model.

Attention folds any leading block/patch dimensions into the batch, so a NesT level with ``T`` blocks
or a TNT inner transformer over ``N`` patches is one attention call, never a Python loop. It runs
through ``F.scaled_dot_product_attention`` except for short sequences on the CPU (see ``attend``).
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def to_2tuple(x: int | Sequence[int]) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(4, 6) -> (4, 6)``."""
    if isinstance(x, int):
        return (x, x)
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"expected an int or a pair (height, width), got {x!r}")
    return t  # type: ignore[return-value]


def make_act(name: str) -> nn.Module:
    """``gelu`` (exact, erf), ``gelu_tanh`` (the tanh approximation, as JAX's default), ``relu``, ``silu``."""
    acts = {
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "relu": lambda: nn.ReLU(),
        "silu": lambda: nn.SiLU(),
    }
    if name not in acts:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(acts)}")
    return acts[name]()


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Linear stochastic-depth schedule from 0 to ``rate`` over all layers, split per stage."""
    total = sum(depths)
    flat = [rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for d in depths:
        out.append(flat[start:start + d])
        start += d
    return out


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p`` (training only)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ``attend`` computes attention explicitly on the CPU when the (batch, heads, queries, keys) score tensor
# is at most this large, and the sequence is short or the dtype is reduced (bfloat16 / float16).
SMALL_SCORES_BYTES = 16 * 2**20
SHORT_SEQUENCE = 128
# A runtime setting, not part of any model: "auto" (the rule below), "sdpa" everywhere, which export
# uses (the rule depends on the batch size, so it would fix an exported graph's batch), or "explicit"
# everywhere: the scores materialised as ``softmax(q k^T) v``, as TransGAN's and most research code
# computes attention (what the NesT paper's generator speed comparison ran against).
ATTENTION_KERNELS = ("auto", "sdpa", "explicit")
_KERNEL = {"mode": "auto"}


@contextlib.contextmanager
def attention_kernel(mode: str) -> Iterator[None]:
    """``with attention_kernel("sdpa"): ...`` runs every ``attend`` on ``F.scaled_dot_product_attention``;
    ``"explicit"`` on two batched products and a softmax (the scores materialised); ``"auto"`` chooses."""
    if mode not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {mode!r}")
    previous, _KERNEL["mode"] = _KERNEL["mode"], mode
    try:
        yield
    finally:
        _KERNEL["mode"] = previous


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` over the last two axes: ``q (..., Nq, D)``, ``k, v (..., Nk, D)``.

    ``q``, ``k`` and ``v`` have the same leading axes (batch, heads). Usually this is
    ``F.scaled_dot_product_attention``. On the CPU, short sequences (NesT's 16-token blocks, TNT's 16
    words, RTNT's 4 letters, ViT's 65 tokens at 32x32) and bfloat16 are instead computed explicitly --
    two batched matrix products and a softmax -- as long as the scores stay small. Why: PyTorch's fused
    CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) spends such short sequences on its
    per-(batch, head) tiling rather than on arithmetic, and its bfloat16 backward is slow; measured on
    a 2-core Zen 5 with torch 2.13 the explicit form is 1.3-2x faster in float32 and 3-8x faster in
    bfloat16 (``docs/benchmarks.md``). For long float32 sequences the fused kernel is as fast or faster
    and never materialises the scores, so it is kept there, and on every GPU. Both agree to rounding.
    """
    explicit = _KERNEL["mode"] == "explicit"
    if _KERNEL["mode"] == "auto" and q.device.type == "cpu":
        scores_bytes = q.shape[:-1].numel() * k.shape[-2] * q.element_size()  # of the scores (..., Nq, Nk)
        explicit = scores_bytes <= SMALL_SCORES_BYTES and (k.shape[-2] <= SHORT_SEQUENCE or q.dtype != torch.float32)
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    # 3-D batched products (torch.matmul on 4-D inputs with one head trips an Inductor bug in torch 2.13)
    *lead, Nq, D = q.shape
    q, k, v = q.reshape(-1, Nq, D), k.reshape(-1, *k.shape[-2:]), v.reshape(-1, *v.shape[-2:])  # (L, N, D)
    attn = torch.bmm(q, k.transpose(1, 2)).mul_(D ** -0.5).softmax(dim=-1)  # (L, Nq, Nk)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p)
    o = torch.bmm(attn.to(v.dtype), v)  # softmax runs in float32 under autocast; the product in v's dtype
    return o.reshape(*lead, Nq, v.shape[-1])


def split_qkv(qkv: torch.Tensor, num_heads: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused ``qkv`` projection ``(B, N, (H + 2 kv) D)`` as heads: ``q (B, H, N, D)``, ``k, v (B, kv, N, D)``.

    The layout is ``[q (H*D) | k (kv*D) | v (kv*D)]`` with heads outermost inside each part (timm's ViT);
    ``kv = 1`` is multi-query attention (one K/V head, which broadcasts over the query heads). Views, no copy.
    """
    B, N, width = qkv.shape
    D = width // (num_heads + 2 * kv_heads)
    q, k, v = qkv.split([num_heads * D, kv_heads * D, kv_heads * D], dim=-1)
    return (q.reshape(B, N, num_heads, D).transpose(1, 2), k.reshape(B, N, kv_heads, D).transpose(1, 2),
            v.reshape(B, N, kv_heads, D).transpose(1, 2))


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D))``, ``q (B, H, Nq, D)``, ``k (B, H or 1, Nk, D)`` -> ``(B, H, Nq, Nk)``, written
    out for explanations (attention rollout, ViT's attention maps); the forward pass runs ``attend``."""
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention over the last-but-one axis of ``(..., N, C)``.

    ``kv_heads=1`` gives multi-query attention (one shared K/V head, as NesT's CIFAR models); it is
    computed as one single-head attention whose queries are all heads' queries stacked token-major
    (row ``n * H + h``), which is exact, uses larger matrix products than repeating K/V per head, and
    leaves the output already in ``(B', N, C)`` order.
    The fused ``qkv`` weight is laid out ``[q (C) | k (kv_heads*D) | v (kv_heads*D)]`` with heads
    outermost inside each part, as timm's ViT; outputs of heads are merged ``h * D + d`` before ``proj``.
    """

    def __init__(self, dim: int, *, num_heads: int, kv_heads: int | None = None, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        kv_heads = num_heads if kv_heads is None else kv_heads
        if kv_heads not in (1, num_heads):
            raise ValueError(f"kv_heads must be 1 (multi-query) or num_heads ({num_heads}), got {kv_heads}")
        self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim + 2 * kv_heads * self.head_dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, N, C = x.shape
        x = x.reshape(-1, N, C)  # (B', N, C): blocks / patches folded into the batch
        q, k, v = split_qkv(self.qkv(x), self.num_heads, self.kv_heads)  # q (B', H, N, D); k, v (B', kv, N, D)
        drop = self.attn_drop if self.training else 0.0
        if self.kv_heads == 1:
            # every head's query is a row of one single-head attention; stacked token-major (row n*H + h),
            # the output (B', N*H, D) is already (B', N, C) with heads merged h*D + d
            q = q.transpose(1, 2).reshape(x.shape[0], 1, N * self.num_heads, self.head_dim)  # (B', 1, N*H, D)
            o = attend(q, k, v, drop)  # (B', 1, N*H, D)
        else:
            o = attend(q, k, v, drop).transpose(1, 2)  # (B', N, H, D)
        o = o.reshape(*lead, N, C)
        return self.proj_drop(self.proj(o))


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> fc2 -> drop`` on the last axis."""

    def __init__(self, dim: int, *, hidden: int, act: str = "gelu", drop: float = 0.0,
                 out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, each with DropPath."""

    def __init__(self, dim: int, *, num_heads: int, mlp_ratio: float = 4.0, kv_heads: int | None = None,
                 qkv_bias: bool = True, act: str = "gelu", norm_eps: float = 1e-6, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, kv_heads=kv_heads, qkv_bias=qkv_bias,
                              attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden=int(dim * mlp_ratio), act=act, drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(model: nn.Module, *, std: float = 0.02) -> None:
    """Truncated-normal (+-2 std) init for Linear/Conv weights, zero biases, unit LayerNorm (timm/JAX ViT)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------
# Backbone interface (timm's): intermediates, their layouts, gradient checkpointing
# --------------------------------------------------------------------------------------------------

OUTPUT_FORMATS = ("NCHW", "NLC")


def feature_indices(count: int, indices: int | Sequence[int] | None) -> list[int]:
    """Which of ``count`` intermediates to take, as sorted distinct indices from 0 (timm's meaning).

    ``None``: all; an int ``n``: the last ``n``; a sequence: those (negative from the end). Anything out
    of range is a ``ValueError`` naming the valid range.
    """
    if indices is None:
        return list(range(count))
    if not isinstance(indices, Sequence) or isinstance(indices, str):
        try:
            if isinstance(indices, bool):
                raise TypeError
            n = operator.index(indices)
        except TypeError:
            raise ValueError(f"indices must be None, an int (the last n) or a list of indices, got {indices!r}") \
                from None
        if not 0 < n <= count:
            raise ValueError(f"indices={n}: the last n must be between 1 and {count} (the model has "
                             f"{count} intermediates)")
        return list(range(count - n, count))
    out = set()
    for item in indices:
        try:
            i = operator.index(item)  # ints (numpy's too), not floats
        except TypeError:
            i = count  # out of range below
        if not -count <= i < count:
            raise ValueError(f"intermediate index {item!r} is out of range: the model has {count} intermediates "
                             f"(0 to {count - 1}, or -{count} to -1 from the end)")
        out.add(i % count)
    if not out:
        raise ValueError("indices is an empty list: name at least one intermediate")
    return sorted(out)


def intermediate_plan(count: int, indices: int | Sequence[int] | None, output_fmt: str, *,
                      intermediates_only: bool, stop_early: bool) -> tuple[list[int], int]:
    """``(indices to take, index of the last stage to run)`` for a ``forward_intermediates`` call; checks its
    arguments."""
    if output_fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
    if stop_early and not intermediates_only:
        raise ValueError("stop_early=True skips the stages after the last intermediate, so the final features "
                         "do not exist: use it with intermediates_only=True")
    take = feature_indices(count, indices)
    return take, (take[-1] if stop_early else count - 1)


def nhwc_as(x: torch.Tensor, output_fmt: str) -> torch.Tensor:
    """A channels-last map ``(B, H, W, C)`` as ``NCHW`` (a view) or ``NLC`` tokens ``(B, H*W, C)``, row-major."""
    return x.permute(0, 3, 1, 2) if output_fmt == "NCHW" else x.flatten(1, 2)


def tokens_as(x: torch.Tensor, grid: tuple[int, int], output_fmt: str) -> torch.Tensor:
    """Row-major tokens ``(B, gh*gw, C)`` as ``NCHW`` ``(B, C, gh, gw)`` (a view) or unchanged (``NLC``)."""
    if output_fmt == "NLC":
        return x
    return x.transpose(1, 2).reshape(x.shape[0], -1, *grid)


class _Recompute(threading.local):
    active = False


_RECOMPUTE = _Recompute()


def recomputing() -> bool:
    """True while ``checkpoint_call`` re-runs a forward pass during backward.

    A module with a side effect besides its output (BatchNorm updating its running statistics) checks it
    so that the side effect happens once per step, as without checkpointing.
    """
    return _RECOMPUTE.active


def checkpoint_call(fn: Callable[..., Any], *args: Any, enabled: bool) -> Any:
    """``fn(*args)``; with ``enabled`` (and autograd recording), through ``torch.utils.checkpoint``
    (non-reentrant): the activations inside ``fn`` are not kept but recomputed in backward.

    The recomputation replays the same random numbers (dropout, stochastic depth), so outputs and
    gradients are those without checkpointing; ``recomputing()`` is True during it.
    """
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    if torch.compiler.is_compiling():  # the compiled graph recomputes by itself; no Python re-run to mark
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    calls = 0

    def run(*inputs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            return fn(*inputs)
        previous, _RECOMPUTE.active = _RECOMPUTE.active, True
        try:
            return fn(*inputs)
        finally:
            _RECOMPUTE.active = previous

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


def run_layers(layers: nn.Module, x: torch.Tensor, *, checkpoint: bool) -> torch.Tensor:
    """``layers(x)``; with ``checkpoint``, every layer of an ``nn.Sequential`` through ``checkpoint_call`` (any
    other module as one)."""
    if not checkpoint:
        return layers(x)
    for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
        x = checkpoint_call(layer, x, enabled=True)
    return x


def check_images(x: Any, name: str, in_chans: int | None, img_size: Sequence[int] | None,
                 dtype: torch.dtype | None = None) -> None:
    """One clear error for what a classifier ``name`` cannot take: not a float tensor ``(B, in_chans, H, W)`` of
    ``img_size`` (None: any channels, any size); ``dtype``: the float type it computes in (None: any)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} takes a torch tensor (B, C, H, W), not a {type(x).__name__}; images (files, PIL "
                        "images, arrays): nestvit.load(RUN).transform.read_batch(images), then .transform(batch)")
    if not x.is_floating_point():
        raise TypeError(f"{name} takes normalised float images, not {x.dtype}; uint8 images: normalise them first "
                        "(nestvit.load(RUN).transform(images) does it as in training)")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} computes in {dtype}, the images are {x.dtype}: convert them with .to({dtype})")
    if x.ndim != 4:
        one = "; one image: add the batch dimension, x[None]" if x.ndim == 3 else ""
        raise ValueError(f"{name} expects images (B, C, H, W), got shape {tuple(x.shape)}{one}")
    _, c, h, w = x.shape
    if in_chans is not None and c != in_chans:
        if x.shape[-1] == in_chans:
            raise ValueError(f"{name} expects images (B, C, H, W) of {in_chans} channel(s), got {tuple(x.shape)}: "
                             "channels last (B, H, W, C)? x.permute(0, 3, 1, 2)")
        raise ValueError(f"{name} was built for {in_chans}-channel input, got {c} channels; create it with "
                         f"in_chans={c} or convert the images")
    if img_size is not None and (h, w) != tuple(img_size):
        raise ValueError(f"{name} was built for {img_size[0]}x{img_size[1]} input, got {h}x{w}; resize the images "
                         "(nestvit.load(RUN).transform.read_batch(images) does it as in training) or, for a new "
                         f"model, create it with img_size=({h}, {w})")


class ModelBase(nn.Module):
    """The contract every nestvit classifier follows (as timm's models do).

    Subclasses set ``img_size``, ``in_chans``, ``num_classes``, ``num_features``, ``feature_info``,
    ``family`` and implement ``forward_features``, ``forward_head`` and ``forward_intermediates``.

    Backbone interface (timm's, so detection and segmentation code can take a nestvit model):
    ``forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=False,
    stop_early=False)`` and ``feature_info``, one dict per intermediate (``num_chs``, ``reduction``: stride
    relative to the input, ``module``: the module whose output it is); ``nestvit.create_model(name,
    features_only=True, out_indices=...)`` wraps a model into a list-of-maps backbone
    (``nestvit.features``); ``set_grad_checkpointing`` recomputes every transformer layer in backward.
    """

    family: str = ""
    grad_checkpointing: bool = False  # a runtime setting (set_grad_checkpointing), never saved
    img_size: tuple[int, int]
    in_chans: int
    num_classes: int
    num_features: int
    feature_info: list[dict]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise one clear error for input that is not a float tensor, or of a wrong rank, channel count or size."""
        param = next(self.parameters(), None)
        autocast = isinstance(x, torch.Tensor) and x.device.type != "meta" \
            and torch.is_autocast_enabled(x.device.type)  # it casts the input as it needs (meta: no autocast)
        check_images(x, type(self).__name__, self.in_chans, self.img_size,
                     None if param is None or autocast else param.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, num_classes)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classification head (timm's name)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for ``num_classes`` (0: none, ``forward`` gives the pooled features). ``global_pool`` (timm's
        argument) may only name the pooling the model was built with: it is a model option here."""
        pool = getattr(getattr(self, "cfg", None), "global_pool", None) or "avg"
        if global_pool not in (None, pool):
            raise ValueError(f"{type(self).__name__} pools by {pool!r}; another pooling is a model option "
                             f"(create_model(..., global_pool={global_pool!r}) where the model has it)")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head_reset = True  # a new head: the class names its weights recorded are not its own

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that get no weight decay by default (position embeddings and tokens)."""
        keys = ("pos_embed", "cls_token", "dist_token", "patch_pos", "pixel_pos", "pos.")
        return {n for n, _ in self.named_parameters() if any(k in n for k in keys)}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the activations of every transformer layer (block; a stage for the conv net) in backward
        instead of keeping them (``torch.utils.checkpoint``, non-reentrant): less memory, about one more
        forward pass of time; outputs and gradients unchanged. Only while autograd records (training,
        explanations); a runtime setting, not part of the model's arguments or weights. Sets the flag on the
        model and on every submodule that checkpoints (those with a ``grad_checkpointing`` attribute).
        """
        for m in self.modules():
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = bool(enable)


def grid_error(what: str, size: int, unit: int, axis: str) -> ValueError:
    return ValueError(f"{what}: image {axis} {size} is not divisible by {unit}; "
                      f"choose an image size that is a multiple of {unit}")


def check_divisible(what: str, img_size: tuple[int, int], unit: int) -> tuple[int, int]:
    """``img_size // unit`` per axis, or a clear error naming the axis that does not divide."""
    for size, axis in zip(img_size, ("height", "width")):
        if size % unit:
            raise grid_error(what, size, unit, axis)
    return img_size[0] // unit, img_size[1] // unit
