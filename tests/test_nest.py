"""NesT: blocking layout, options of the paper's ablations, registry sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nestvit
from nestvit.models.nest import AGGREGATIONS, Nest, NestConfig, blockify, deblockify


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
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['stem_dim'\] for NestConfig"):
        Nest(stem_dim=8)  # not NesT: nestvit.models.nest_variants
    with pytest.raises(TypeError, match=r"depths: expected int or a list of int, got '2'"):
        nestvit.create_model("nest_tiny_cifar", depths="2")  # a string would have made a 1-level depth tuple
    with pytest.raises(TypeError, match="drop_path_rate: expected float, got 'a'"):
        Nest(drop_path_rate="a")
    assert Nest(num_levels=2, img_size=8, patch_size=1, embed_dims=[8, 16], num_heads=1, depths=1).cfg.embed_dims \
        == (8, 16)  # a list (YAML's) for a tuple field, an int for every level
    import numpy as np

    assert nestvit.create_model("nest_tiny_cifar", num_classes=np.int64(7)).num_classes == 7  # numpy's ints too


def test_nest_config_holds_nest_and_its_ablations_only():
    """The other papers' options and the CPU speed setting are no fields of NesT's config (nor checkpoints')."""
    names = {f.name for f in dataclasses.fields(NestConfig)}
    assert not names & {"stem_dim", "stem_depth", "patch_overlap", "patch_blur", "local_conv", "cpu_chunk_tokens"}
    model = nestvit.create_model("nest_tiny_cifar", embed_dims=8, num_heads=1, depths=1)
    assert [k for k in model.state_dict() if k.startswith("patch_embed.")] == ["patch_embed.proj.weight",
                                                                                  "patch_embed.proj.bias"]


def test_cpu_chunk_tokens_is_a_runtime_setting():
    from nestvit.models import nest

    assert nest.CPU_CHUNK_TOKENS == 8192  # the default
    with nest.set_cpu_chunk_tokens(0):
        assert nest.CPU_CHUNK_TOKENS == 0
        with nest.set_cpu_chunk_tokens(256):
            assert nest.CPU_CHUNK_TOKENS == 256
        assert nest.CPU_CHUNK_TOKENS == 0
    assert nest.CPU_CHUNK_TOKENS == 8192
    nest.set_cpu_chunk_tokens(1024)  # a plain call changes it for the process
    try:
        assert nest.CPU_CHUNK_TOKENS == 1024
    finally:
        nest.set_cpu_chunk_tokens(8192)
    with pytest.raises(ValueError, match="cpu chunk tokens"):
        nest.set_cpu_chunk_tokens(-1)
