"""The generic suite: every registered model goes through the same checks (as timm's test_models.py)."""

from __future__ import annotations

import pytest
import torch

import nestvit
from nestvit.registry import model_family
from tests.conftest import rand_input, tiny_model, tiny_overrides

ALL = nestvit.list_models()
ONE_PER_FAMILY = sorted({model_family(n): n for n in reversed(ALL)}.values())


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_every_parameter_gets_a_gradient(name, model_device):
    model = tiny_model(name).train().to(model_device)
    x = rand_input(model).to(model_device)
    out = _logits(model(x))
    assert out.shape == (2, model.num_classes)
    loss = model(x)
    loss = sum(o.square().mean() for o in loss) if isinstance(loss, tuple) else loss.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_batch_one_and_eval_determinism(name):
    model = tiny_model(name).eval()
    x = rand_input(model, batch=1)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (1, model.num_classes)
    assert torch.equal(a, b)
    # a sample's output does not depend on the rest of its batch
    xb = torch.cat([x, rand_input(model, batch=3)])
    with torch.no_grad():
        torch.testing.assert_close(model(xb)[:1], a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_features_head_and_intermediates_agree(name):
    model = tiny_model(name).eval()
    x = rand_input(model)
    with torch.no_grad():
        feats = model.forward_features(x)
        feats2, maps = model.forward_intermediates(x)
        torch.testing.assert_close(feats, feats2)
        torch.testing.assert_close(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    assert maps and all(m.ndim == 4 and m.shape[0] == 2 for m in maps)
    assert len(model.feature_info) == len(maps)
    for info, m in zip(model.feature_info, maps):
        assert m.shape[1] == info["num_chs"]
        assert m.shape[-2] * info["reduction"] == x.shape[-2]


@pytest.mark.parametrize("name", ALL)
def test_no_weight_decay_names_exist(name):
    model = tiny_model(name)
    names = dict(model.named_parameters())
    nwd = model.no_weight_decay()
    assert nwd, "position embeddings should be excluded from weight decay"
    assert nwd <= set(names), f"names that match no parameter: {nwd - set(names)}"


@pytest.mark.parametrize("name", ALL)
def test_reset_classifier(name):
    model = tiny_model(name)
    model.reset_classifier(3)
    assert _logits(model.eval()(rand_input(model))).shape == (2, 3)


@pytest.mark.parametrize("name", ALL)
def test_rectangular_input(name):
    h, w = tiny_model(name).img_size
    model = tiny_model(name, img_size=(h, 2 * w)).eval()
    with torch.no_grad():
        assert model(rand_input(model)).shape == (2, model.num_classes)


@pytest.mark.parametrize("name", ALL)
def test_wrong_size_or_channels_is_a_clear_error(name):
    model = tiny_model(name).eval()
    h, w = model.img_size
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, model.in_chans, h + 4, w))
    with pytest.raises(ValueError, match="in_chans"):
        model(torch.randn(1, model.in_chans + 1, h, w))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(model.in_chans, h, w))


@pytest.mark.parametrize("name", ALL)
def test_indivisible_image_size_is_refused_at_construction(name):
    h, _ = tiny_model(name).img_size
    with pytest.raises(ValueError, match="multiple|divisible|divide"):
        tiny_model(name, img_size=(h + 1, h))


@pytest.mark.parametrize("name", ALL)
def test_one_channel_input(name):
    model = tiny_model(name, in_chans=1).eval()
    assert model(rand_input(model)).shape[0] == 2


@pytest.mark.parametrize("name", ALL)
def test_drop_path_trains_and_is_identity_in_eval(name):
    key = "drop_path_rate"
    model = tiny_model(name, **{key: 0.5})
    x = rand_input(model)
    model.eval()
    with torch.no_grad():
        a = model(x)
        torch.testing.assert_close(a, model(x))
    model.train()
    torch.manual_seed(0)
    b = _logits(model(x))
    assert not torch.allclose(a, b)


def test_unknown_override_lists_valid_options():
    with pytest.raises(TypeError, match="valid options: .*img_size"):
        nestvit.create_model("nest_tiny_cifar", imgsize=32)
    with pytest.raises(ValueError, match="unknown model"):
        nestvit.create_model("nest_huge_cifar")
    with pytest.raises(ValueError, match=r"unknown model 'resnet50'; nestvit.list_models\(\) lists") as e:
        nestvit.create_model("resnet50")  # before: "did you mean" every registered name, generators too
    assert "did you mean" not in str(e.value)
    with pytest.raises(ValueError, match="unknown model family 'nope'; known: .*nest"):
        nestvit.list_models(family="nope")  # before: [] without a word


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_torch_compile_matches_eager(name, model_device):
    model = tiny_model(name).eval().to(model_device)
    x = rand_input(model).to(model_device)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_onnx_export(name, tmp_path):
    onnx = pytest.importorskip("onnx", reason="install the test extras: pip install -e '.[test]'")
    model = tiny_model(name).eval()
    x = rand_input(model, batch=1)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    onnx.checker.check_model(str(path))
    assert path.stat().st_size > 1000


def test_tiny_overrides_cover_every_family():
    for name in ALL:
        assert tiny_overrides(name), f"add a small configuration for {name}'s family to tests/conftest.py"


def test_input_of_another_type_is_one_clear_error():
    import numpy as np

    model = tiny_model("nest_tiny_cifar")
    with pytest.raises(TypeError, match="takes a torch tensor .* not a ndarray"):
        model(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(TypeError, match="takes normalised float images, not torch.uint8"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    # the usual slips of a notebook get the fix, not torch's error from deep inside
    with pytest.raises(ValueError, match=r"got \(1, 16, 16, 3\): channels last \(B, H, W, C\)\? "
                                         r"x.permute\(0, 3, 1, 2\)"):
        model(torch.zeros(1, 16, 16, 3))
    with pytest.raises(ValueError, match=r"one image: add the batch dimension, x\[None\]"):
        model(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match=r"computes in torch.float32, the images are torch.float64: convert them with "
                                        r"\.to\(torch.float32\)"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float64))


@pytest.mark.parametrize("name", ["nest_tiny_cifar", "vit_tiny_patch4_32", "rtnt_nano", "tnt_tiny_patch4_32"])
def test_timms_classifier_calls(name):
    # detection and fine-tuning code calls these as timm defines them
    model = tiny_model(name)
    pool = getattr(model.cfg, "global_pool", None) or "avg"
    model.reset_classifier(4, pool)
    assert model.get_classifier() is model.head and model(rand_input(model)).shape == (2, 4)
    model.reset_classifier(0)
    assert model(rand_input(model)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="pools by"):
        model.reset_classifier(4, "max")
