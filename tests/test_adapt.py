"""Fine-tuning loads: weights of another class count, image size or channel count adapt, and say so."""

from __future__ import annotations

import pytest
import torch

import nestvit
from nestvit.adapt import adapt_input_conv, adapt_state_dict
from nestvit.interop import WeightsError, load_state_strict
from tests.conftest import tiny_overrides

FAMILIES = ["nest_tiny_cifar", "nest_tiny_224", "tnt_tiny_patch4_32", "rtnt_nano", "vit_tiny_patch4_32",
            "deit_tiny_patch16_224"]


def pair(name: str):
    """A source model and a target with twice the image size, 3 classes and another channel count."""
    kw = tiny_overrides(name)
    size = kw["img_size"] if isinstance(kw["img_size"], int) else kw["img_size"][0]
    torch.manual_seed(0)
    src = nestvit.create_model(name, **{**kw, "num_classes": 10, "in_chans": 1})
    dst = nestvit.create_model(name, **{**kw, "img_size": 2 * size, "num_classes": 3, "in_chans": 3})
    return src, dst


@pytest.mark.parametrize("name", FAMILIES)
def test_another_size_classes_and_channels_load_and_say_so(name):
    src, dst = pair(name)
    with pytest.raises(WeightsError):
        load_state_strict(dst, src.state_dict(), source="src")
    sd, notes = adapt_state_dict(dst, src.state_dict())
    load_state_strict(dst, sd, source="src")  # fits now
    text = " | ".join(notes)
    assert "re-initialised for 3 classes (the weights had 10)" in text
    assert "resampled" in text and "from 1 to 3 input channels" in text
    x = torch.randn(2, 3, *dst.img_size)
    assert dst.eval()(x).shape == (2, 3)
    # the weights that fit are the source's, untouched
    for k, v in src.state_dict().items():
        if k in sd and v.shape == sd[k].shape and not k.startswith("head"):
            assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("name", FAMILIES)
def test_same_shape_is_untouched(name):
    src, _ = pair(name)
    sd, notes = adapt_state_dict(src, src.state_dict())
    assert notes == [] and all(torch.equal(sd[k], v) for k, v in src.state_dict().items())


def test_nest_position_embeddings_keep_their_image_plane():
    """A NesT level's embeddings at twice the size are the bicubic upsampling of its whole image plane."""
    from nestvit.adapt import resample_pos_embed
    from nestvit.models.nest import blockify, deblockify

    src, dst = pair("nest_tiny_cifar")
    old = src.state_dict()["levels.0.pos_embed"]
    new = resample_pos_embed(dst, "levels.0.pos_embed", old, dst.state_dict()["levels.0.pos_embed"].shape)
    plane_old = deblockify(old, src.levels[0].grid)
    plane_new = deblockify(new, dst.levels[0].grid)
    assert plane_new.shape[1] == 2 * plane_old.shape[1]
    # a constant plane stays constant: resampling never mixes blocks up
    const = torch.full_like(old, 0.5)
    again = resample_pos_embed(dst, "levels.0.pos_embed", const, new.shape)
    assert torch.allclose(again, torch.full_like(again, 0.5), atol=1e-6)
    assert torch.equal(blockify(deblockify(new, dst.levels[0].grid), dst.levels[0].block), new)


def test_grey_to_rgb_keeps_the_features_of_a_grey_image():
    w = torch.randn(8, 1, 3, 3)
    w3 = adapt_input_conv(w, 3)
    x = torch.randn(1, 1, 6, 6)
    a = torch.nn.functional.conv2d(x, w)
    b = torch.nn.functional.conv2d(x.expand(1, 3, 6, 6), w3)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(adapt_input_conv(w3, 1), w, atol=1e-6)  # and back
