"""timm interop beyond the golden files: general configurations, checkpoint files, clear errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nestvit
from nestvit.interop import WeightsError, from_timm, load_weights, save_weights
from nestvit.models.nest import Nest
from nestvit.models.tnt import tnt_config
from tests.conftest import rand_input, tiny_model


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


def tnt_state_to_timm(model) -> dict[str, torch.Tensor]:
    """nestvit TNT keys -> timm's (split qkv into qk and v), written independently of the loader."""
    names = {"layers.1.norm1": "norm_in", "layers.1.attn.proj": "attn_in.proj", "layers.1.norm2": "norm_mlp_in",
             "layers.1.mlp": "mlp_in", "projs.0.norm1": "norm1_proj", "projs.0.proj": "proj",
             "projs.0.norm2": "norm2_proj", "layers.0.norm1": "norm_out", "layers.0.attn.proj": "attn_out.proj",
             "layers.0.norm2": "norm_mlp", "layers.0.mlp": "mlp"}
    out = {}
    for k, v in model.state_dict().items():
        if k == "pos_embed.1":
            q = int(v.shape[1] ** 0.5)
            out["pixel_pos"] = v.transpose(1, 2).reshape(1, v.shape[2], q, q)
        elif k == "pos_embed.0":
            out["patch_pos"] = v
        elif k.startswith("pixel_embed."):
            out["pixel_embed.proj." + k.split(".")[1]] = v
        elif k.startswith("stems.0."):
            part, leaf = k.split(".")[2:]
            out[{"norm1": "norm1_proj", "proj": "proj", "norm2": "norm2_proj"}[part] + "." + leaf] = v
        elif ".attn.qkv." in k:
            i, lvl, leaf = k.split(".")[1], k.split(".")[3], k.rsplit(".", 1)[1]
            pre = f"blocks.{i}.{'attn_in' if lvl == '1' else 'attn_out'}"
            d = v.shape[0] // 3
            out[f"{pre}.qk.{leaf}"], out[f"{pre}.v.{leaf}"] = v[: 2 * d], v[2 * d:]
        elif k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            for ours, theirs in names.items():
                if rest.startswith(ours + "."):
                    out[f"blocks.{i}.{theirs}{rest[len(ours):]}"] = v
                    break
            else:
                raise AssertionError(k)
        else:
            out[k] = v
    return out


@settings(max_examples=6, deadline=None)
@given(chans=st.sampled_from([1, 3]), classes=st.integers(1, 7), depth=st.integers(1, 2),
       stride=st.sampled_from([1, 2, 4]), qkv_bias=st.booleans())
def test_tnt_from_timm_is_general(chans, classes, depth, stride, qkv_bias):
    from nestvit.models.tnt import TNT

    cfg = dict(img_size=16, patch_size=8, in_chans=chans, embed_dim=16, inner_dim=4, depth=depth,
               num_heads_inner=1, num_heads_outer=2, first_stride=stride, num_classes=classes, qkv_bias=qkv_bias)
    torch.manual_seed(0)
    src = TNT(tnt_config(**cfg)).eval()
    model = from_timm("TNT", cfg, tnt_state_to_timm(src))
    x = torch.randn(2, chans, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_checkpoint_of_another_model_is_refused():
    src = tiny_model("tnt_tiny_patch4_32")
    with pytest.raises(WeightsError, match="does not fit"):
        from_timm("Nest", dict(img_size=8, patch_size=1, num_levels=2, embed_dims=[8, 8], num_heads=[2, 2],
                               depths=[1, 1], num_classes=3), src.state_dict())


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
    with pytest.raises(WeightsError, match=r"does not fit.*The file records nest_tiny_cifar: "
                                           r"nestvit.load\(.*\).model builds it as saved"):
        load_weights(tiny_model("nest_tiny_cifar", embed_dims=24), path)


def test_unreadable_weights_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth: cannot read weights") as e:
        load_weights(tiny_model("nest_tiny_cifar"), bad)
    assert "weights_only set to False" not in str(e.value)  # torch's unsafe advice is not passed on
    with pytest.raises(WeightsError, match="no such weights file"):
        load_weights(tiny_model("nest_tiny_cifar"), tmp_path / "missing.safetensors")
    export = tmp_path / "run" / "model.onnx"  # before: torch's unpickling advice
    export.parent.mkdir()
    export.write_bytes(b"\x08\x07onnx")
    with pytest.raises(WeightsError, match=r"model.onnx is an export .* not a weights file; use the run folder it was "
                                           r"exported from \(.*run\)"):
        load_weights(tiny_model("nest_tiny_cifar"), export)


def test_torch_save_checkpoint_is_loaded_without_pickle(tmp_path):
    model = tiny_model("nest_tiny_cifar")
    path = tmp_path / "timm_style.pth"
    torch.save({"state_dict": nest_state_to_timm(model)}, path)
    other = tiny_model("nest_tiny_cifar")
    load_weights(other, path)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_torch_save_of_nestvits_own_nest_loads_unchanged(tmp_path):
    # its state dict has timm's keys but not timm's attn.proj column order (2 heads): before, it was "converted"
    model = tiny_model("nest_tiny_cifar").eval()
    wrapper = torch.nn.Module()
    wrapper.module = model  # as DDP holds it: keys under "module.", the version under "module"
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    torch.save(wrapper.state_dict(), tmp_path / "ddp.pt")
    x = rand_input(model)
    for name in ("sd.pt", "ddp.pt"):
        assert torch.equal(load_weights(tiny_model("nest_tiny_cifar", embed_dims=16), tmp_path / name).eval()(x),
                           model(x)), name
    # a state dict that does not say (a plain dict, as timm's files are) is still read in timm's layout
    torch.save(dict(model.state_dict()), tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match="plain.pt does not say whose layout it holds .*read as timm's NesT"):
        plain = load_weights(tiny_model("nest_tiny_cifar"), tmp_path / "plain.pt")  # before: without a word
    assert not torch.equal(plain.eval()(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a file known to be timm's (published weights): nothing to say
        load_weights(tiny_model("nest_tiny_cifar"), tmp_path / "plain.pt", timm=True)


def test_weights_of_another_family_or_width_into_a_nest_are_one_clear_error(tmp_path):
    # before: an IndexError / a reshape RuntimeError (an "internal error") from the timm conversion
    vit = nestvit.create_model("vit_tiny_patch4_32", img_size=16, embed_dim=16, depth=1, num_heads=2)
    torch.save(dict(vit.state_dict()), tmp_path / "vit.pth")
    wide = tiny_model("nest_tiny_cifar", embed_dims=20)
    torch.save(dict(wide.state_dict()), tmp_path / "wide.pth")
    for name in ("vit.pth", "wide.pth"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(WeightsError, match=f"{name} does not fit Nest"):
                load_weights(tiny_model("nest_tiny_cifar", num_heads=8), tmp_path / name)


def test_a_misfit_names_the_model_the_file_records(tmp_path):
    path = save_weights(tiny_model("nest_tiny_cifar"), tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match=r"The file records nest_tiny_cifar with \{.*'embed_dims': 16.*\}: "):
        nestvit.create_model("nest_tiny_cifar", weights=path)  # the default widths: not the file's
