"""Generator / discriminator shapes and the block de-aggregation layout."""

from __future__ import annotations

import pytest
import torch

from nestvit.generate.models import (
    DISCRIMINATORS,
    GENERATORS,
    BlockDeaggregation,
    NestGenerator,
    NestGeneratorConfig,
    TransGanGenerator,
    build_discriminator,
    build_generator,
    deaggregate_layout,
    minibatch_stddev,
)
from nestvit.models.nest import blockify, deblockify


def _tiny_gen(name: str) -> torch.nn.Module:
    kind = name.split("_")[0]
    base = GENERATORS[name]
    if kind in ("nest", "transgan"):
        cfg = {"nest_64": 4, "nest_32": 3, "nest_28": 3, "nest_tiny": 3}[f"nest_{name.split('_')[1]}"]
        return base(embed_dims=(8,) * cfg, depths=(1,) * cfg, num_heads=2, latent_dim=8, mlp_ratio=1.0)
    if kind == "conv":
        n = {"64": 5, "32": 4, "28": 3, "tiny": 3}[name.split("_")[1]]
        return base(channels=(8,) * n, latent_dim=8)
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generator_shapes(name):
    g = _tiny_gen(name)
    z = torch.randn(2, g.latent_dim)
    y = g(z)
    assert y.shape == (2, g.out_chans, g.img_size, g.img_size)
    assert y.abs().max() <= 1  # tanh output
    if g.img_size <= 32:  # (64x64 global attention backward is slow on a CPU; same code as 32)
        y.mean().backward()
        assert all(p.grad is not None for p in g.parameters())


def test_paper_config_structure():
    """Table A4: 1 block of 8x8 at dim 1024 -> ... -> 64 blocks of 8x8 at dim 16 for 64x64 output."""
    with torch.device("meta"):
        g = build_generator("nest_64")
    cfg = g.cfg
    assert cfg.embed_dims == (1024, 256, 64, 16) and cfg.depths == (5, 3, 3, 2) and cfg.num_heads == (4,) * 4
    assert [lvl.pos_embed.shape for lvl in g.levels] == [
        (1, 1, 64, 1024), (1, 4, 64, 256), (1, 16, 64, 64), (1, 64, 64, 16)]
    with torch.device("meta"):
        t = build_generator("transgan_64")
    assert [lvl.pos_embed.shape for lvl in t.levels] == [
        (1, 1, 64, 1024), (1, 1, 256, 256), (1, 1, 1024, 64), (1, 1, 4096, 16)]
    assert sum(p.numel() for p in g.parameters()) == sum(p.numel() for p in t.parameters())


def test_level_outputs_are_blocks():
    g = _tiny_gen("nest_64")
    outs = g.forward_blocks(torch.randn(1, 8))
    assert [tuple(o.shape) for o in outs] == [(1, 1, 64, 8), (1, 4, 64, 8), (1, 16, 64, 8), (1, 64, 64, 8)]


@pytest.mark.parametrize("kind", ["pixel_shuffle", "nearest"])
@pytest.mark.parametrize("conv", [False, True])
def test_deaggregation_variants(kind, conv):
    g = NestGenerator(NestGeneratorConfig(img_size=16, out_chans=3, block_size=4, num_levels=3, latent_dim=8,
                                          embed_dims=(8, 8, 4), num_heads=2, depths=1, deaggregation=kind,
                                          deagg_conv=conv))
    assert g(torch.randn(3, 8)).shape == (3, 3, 16, 16)
    assert (g.deaggregations[0].conv is not None) == conv


def test_blockify_round_trip():
    x = torch.randn(2, 12, 8, 5)
    assert torch.equal(deblockify(blockify(x, 4), (3, 2)), x)
    b = torch.randn(2, 6, 16, 5)
    assert torch.equal(blockify(deblockify(b, (3, 2)), 4), b)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (2, 3)])
def test_deaggregation_children_fill_parent_quadrants(grid):
    """Block t at (r, c) becomes blocks (2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1) of the next level,
    i.e. de-aggregation's blocking is the exact inverse layout of aggregation's 2x2 merge."""
    gh, gw = grid
    block = 4
    T = gh * gw
    x = torch.arange(T, dtype=torch.float32).reshape(1, T, 1, 1).expand(1, T, block * block, 1)
    y = deaggregate_layout(x, grid, block)
    assert y.shape == (1, 4 * T, block * block, 1)
    for t in range(T):
        r, c = divmod(t, gw)
        for dr in (0, 1):
            for dc in (0, 1):
                child = (2 * r + dr) * (2 * gw) + (2 * c + dc)
                assert torch.all(y[0, child] == t), (t, child)
    # aggregation direction: 2x2 max-pool of the child image gives back the parent image
    img = deblockify(y, (2 * gh, 2 * gw)).permute(0, 3, 1, 2)
    parent = torch.nn.functional.max_pool2d(img, block * 2).flatten()
    assert torch.equal(parent, torch.arange(T, dtype=torch.float32))


@pytest.mark.parametrize("kind", ["pixel_shuffle", "nearest"])
def test_block_deaggregation_module_layout(kind):
    """The learned module with identity-like weights reproduces the pure layout (each child = parent)."""
    C, block, grid = 3, 2, (2, 2)
    m = BlockDeaggregation(C, C, kind=kind, in_grid=grid, out_block=block)
    with torch.no_grad():
        m.norm = torch.nn.Identity()
        eye = torch.eye(C)
        # pixel_shuffle reads channel c*4 + k for output channel c, so repeat each row 4 times
        m.proj.weight.copy_(eye.repeat_interleave(4, 0) if kind == "pixel_shuffle" else eye)
        m.proj.bias.zero_()
    x = torch.randn(2, 4, block * block, C)
    assert torch.allclose(m(x), deaggregate_layout(x, grid, block))


def test_transgan_is_global():
    g = TransGanGenerator(NestGeneratorConfig(img_size=16, block_size=4, num_levels=3, latent_dim=8,
                                              embed_dims=(8, 8, 4), num_heads=2, depths=1))
    assert [lvl.pos_embed.shape[1:3] for lvl in g.levels] == [(1, 16), (1, 64), (1, 256)]
    assert g(torch.randn(2, 8)).shape == (2, 3, 16, 16)


def test_config_errors():
    with pytest.raises(ValueError, match="block_size"):
        NestGeneratorConfig(img_size=30, block_size=8, num_levels=3, embed_dims=(8, 8, 8), depths=(1, 1, 1))
    with pytest.raises(ValueError, match="deaggregation"):
        NestGeneratorConfig(deaggregation="bilinear")
    with pytest.raises(ValueError, match="unknown generator"):
        build_generator("nest_99")
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        _tiny_gen("nest_tiny")(torch.randn(2, 3))


def _tiny_disc(name: str) -> torch.nn.Module:
    kind, size = name.split("_")
    if kind == "resnet":
        n = {"64": 5, "32": 4, "28": 3, "tiny": 3}[size]
        return build_discriminator(name, channels=(4,) * n)
    return build_discriminator(name, embed_dims=(8,) * {"64": 3, "32": 3, "28": 2, "tiny": 2}[size], num_heads=2)


@pytest.mark.parametrize("name", sorted(DISCRIMINATORS))
def test_discriminator_shapes(name):
    d = _tiny_disc(name)
    x = torch.randn(4, d.in_chans, d.img_size, d.img_size)
    assert d(x).shape == (4,)


def test_minibatch_stddev():
    x = torch.randn(6, 4, 3, 3)
    y = minibatch_stddev(x, group=4)  # 4 does not divide 6 -> group 3
    assert y.shape == (6, 5, 3, 3)
    assert torch.equal(y[:, :4], x)
    g = x.reshape(3, 2, 4, 3, 3)
    expect = g.std(dim=0, unbiased=False).mean(dim=(1, 2, 3))  # (2,)
    assert torch.allclose(y[:, 4, 0, 0], expect.repeat(3), atol=1e-4)
