"""NesT: blocking layout, options of the paper's ablations, registry sizes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nestvit
from nestvit.models.nest import AGGREGATIONS, Nest, blockify, deblockify


@settings(max_examples=25, deadline=None)
@given(gh=st.integers(1, 3), gw=st.integers(1, 3), block=st.integers(1, 4), c=st.integers(1, 3))
def test_blockify_deblockify_are_inverse(gh, gw, block, c):
    x = torch.randn(2, gh * block, gw * block, c)
    b = blockify(x, block)
    assert b.shape == (2, gh * gw, block * block, c)
    assert torch.equal(deblockify(b, (gh, gw)), x)
    # block t = row * gw + col holds the pixels of that grid cell, row-major inside
    t = gw * (gh - 1) + (gw - 1)
    cell = x[:, (gh - 1) * block:, (gw - 1) * block:].reshape(2, -1, c)
    assert torch.equal(b[:, t], cell)


@pytest.mark.parametrize("name,params", [
    ("nest_tiny_cifar", 6.01), ("nest_small_cifar", 22.85), ("nest_base_cifar", 89.05),
    ("nest_tiny_224", 17.06), ("nest_small_224", 38.35), ("nest_base_224", 67.72)])
def test_registry_parameter_counts(name, params):
    with torch.device("meta"):
        model = nestvit.create_model(name)
    assert round(model.num_params() / 1e6, 2) == params


@settings(max_examples=20, deadline=None)
@given(levels=st.integers(1, 5), patch=st.sampled_from([1, 2, 4]), agg=st.sampled_from(AGGREGATIONS),
       plane=st.sampled_from(["image", "block"]), attn=st.sampled_from(["mha", "mqa"]),
       act=st.sampled_from(["gelu", "gelu_tanh"]), pad=st.sampled_from(["same", "symmetric"]))
def test_every_ablation_option_builds_and_runs(levels, patch, agg, plane, attn, act, pad):
    block = 2
    img = patch * block * 2 ** (levels - 1)
    model = Nest(img_size=img, patch_size=patch, num_levels=levels, block_size=block, embed_dims=8, num_heads=2,
                 depths=1, num_classes=3, aggregation=agg, aggregation_plane=plane, attn=attn, act=act,
                 pool_pad=pad).eval()
    feats, maps = model.forward_intermediates(torch.randn(2, 3, img, img))
    assert [m.shape[-1] for m in maps] == [img // patch // 2 ** i for i in range(levels)]
    assert feats.shape == (2, 8, block, block)
    assert model.levels[-1].pos_embed.shape == (1, 1, block * block, 8)


def test_conv_stem_option():
    """``stem_dim``: conv3x3 -> LN -> act before the patch embedding; off by default (timm's key layout)."""
    plain = nestvit.create_model("nest_tiny_cifar", embed_dims=8, num_heads=1, depths=1)
    assert not any(k.startswith("patch_embed.stem") for k in plain.state_dict())
    model = nestvit.create_model("nest_tiny_cifar", in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32),
                                 num_heads=(1, 2, 4), depths=1, stem_dim=6)
    assert model.patch_embed.stem[0].weight.shape == (6, 1, 3, 3)
    assert model.patch_embed.proj.weight.shape == (8, 6, 2, 2)
    x = torch.randn(3, 1, 32, 32)
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_embed.parameters())
    # the stem sees pixels: changing one pixel changes only the patches its 3x3 neighbourhood reaches
    model.eval()
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    with torch.no_grad():
        a, b = (model._embed(t) for t in (x, x2))  # (B, 16, 16, 8)
    changed = (a - b).abs().amax(dim=(0, 3)) > 0
    assert changed[0, 0] and changed.sum() == 1  # pixel (0, 0) reaches pixels 0-1: patch (0, 0) only


def test_patch_overlap():
    """``patch_overlap``: kernel 2p-1, stride p, padding p-1: same grid, and a pixel on a patch border reaches
    both neighbouring patches (p=2: pixel 1 sits in patch 0 and under the kernel of patch 1)."""
    model = nestvit.create_model("nest_tiny_cifar", in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32),
                                 num_heads=(1, 2, 4), depths=1, patch_overlap=True).eval()
    assert model.patch_embed.proj.weight.shape == (8, 1, 3, 3)
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 1, 1] += 1.0
    with torch.no_grad():
        a, b = (model._embed(t) for t in (x, x2))
    assert a.shape == (2, 16, 16, 8)
    changed = (a - b).abs().amax(dim=(0, 3)) > 0
    assert changed[:2, :2].all() and changed.sum() == 4
    plain = nestvit.create_model("nest_tiny_cifar", patch_size=4, num_levels=2, embed_dims=8, num_heads=1, depths=1)
    wide = nestvit.create_model("nest_tiny_cifar", patch_size=4, num_levels=2, embed_dims=8, num_heads=1, depths=1,
                                patch_overlap=True)
    assert wide.patch_embed.proj.weight.shape[-2:] == (7, 7) and plain.patch_embed.proj.weight.shape[-2:] == (4, 4)
    assert wide(torch.randn(1, 3, 32, 32)).shape == (1, wide.num_classes)


def test_conv_stem_depth():
    """``stem_depth=2``: two conv3x3 layers, so a pixel reaches two pixels away (5x5 receptive field)."""
    model = nestvit.create_model("nest_tiny_cifar", in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32),
                                 num_heads=(1, 2, 4), depths=1, stem_dim=6, stem_depth=2).eval()
    assert [k for k in model.state_dict() if k.startswith("patch_embed.stem") and k.endswith("weight")] == [
        "patch_embed.stem.0.weight", "patch_embed.stem.1.weight", "patch_embed.stem.3.weight",
        "patch_embed.stem.4.weight"]  # the first layer keeps the keys of a one-layer stem
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    with torch.no_grad():
        a, b = (model._embed(t) for t in (x, x2))
    changed = (a - b).abs().amax(dim=(0, 3)) > 0
    assert changed[:2, :2].all() and changed.sum() == 4  # pixels 0-2 reach patches 0-1 along each axis


def test_patch_blur():
    """``patch_blur``: a fixed [1, 2, 1]^2 / 16 filter before the stride-p embedding: no new weights in the
    state dict, a flat image stays flat inside, and a pixel reaches the patches beside it (anti-aliasing)."""
    kw = dict(in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32), num_heads=(1, 2, 4), depths=1)
    plain = nestvit.create_model("nest_tiny_cifar", **kw).eval()
    blur = nestvit.create_model("nest_tiny_cifar", patch_blur=True, **kw).eval()
    assert blur.state_dict().keys() == plain.state_dict().keys()
    blur.load_state_dict(plain.state_dict())
    flat = torch.full((1, 1, 32, 32), 0.7)
    assert torch.allclose(blur.patch_embed.blur(flat)[..., 1:-1, 1:-1], flat[..., 1:-1, 1:-1])
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 2, 2] += 1.0  # the first pixel of patch (1, 1)
    with torch.no_grad():
        for model, reach in ((plain, [(1, 1)]), (blur, [(0, 0), (0, 1), (1, 0), (1, 1)])):
            changed = ((model._embed(x) - model._embed(x2)).abs().amax(dim=(0, 3)) > 0).nonzero().tolist()
            assert changed == [list(p) for p in reach]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blur(x).shape == (2, blur.num_classes)


def test_local_conv_crosses_block_borders_within_a_level():
    """``local_conv``: a depthwise conv3x3 before every layer; a changed token then reaches the neighbouring
    blocks inside level 0 (and their attention the whole of them), which plain NesT keeps inside its block."""
    kw = dict(in_chans=1, patch_size=1, num_levels=2, block_size=4, embed_dims=(8, 16), num_heads=(1, 2),
              depths=(2, 1))  # depth 2: the second conv sees what the first layer's attention spread
    plain = nestvit.create_model("nest_tiny_cifar", img_size=8, **kw).eval()
    local = nestvit.create_model("nest_tiny_cifar", img_size=8, local_conv=True, **kw).eval()
    assert len(local.levels[0].local_convs) == 2 and not plain.levels[0].local_convs
    assert local.levels[0].local_convs[0].weight.shape == (8, 1, 3, 3)
    x = torch.randn(2, 8, 8, 8)  # (B, H, W, C) level-0 input: 2x2 blocks of 4x4 tokens
    x2 = x.clone()
    x2[:, 3, 3] += torch.randn(8)  # the bottom-right token of block (0, 0)
    with torch.no_grad():
        changed = [((m.levels[0](x) - m.levels[0](x2)).abs().amax(dim=(0, 3)) > 0) for m in (plain, local)]
    assert changed[0][:4, :4].all() and changed[0].sum() == 16  # block (0, 0) only
    assert changed[1].all()  # all four blocks
    local(torch.randn(2, 1, 8, 8)).square().mean().backward()
    assert all(c.weight.grad.abs().sum() > 0 for level in local.levels for c in level.local_convs)


def test_top_level_is_one_block_for_square_and_several_for_rectangular_input():
    sq = nestvit.create_model("nest_tiny_cifar", embed_dims=8, num_heads=1, depths=1)
    assert sq.levels[-1].grid == (1, 1) and sq.levels[0].grid == (8, 8)
    rect = nestvit.create_model("nest_tiny_cifar", img_size=(32, 64), embed_dims=8, num_heads=1, depths=1)
    assert rect.levels[-1].grid == (1, 2)
    assert rect(torch.randn(1, 3, 32, 64)).shape == (1, 10)


def test_pool_padding_variants_differ_only_where_they_should():
    torch.manual_seed(0)
    a = Nest(img_size=8, patch_size=1, num_levels=2, embed_dims=8, num_heads=2, depths=1, pool_pad="same").eval()
    b = Nest(img_size=8, patch_size=1, num_levels=2, embed_dims=8, num_heads=2, depths=1, pool_pad="symmetric")
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(a(x), b.eval()(x))


def test_block_plane_aggregation_keeps_blocks_independent():
    """On the block plane, changing one level-0 block changes only its parent block's aggregated pixels."""
    torch.manual_seed(0)
    model = Nest(img_size=16, patch_size=1, num_levels=3, block_size=4, embed_dims=8, num_heads=2, depths=1,
                 aggregation_plane="block").eval()
    level1 = model.levels[1]
    x = torch.randn(1, 16, 16, 8)
    y = x.clone()
    y[:, :4, :4] += 1.0  # level-0 block 0
    ax, ay = level1.aggregate(x), level1.aggregate(y)  # (1, 8, 8, C): 4 blocks of 4x4 at level 1
    changed = ((ax - ay).abs().sum(-1) > 0)[0]
    assert changed[:2, :2].all() and not changed[2:].any() and not changed[:, 2:].any()
    img_plane = Nest(img_size=16, patch_size=1, num_levels=3, block_size=4, embed_dims=8, num_heads=2, depths=1)
    img_plane.load_state_dict(model.state_dict())
    changed_img = ((img_plane.levels[1].aggregate(x) - img_plane.levels[1].aggregate(y)).abs().sum(-1) > 0)[0]
    assert changed_img[2, :].any() or changed_img[:, 2].any()  # the 3x3 conv / pool cross block borders


def test_bad_config_messages():
    with pytest.raises(ValueError, match="embed_dims has 2 entries but num_levels=3"):
        Nest(num_levels=3, embed_dims=(8, 8))
    with pytest.raises(ValueError, match="aggregation="):
        Nest(aggregation="bogus")
    with pytest.raises(ValueError, match="multiple of"):
        nestvit.create_model("nest_tiny_cifar", img_size=36)
    with pytest.raises(ValueError, match="stem_dim must be 0"):
        Nest(stem_dim=-1)
    with pytest.raises(ValueError, match="stem_depth must be at least 1"):
        Nest(stem_dim=8, stem_depth=0)
