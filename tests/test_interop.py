"""timm interop beyond the golden files: general configurations, checkpoint files, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from nestvit import create_model
from nestvit.interop import WeightsError, from_timm, load_weights, save_weights
from nestvit.models.nest import Nest
from nestvit.models.tnt import tnt_config


def nest_state_to_timm(model: Nest) -> dict[str, torch.Tensor]:
    """Inverse of the loader's conversion: nestvit merges heads h*D+d, timm d*H+h."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("attn.proj.weight"):
            H = model.cfg.num_heads[int(k.split(".")[1])]
            D = v.shape[1] // H
            v = v.reshape(v.shape[0], H, D).transpose(1, 2).reshape(v.shape[0], H * D)
        out[k] = v
    return out


@settings(max_examples=8, deadline=None)
@given(levels=st.integers(2, 3), patch=st.sampled_from([1, 2]), chans=st.sampled_from([1, 3]),
       classes=st.integers(1, 12), depth=st.integers(1, 2), pad=st.sampled_from(["", "same"]),
       qkv_bias=st.booleans())
def test_nest_from_timm_is_general(levels, patch, chans, classes, depth, pad, qkv_bias):
    img = patch * 2 * 2 ** (levels - 1)
    kw = dict(img_size=img, in_chans=chans, patch_size=patch, num_levels=levels, embed_dims=[8] * levels,
              num_heads=[2] * levels, depths=[depth] * levels, num_classes=classes, pad_type=pad, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    src = Nest(img_size=img, in_chans=chans, patch_size=patch, num_levels=levels, embed_dims=8, num_heads=2,
               depths=depth, num_classes=classes, pool_pad="same" if pad == "same" else "symmetric",
               qkv_bias=qkv_bias).eval()
    model = from_timm("Nest", kw, nest_state_to_timm(src))
    x = torch.randn(2, chans, img, img)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_nest_head_order_conversion_is_not_the_identity():
    """The permutation matters: loading timm weights without it would change the output."""
    torch.manual_seed(0)
    src = Nest(img_size=8, patch_size=1, num_levels=2, embed_dims=8, num_heads=2, depths=1, num_classes=3).eval()
    model = from_timm("Nest", dict(img_size=8, patch_size=1, num_levels=2, embed_dims=[8, 8], num_heads=[2, 2],
                                   depths=[1, 1], num_classes=3), src.state_dict())
    x = torch.randn(1, 3, 8, 8)
    assert not torch.allclose(model(x), src(x))


def test_tnt_from_timm_general_and_qkv_bias():
    cfg = dict(img_size=16, patch_size=8, in_chans=1, embed_dim=16, inner_dim=4, depth=1, num_heads_inner=1,
               num_heads_outer=2, first_stride=4, num_classes=5, qkv_bias=True)
    model = create_model("tnt_tiny_patch4_32", **{k: v for k, v in tnt_config(**cfg).__dict__.items()})
    sd = model.state_dict()
    # rebuild a timm-layout dict from ours and load it back
    timm_sd = {}
    for k, v in sd.items():
        timm_sd[k] = v
    with pytest.raises(WeightsError, match="does not fit"):
        from_timm("TNT", cfg, timm_sd)  # nestvit names are not timm names: refused, not half-loaded


def test_from_timm_rejects_unknown_class_and_legacy():
    with pytest.raises(WeightsError, match="unsupported timm class"):
        from_timm("ResNet", {}, {})
    with pytest.raises(ValueError, match="legacy"):
        from_timm("TNT", {"legacy": True}, {})


def test_save_and_load_roundtrip_and_family_check(tmp_path):
    model = tiny_model("nest_tiny_cifar").eval()
    path = save_weights(model, tmp_path / "w.safetensors", metadata={"model": "nest_tiny_cifar"})
    assert not list(tmp_path.glob(".*.tmp")), "temporary file left behind"
    other = tiny_model("nest_tiny_cifar")
    load_weights(other, path)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(other.eval()(x), model(x))
    with pytest.raises(WeightsError, match="not a rtnt model"):
        load_weights(tiny_model("rtnt_nano"), path)
    with pytest.raises(WeightsError, match="does not fit"):
        load_weights(tiny_model("nest_tiny_cifar", embed_dims=24), path)


def test_unreadable_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth: cannot read weights"):
        load_weights(tiny_model("nest_tiny_cifar"), bad)
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tiny_model("nest_tiny_cifar"), tmp_path / "missing.safetensors")


def test_torch_save_checkpoint_is_loaded_without_pickle(tmp_path):
    model = tiny_model("nest_tiny_cifar")
    path = tmp_path / "timm_style.pth"
    torch.save({"state_dict": nest_state_to_timm(model)}, path)
    other = tiny_model("nest_tiny_cifar")
    load_weights(other, path)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
