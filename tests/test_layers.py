"""Shared building blocks: attention against a plain reference, DropPath, schedules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nestvit.layers import Attention, DropPath, drop_path_rates, split_qkv


def reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out, K/V repeated per head for multi-query."""
    *lead, N, C = x.shape
    H, D, KV = attn.num_heads, attn.head_dim, attn.kv_heads
    qkv = attn.qkv(x.reshape(-1, N, C))
    q, k, v = qkv.split([C, KV * D, KV * D], dim=-1)
    q = q.reshape(-1, N, H, D).transpose(1, 2)
    k = k.reshape(-1, N, KV, D).transpose(1, 2).expand(-1, H, -1, -1)
    v = v.reshape(-1, N, KV, D).transpose(1, 2).expand(-1, H, -1, -1)
    p = (q @ k.transpose(-1, -2) / D ** 0.5).softmax(-1)
    o = (p @ v).transpose(1, 2).reshape(*lead, N, C)
    return attn.proj(o)


@settings(max_examples=20, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), mqa=st.booleans(), blocks=st.integers(1, 3), n=st.integers(1, 9),
       batch=st.integers(1, 2), bias=st.booleans())
def test_attention_matches_reference(heads, mqa, blocks, n, batch, bias):
    torch.manual_seed(0)
    attn = Attention(8, num_heads=heads, kv_heads=1 if mqa else None, qkv_bias=bias).eval()
    x = torch.randn(batch, blocks, n, 8)  # (B, T, N, C): blocks folded into the batch inside
    torch.testing.assert_close(attn(x), reference_attention(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv", [1, 3], ids=["mqa", "mha"])
def test_split_qkv_is_the_fused_layout_as_head_views(kv):
    """``[q (H*D) | k (kv*D) | v (kv*D)]``, heads outermost inside each part; views of the projection."""
    B, N, H, D = 2, 5, 3, 4
    qkv = torch.randn(B, N, (H + 2 * kv) * D)
    q, k, v = split_qkv(qkv, H, kv)
    assert q.shape == (B, H, N, D) and k.shape == v.shape == (B, kv, N, D)
    assert all(t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr() for t in (q, k, v))
    torch.testing.assert_close(q[1, 2, 3], qkv[1, 3, 2 * D:3 * D], rtol=0, atol=0)  # head 2 of token 3
    torch.testing.assert_close(k[1, kv - 1, 3], qkv[1, 3, (H + kv - 1) * D:(H + kv) * D], rtol=0, atol=0)
    torch.testing.assert_close(v[0, 0, 4], qkv[0, 4, (H + kv) * D:(H + kv + 1) * D], rtol=0, atol=0)
    if kv == H:  # the (3, B, H, N, D) view multi-head attention used to take, stride for stride
        fused = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        for a, b in zip((q, k, v), fused):
            assert torch.equal(a, b) and a.stride() == b.stride()


def test_mqa_has_one_kv_head():
    assert Attention(12, num_heads=3, kv_heads=1).qkv.out_features == 12 + 2 * 4
    with pytest.raises(ValueError, match="not divisible"):
        Attention(10, num_heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        Attention(12, num_heads=4, kv_heads=2)


def test_drop_path_rates_are_linear_and_split_per_stage():
    rates = drop_path_rates(0.3, [1, 2, 1])
    flat = [r for stage in rates for r in stage]
    assert [len(s) for s in rates] == [1, 2, 1]
    torch.testing.assert_close(torch.tensor(flat), torch.tensor([0.0, 0.1, 0.2, 0.3]))


def test_drop_path_keeps_the_expectation_and_drops_whole_samples():
    torch.manual_seed(0)
    dp = DropPath(0.25).train()
    y = dp(torch.ones(20000, 3))
    per_sample = y[:, 0]
    assert torch.isclose(per_sample.unique(), torch.tensor([0.0, 1 / 0.75])).all()
    assert (y == y[:, :1]).all()
    assert abs(y.mean().item() - 1.0) < 0.03
    assert torch.equal(dp.eval()(torch.ones(4, 3)), torch.ones(4, 3))
