"""FLOP counting: attention through ``F.scaled_dot_product_attention`` must be counted on CPU and meta."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nestvit import create_model
from nestvit.flops import attention_backward_flops, count_flops, flops_by_operator
from nestvit.layers import Attention


class SDPA(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # self-attention of x (B, H, N, D) with itself
        return F.scaled_dot_product_attention(x, x, x)


class Explicit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x @ x.transpose(-2, -1) * x.shape[-1] ** -0.5, dim=-1)
        return p @ x


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sdpa_counted_like_explicit_attention(device):
    B, H, N, D = 2, 4, 17, 8
    sdpa = count_flops(SDPA(), (B, H, N, D), device=device)
    explicit = count_flops(Explicit(), (B, H, N, D), device=device)
    assert explicit == 2 * H * N * N * D * 2  # per batch element: Q K^T and P V
    assert sdpa == explicit
    x = torch.randn(B, H, N, D)
    torch.testing.assert_close(SDPA()(x), Explicit()(x))  # the same computation


def _attention_formula(N: int, C: int, H: int, kv_heads: int) -> int:
    D = C // H
    qkv = 2 * N * C * (C + 2 * kv_heads * D)
    attn = 2 * H * N * N * D * 2  # Q K^T and P V, every query head
    proj = 2 * N * C * C
    return qkv + attn + proj


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_attention_layer_matches_hand_formula(kv_heads, device):
    N, C, H = 37, 48, 3
    with torch.device(device):
        layer = Attention(C, num_heads=H, kv_heads=kv_heads)
    expected = _attention_formula(N, C, H, kv_heads or H)
    assert count_flops(layer, (1, N, C)) == expected
    assert count_flops(layer, (4, N, C)) == expected  # per image
    by_op = flops_by_operator(layer, (1, N, C))
    assert sum(by_op.values()) == expected
    linear = 2 * N * C * (C + 2 * (kv_heads or H) * (C // H)) + 2 * N * C * C
    assert sum(v for k, v in by_op.items() if k in ("aten.addmm", "aten.mm")) == linear


def test_cpu_fused_kernel_is_registered():
    """The CPU flash kernel is what eager SDPA runs here; without nestvit's formula it counted 0."""
    by_op = flops_by_operator(SDPA(), (1, 2, 9, 4))
    assert by_op == {"aten._scaled_dot_product_flash_attention_for_cpu": 2 * 2 * 9 * 9 * 4 * 2}


def test_sdpa_backward_counted_on_cpu():
    q, k, v = (torch.randn(2, 3, 11, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    fwd = 2 * 2 * 3 * 11 * 11 * 8 * 2
    total = counter.get_total_flops()
    assert total >= fwd + 4 * fwd // 2  # the backward is at least the 4 products of the math path
    if any("for_cpu_backward" in str(op) for op in counter.get_flop_counts()["Global"]):
        assert total == fwd + attention_backward_flops(q.shape, q.shape, k.shape, v.shape)


def test_nest_tiny_cifar_flops_positive_and_stable():
    model = create_model("nest_tiny_cifar")
    model.train()
    first = count_flops(model)
    assert model.training and all(m.training for m in model.modules())  # mode restored
    assert 3.5e9 < first < 5e9  # 4.15 GFLOPs (multiply-add = 2)
    with torch.device("meta"):
        meta = create_model("nest_tiny_cifar")
    assert count_flops(meta) == first == count_flops(meta)  # stable, and the same on meta as on CPU
    by_op = flops_by_operator(meta)
    assert sum(by_op.values()) == first
    assert by_op["aten.convolution"] > 0
    assert count_flops(model, (2, 3, 32, 32)) == first


def test_default_shape_needs_img_size():
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(nn.Linear(4, 4))
    assert count_flops(nn.Linear(4, 5), (1, 4)) == 2 * 4 * 5
