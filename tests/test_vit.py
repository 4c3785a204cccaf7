"""ViT / DeiT: parameter counts, the model contract, distillation, rectangular input, attention maps."""

from __future__ import annotations

import pytest
import torch

import nestvit.models.vit  # noqa: F401  (registers the ViT entries)
from nestvit import create_model, list_models
from nestvit.flops import count_flops
from nestvit.layers import Attention
from nestvit.models.vit import ViT, ViTConfig, explicit_attention
from nestvit.registry import model_family

torch.manual_seed(0)


def small(**kw) -> ViT:
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    cfg.update(kw)
    return ViT(**cfg)


def meta_model(name: str, **kw) -> ViT:
    with torch.device("meta"):
        return create_model(name, **kw)


@pytest.mark.parametrize("name, params", [
    ("deit_tiny_patch16_224", 5_717_416),
    ("deit_small_patch16_224", 22_050_664),
    ("deit_base_patch16_224", 86_567_656),
])
def test_deit_param_counts_exact(name, params):
    model = meta_model(name)
    assert model.num_params() == params
    assert model_family(name) == "vit"
    cfg = model.cfg
    assert (cfg.act, cfg.norm_eps, cfg.qkv_bias) == ("gelu", 1e-6, True)
    assert (cfg.num_classes, cfg.img_size, cfg.patch_size) == (1000, (224, 224), 16)


def test_deit_distilled_param_count_and_timm_names():
    model = meta_model("deit_tiny_patch16_224", distilled=True)
    assert model.num_params() == 5_910_800  # timm deit_tiny_distilled_patch16_224
    keys = set(model.state_dict())
    for k in ("patch_embed.proj.weight", "cls_token", "dist_token", "pos_embed", "blocks.11.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias", "blocks.0.mlp.fc2.weight", "norm.bias",
              "head.weight", "head_dist.weight"):
        assert k in keys
    assert model.pos_embed.shape == (1, 2 + 14 * 14, 192)


def test_registry_entries():
    assert set(list_models(family="vit")) >= {
        "vit_tiny_patch4_32", "vit_small_patch4_32", "vit_nest_matched_32",
        "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"}
    m = meta_model("vit_tiny_patch4_32")
    assert (m.img_size, m.num_classes, m.grid, m.cfg.embed_dim, m.cfg.depth, m.cfg.num_heads) == (
        (32, 32), 10, (8, 8), 192, 12, 3)
    assert meta_model("vit_small_patch4_32").cfg.embed_dim == 384
    with pytest.raises(TypeError, match="unknown option"):
        create_model("vit_tiny_patch4_32", embed_dims=3)


def test_forward_and_contract():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 1 + 16, 48)
    assert model(x).shape == (2, 5)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 48)
    torch.testing.assert_close(model(x), model.head(feats[:, 0]))
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    assert len(model.feature_info) == 2
    modules = dict(model.named_modules())
    for info in model.feature_info:
        assert info["module"] in modules and info["num_chs"] == 48 and info["reduction"] == 8
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert model(x).shape == (2, 48)


def test_avg_pool_without_class_token():
    model = small(global_pool="avg", class_token=False).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 48)
    torch.testing.assert_close(model(x), model.head(feats.mean(1)))
    assert model.no_weight_decay() == {"pos_embed"}
    with_cls = small(global_pool="avg").eval()
    f = with_cls.forward_features(x)
    torch.testing.assert_close(with_cls(x), with_cls.head(f[:, 1:].mean(1)))  # class token excluded


def test_config_errors():
    with pytest.raises(ValueError, match="class_token"):
        ViTConfig(global_pool="token", class_token=False)
    with pytest.raises(ValueError, match="class_token"):
        ViTConfig(global_pool="avg", class_token=False, distilled=True)
    with pytest.raises(ValueError, match="global_pool"):
        ViTConfig(global_pool="max")
    with pytest.raises(ValueError, match="attn"):
        ViTConfig(attn="gqa")


def test_distilled_train_tuple_eval_average():
    model = small(distilled=True)
    x = torch.randn(3, 3, 32, 32)
    assert model.num_prefix_tokens == 2
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token"}
    model.train()
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (3, 5)
    (out[0].sum() + out[1].sum()).backward()
    assert model.dist_token.grad is not None and model.head_dist.weight.grad is not None
    model.eval()
    feats = model.forward_features(x)
    logits = model(x)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 5)
    expected = (model.head(feats[:, 0]) + model.head_dist(feats[:, 1])) / 2
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)
    model.reset_classifier(4)
    assert model.head_dist.out_features == 4 and model(x).shape == (3, 4)


def test_rectangular_input():
    model = small(img_size=(32, 48), patch_size=4).eval()
    assert model.grid == (8, 12)
    x = torch.randn(2, 3, 32, 48)
    assert model(x).shape == (2, 5)
    feats, maps = model.forward_intermediates(x)
    assert feats.shape == (2, 1 + 96, 48)
    assert all(m.shape == (2, 48, 8, 12) for m in maps)
    # row-major layout: token 1 + r*gw + c is pixel (r, c) of the map
    tokens = model.blocks(model._embed(x))
    torch.testing.assert_close(maps[-1][:, :, 2, 5], tokens[:, 1 + 2 * 12 + 5])
    with pytest.raises(ValueError, match="32x48"):
        model(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="height 30 is not divisible by 4"):
        ViT(img_size=(30, 32), patch_size=4)
    with pytest.raises(ValueError, match="width 30 is not divisible by 4"):
        ViT(img_size=(32, 30), patch_size=4)


def test_input_errors():
    model = small()
    with pytest.raises(ValueError, match="3-channel"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="32x32"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expects images"):
        model(torch.randn(3, 32, 32))


def test_forward_intermediates():
    model = small(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    feats, maps = model.forward_intermediates(x)
    torch.testing.assert_close(feats, model.forward_features(x))
    assert len(maps) == 3 and all(m.shape == (2, 48, 4, 4) for m in maps)
    # the final features are the normalized last block output
    last = maps[-1].flatten(2).transpose(1, 2)
    torch.testing.assert_close(feats[:, 1:], model.norm(last))


@pytest.mark.parametrize("attn", ["mha", "mqa"])
def test_attention_maps_match_fast_path(attn):
    model = small(attn=attn, depth=3, distilled=True).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.forward_attention_maps(x)
    T = 2 + 16
    assert len(maps) == 3 and all(m.shape == (2, 3, T, T) for m in maps)
    for m in maps:
        assert (m >= 0).all()
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 3, T), atol=1e-5, rtol=0)

    # capture each layer's attention input and output on the fast (SDPA) path
    seen = []
    hooks = [blk.attn.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
             for blk in model.blocks]
    model.forward_features(x)
    for h in hooks:
        h.remove()
    for blk, probs, (inp, out) in zip(model.blocks, maps, seen):
        a = blk.attn
        C, D = 48, a.head_dim
        v = a.qkv(inp)[..., C + a.kv_heads * D:].reshape(2, T, a.kv_heads, D).transpose(1, 2)
        recomputed = a.proj((probs @ v).transpose(1, 2).reshape(2, T, C))
        assert (recomputed - out).abs().max() <= 1e-5
        o, p = explicit_attention(a, inp)
        torch.testing.assert_close(p, probs, atol=1e-5, rtol=0)
        assert (o - out).abs().max() <= 1e-5


def test_train_step_with_stochastic_depth():
    model = small(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, pos_drop_rate=0.1).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.blocks[-1].drop_path.p == pytest.approx(0.2) and model.blocks[0].drop_path.p == 0.0


def test_matched_vit_within_10_percent_of_nest_tiny_cifar():
    vit = meta_model("vit_nest_matched_32")
    nest = meta_model("nest_tiny_cifar")
    assert abs(vit.num_params() / nest.num_params() - 1) < 0.10
    assert abs(count_flops(vit) / count_flops(nest) - 1) < 0.10
    assert vit.img_size == nest.img_size and vit.num_classes == nest.num_classes == 10


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["mha", "mqa"])
def test_explicit_attention_keeps_leading_dims(kv_heads):
    attn = Attention(24, num_heads=3, kv_heads=kv_heads).eval()
    x = torch.randn(2, 4, 16, 24)  # (B, blocks, N, C) as in NesT
    out, probs = explicit_attention(attn, x)
    assert probs.shape == (2, 4, 3, 16, 16)
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=0)
