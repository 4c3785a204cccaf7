"""CAM, Grad-CAM (every registered model) and attention rollout (ViT, TNT, RTNT)."""

from __future__ import annotations

import pytest
import torch

import nestvit
from nestvit.explain import attention_rollout, cam_layer_default, grad_cam, nest_cam, rollout
from nestvit.explain.cam import _probs_from_qkv, outer_attention_maps
from nestvit.registry import list_models, model_family
from tests.conftest import tiny_model  # tests/conftest.py: small overrides of every registered model


def tiny(name: str, **extra):
    """A few-thousand-parameter version of a registered model (same structure), in eval mode.

    Built straight from overrides (never the full-size model first): NesT and ViT as
    ``tests/conftest.py``; for TNT / RTNT the level count and outer token size are found by trying
    the smallest image that the entry accepts.
    """
    family = model_family(name)
    torch.manual_seed(0)
    if family not in ("tnt", "rtnt"):
        return tiny_model(name, **extra).eval()
    for levels in (2, 3, 4):
        for token in (4, 8, 16, 32):
            kw = dict(img_size=2 * token, dims=tuple(16 if i == 0 else 4 for i in range(levels)),
                      num_heads=tuple(2 if i == 0 else 1 for i in range(levels)), depth=2)
            try:
                torch.manual_seed(0)
                return nestvit.create_model(name, **{**kw, **extra}).eval()
            except ValueError:
                continue
    raise AssertionError(f"no tiny configuration found for {name}")


def x_for(model, batch=2):
    h, w = model.img_size
    return torch.randn(batch, model.in_chans, h, w, generator=torch.Generator().manual_seed(0))


def test_cam_is_the_head_decomposed_over_locations():
    model = tiny("nest_tiny_cifar", num_classes=7)
    x = x_for(model, 3)
    target = torch.tensor([0, 4, 6])
    cam = nest_cam(model, x, target, upsample=False)
    feats = model.forward_features(x)
    assert cam.shape == (3,) + tuple(feats.shape[-2:])
    manual = torch.einsum("bchw,bc->bhw", feats, model.head.weight[target]).detach()
    torch.testing.assert_close(cam, manual)
    logits = model(x).detach()
    torch.testing.assert_close(cam.mean(dim=(1, 2)) + model.head.bias[target].detach(),
                               logits.gather(1, target[:, None])[:, 0], rtol=1e-5, atol=1e-5)
    up = nest_cam(model, x)  # default: the prediction, upsampled to the input size
    assert up.shape == (3, 16, 16)
    torch.testing.assert_close(up, nest_cam(model, x, logits.argmax(1)))


def test_cam_refuses_token_models():
    vit = tiny("vit_tiny_patch4_32")
    with pytest.raises(ValueError, match="grad_cam"):
        nest_cam(vit, x_for(vit))


@pytest.mark.parametrize("name", list_models())
def test_grad_cam_shapes_for_every_registered_model(name):
    model = tiny(name)
    x = x_for(model)
    cam = grad_cam(model, x)
    assert cam.shape == (2,) + tuple(model.img_size)
    assert torch.isfinite(cam).all() and (cam >= 0).all() and cam.abs().sum() > 0
    low = grad_cam(model, x, target=1, upsample=False, relu=False)
    assert low.ndim == 3 and low.shape[0] == 2


def test_grad_cam_layer_choice_and_manual_value():
    vit = tiny("vit_tiny_patch4_32")
    assert cam_layer_default(vit) == -2 and cam_layer_default(tiny("nest_tiny_cifar")) == -1
    with pytest.raises(ValueError, match="do not depend"):
        grad_cam(vit, x_for(vit), layer=-1)  # the class token never reads the last block's patch tokens
    with pytest.raises(ValueError, match="out of range"):
        grad_cam(vit, x_for(vit), layer=5)
    # manual Grad-CAM on NesT's last level: alpha = mean gradient, ReLU(sum alpha A)
    model = tiny("nest_tiny_cifar")
    x = x_for(model)
    h = model._embed(x)
    for level in model.levels:
        h = level(h)
    logits = model.forward_head(model.norm(h).permute(0, 3, 1, 2))
    (g,) = torch.autograd.grad(logits[:, 2].sum(), h)
    a, g = h.detach().permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    want = (g.mean(dim=(2, 3), keepdim=True) * a).sum(1).clamp_min(0)
    torch.testing.assert_close(grad_cam(model, x, target=2, upsample=False), want, rtol=1e-5, atol=1e-7)


def test_rollout_of_hand_made_attention():
    a1 = torch.tensor([[[[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]]]])  # (1, 1 head, 3, 3)
    a2 = torch.tensor([[[[0.0, 0.0, 1.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]],
                        [[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]])  # two heads
    eye = torch.eye(3)
    r1 = 0.5 * a1[0, 0] + 0.5 * eye
    m2 = 0.5 * a2[0].mean(0) + 0.5 * eye
    want = (m2 / m2.sum(-1, keepdim=True)) @ (r1 / r1.sum(-1, keepdim=True))
    got = rollout([a1, a2])
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 3))
    # discarding the weakest weights keeps rows stochastic and the class token's self-attention
    d = rollout([a1, a2], discard_ratio=0.5)
    torch.testing.assert_close(d.sum(-1), torch.ones(1, 3))


def test_rollout_maps_for_vit_tnt_rtnt():
    for name in ("vit_tiny_patch4_32", "tnt_tiny_patch4_32", "rtnt_nano"):
        model = tiny(name)
        x = x_for(model)
        m = attention_rollout(model, x, upsample=False)
        grid = tuple(model.grid) if hasattr(model, "grid") else tuple(model.cfg.grid)
        assert m.shape == (2,) + grid
        assert (m >= 0).all() and (m.sum(dim=(1, 2)) <= 1 + 1e-5).all()  # the class token's row minus itself
        assert attention_rollout(model, x, discard_ratio=0.3).shape == (2,) + tuple(model.img_size)
    with pytest.raises(ValueError, match="rollout"):
        attention_rollout(tiny("nest_tiny_cifar"), x_for(tiny("nest_tiny_cifar")))


def test_qkv_hooks_reproduce_vits_attention_and_tnt_rows():
    vit = tiny("vit_tiny_patch4_32")
    x = x_for(vit)
    got = []
    hooks = [b.attn.qkv.register_forward_hook(lambda m, i, o, a=b.attn: got.append(_probs_from_qkv(a, o.detach())))
             for b in vit.blocks]
    with torch.no_grad():
        vit(x)
    for h in hooks:
        h.remove()
    for g, w in zip(got, vit.forward_attention_maps(x)):
        torch.testing.assert_close(g, w.detach(), rtol=1e-5, atol=1e-6)
    tnt = tiny("tnt_tiny_patch4_32")
    maps = outer_attention_maps(tnt, x_for(tnt))
    n = tnt.cfg.grid[0] * tnt.cfg.grid[1] + 1
    assert len(maps) == tnt.cfg.depth and maps[0].shape == (2, tnt.cfg.num_heads[0], n, n)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, tnt.cfg.num_heads[0], n))


def test_every_method_takes_what_nestvit_load_returns_and_refuses_uint8_or_an_export(tmp_path):
    # before: 'Loaded' object has no attribute 'training', "family '?'", torch's "only Tensors of floating point
    # dtype can require gradients"
    from nestvit.contract import Loaded
    from nestvit.explain import gradcat, occlusion
    from nestvit.export import OnnxModel

    model = tiny("nest_tiny_cifar")
    loaded = Loaded(model=model, transform=None, contract=None, weights=tmp_path / "w.safetensors")
    x = x_for(model, 1)
    assert torch.equal(nest_cam(loaded, x), nest_cam(model, x))
    assert torch.equal(gradcat(loaded, x).boxes, gradcat(model, x).boxes)
    assert torch.equal(occlusion(loaded, x), occlusion(model, x))
    for method in (gradcat, grad_cam, nest_cam, occlusion):
        with pytest.raises(TypeError, match="takes normalised float images, not torch.uint8"):
            method(model, torch.zeros(1, model.in_chans, *model.img_size, dtype=torch.uint8))
    export = OnnxModel.__new__(OnnxModel)  # what nestvit.load gives for an .onnx file
    for method in (gradcat, grad_cam, nest_cam, attention_rollout):
        with pytest.raises(TypeError, match=rf"{method.__name__} needs the PyTorch model .* an exported model is "
                                            "explained by nestvit.explain.occlusion"):
            method(export, x)


def test_grad_cam_of_a_one_block_class_token_model_says_why_it_has_no_map():
    model = nestvit.create_model("vit_tiny_patch4_32", depth=1, embed_dim=16, num_heads=1).eval()
    with pytest.raises(ValueError, match="Grad-CAM has no map to use in this ViT: it classifies from a class token"):
        grad_cam(model, x_for(model, 1))  # before: "map index [-2] out of range"
