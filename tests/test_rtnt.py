"""RTNT: nesting of any depth, the TNT special case, level switches, embeddings."""

from __future__ import annotations

import pytest
import torch

import nestvit
from nestvit.models.rtnt import RTNT


def small(**kw) -> RTNT:
    torch.manual_seed(0)
    base = dict(img_size=8, num_classes=3, token_sizes=(4, 2, 1), dims=(16, 8, 4), num_heads=(2, 1, 1),
                mlp_ratios=(2.0, 2.0, 2.0), depth=2)
    return RTNT(**{**base, **kw})


@pytest.mark.parametrize("sizes", [(8,), (8, 2), (8, 4, 2), (8, 4, 2, 1)])
def test_any_number_of_levels(sizes):
    L = len(sizes)
    model = small(img_size=16, token_sizes=sizes, dims=(16, 8, 8, 4)[:L], num_heads=(2, 1, 1, 1)[:L],
                  mlp_ratios=(2.0,) * L)
    assert len(model.pos_embed) == L
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_innermost_tokens_are_the_right_pixels():
    """With a linear embedding that copies pixel values, letter tokens hold the right pixels in order."""
    model = small(in_chans=1, dims=(16, 8, 1), num_heads=(2, 1, 1))
    with torch.no_grad():
        model.pixel_embed.weight.fill_(1.0)
        model.pixel_embed.bias.zero_()
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    letters = model._pixels_to_tokens(x)  # (sentences * words, letters per word, 1)
    assert letters.shape == (4 * 4, 4, 1)
    # sentence 1 (top right 4x4), word 2 (its bottom-left 2x2): pixels rows 2-3, cols 4-5
    word = letters[1 * 4 + 2, :, 0]
    assert word.tolist() == [20.0, 21.0, 28.0, 29.0]


def test_innermost_flag_is_the_papers_ablation():
    on, off = small(), small(innermost=False)
    assert off.num_params() < on.num_params()
    assert all(isinstance(b.layers[2], torch.nn.Identity) for b in off.blocks)
    assert all(not isinstance(b.layers[1], torch.nn.Identity) for b in off.blocks)
    x = torch.randn(2, 3, 8, 8)
    assert off(x).shape == on(x).shape
    per_block = small(level_blocks=((True, True), (True, False), (False, True)))
    assert isinstance(per_block.blocks[1].layers[1], torch.nn.Identity)
    assert isinstance(per_block.blocks[0].layers[2], torch.nn.Identity)
    with pytest.raises(ValueError, match="level_blocks"):
        small(level_blocks=((True,),))


def test_two_levels_with_conv_embedding_is_tnt():
    tnt = nestvit.create_model("tnt_tiny_patch4_32")
    assert isinstance(tnt, RTNT) and tnt.cfg.num_levels == 2 and tnt.cfg.embed == "conv"
    assert tnt.pixel_embed.kernel_size == (7, 7)


def test_conv_embedding_stays_inside_each_patch():
    """TNT convolves inside each patch: changing one patch's pixels leaves other patches' words unchanged."""
    model = small(embed="conv", token_sizes=(4, 2), dims=(16, 4), num_heads=(2, 1), mlp_ratios=(2.0, 2.0))
    x = torch.randn(1, 3, 8, 8)
    y = x.clone()
    y[..., :4, :4] += 1.0  # patch 0
    with torch.no_grad():
        a, b = model._pixels_to_tokens(x), model._pixels_to_tokens(y)
    changed = (a - b).abs().sum((1, 2)) > 0
    assert changed.tolist() == [True, False, False, False]


@pytest.mark.parametrize("name,params", [("rtnt_nano", 1.57), ("rtnt_tiny", 6.2), ("tnt_s_patch16_224", 23.77),
                                         ("tnt_b_patch16_224", 65.43)])
def test_registry_parameter_counts(name, params):
    with torch.device("meta"):
        n = nestvit.create_model(name).num_params() / 1e6
    tol = 0.03 if name.startswith("rtnt") else 0.005 / params
    assert abs(n - params) / params <= tol, n


def test_one_or_three_channels_and_28_or_32_pixels():
    for size in (28, 32):
        for chans in (1, 3):
            model = nestvit.create_model("rtnt_nano", img_size=size, in_chans=chans, depth=1)
            assert model(torch.randn(1, chans, size, size)).shape == (1, 10)
