"""Backbone interface (timm's): ``forward_intermediates`` arguments, ``features_only`` backbones and their
``feature_info``, gradient checkpointing, on every family at tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import nestvit
from nestvit.cli import main
from nestvit.features import FeatureListNet
from nestvit.layers import feature_indices
from nestvit.registry import model_family
from nestvit.train.config import ModelSection
from nestvit.train.runs import build_model
from tests.conftest import rand_input, tiny_model, tiny_overrides

CONVNET = dict(img_size=(12, 10), in_chans=1, num_classes=5, widths=(4, 8, 8))  # odd sizes: rounded-up maps
# one entry per family and per code path: NesT (CIFAR, 224), its variants (plain, local convs, conv stem with
# overlapping patches), TNT, RTNT (3 levels), ViT, DeiT distilled (two prefix tokens), the conv net
CASES = {
    "nest_tiny_cifar": {},
    "nest_tiny_224": {},
    "nestv_tiny_cifar": {},
    "nestv_tiny_cifar+local_conv": dict(local_conv=True),
    "nestv_tiny_224+stem": dict(stem_dim=4, stem_depth=2, patch_overlap=True, patch_blur=True),
    "tnt_tiny_patch4_32": {},
    "rtnt_nano": {},
    "vit_tiny_patch4_32": {},
    "deit_tiny_patch16_224+distilled": dict(distilled=True),
    "convnet": {},
}
ALL = nestvit.list_models() + ["convnet"]


def build(case: str, **extra) -> torch.nn.Module:
    name = case.split("+")[0]
    torch.manual_seed(0)
    if name == "convnet":
        return nestvit.create_model(name, **{**CONVNET, **CASES.get(case, {}), **extra})
    return tiny_model(name, **{**CASES.get(case, {}), **extra})


def kwargs_of(case: str) -> dict:
    name = case.split("+")[0]
    return {**(CONVNET if name == "convnet" else tiny_overrides(name)), **CASES.get(case, {})}


def module_outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the modules ``feature_info`` names (level 0 tokens for RTNT blocks), in order."""
    outs: list[torch.Tensor] = []
    handles = [model.get_submodule(f["module"]).register_forward_hook(
        lambda _m, _i, out: outs.append(out[0] if isinstance(out, list) else out)) for f in model.feature_info]
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def as_nchw(model: torch.nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A hooked stage output in the layout of a default intermediate map."""
    fam = model.family
    if fam == "nest":
        return y.permute(0, 3, 1, 2)
    if fam == "convnet":
        return y
    prefix = getattr(model, "num_prefix_tokens", 1)
    gh, gw = model.cfg.grid
    return y[:, prefix:].transpose(1, 2).reshape(y.shape[0], -1, gh, gw)


# --------------------------------------------------------------------------------------------------
# forward_intermediates
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_default_call_is_features_and_every_raw_stage_output(case):
    """No arguments: ``(forward_features(x), [every feature_info module's output as a map])``, maps that are
    views of those outputs (the explanations differentiate through them)."""
    model = build(case).eval()
    x = rand_input(model)
    with torch.no_grad():
        feats, maps = model.forward_intermediates(x)
        ref = model.forward_features(x)
    assert torch.equal(feats, ref)
    outs = module_outputs(model, x)
    assert len(maps) == len(outs) == len(model.feature_info)
    for m, y in zip(maps, outs):
        assert torch.equal(m, as_nchw(model, y))
    if model.family != "convnet":
        assert all(m._base is not None for m in maps), "default maps are views of the stage outputs"
    explicit = model.forward_intermediates(x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=False)
    assert torch.equal(explicit[0], feats) and all(torch.equal(a, b) for a, b in zip(explicit[1], maps))


@pytest.mark.parametrize("case", CASES)
def test_indices_select_in_stage_order(case):
    model = build(case).eval()
    x = rand_input(model)
    with torch.no_grad():
        feats, maps = model.forward_intermediates(x)
        n = len(maps)
        for indices, want in [(1, [n - 1]), (n, list(range(n))), ([0], [0]), ([-1, 0], [0, n - 1]),
                              ([n - 1, -1], [n - 1]), (None, list(range(n)))]:
            out = model.forward_intermediates(x, indices=indices, intermediates_only=True)
            assert isinstance(out, list) and len(out) == len(want), indices
            for o, i in zip(out, want):
                assert torch.equal(o, maps[i]), (indices, i)
            early = model.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
            assert all(torch.equal(a, b) for a, b in zip(early, out))
        f2, first = model.forward_intermediates(x, indices=[0])
        assert torch.equal(f2, feats) and len(first) == 1  # the features are those of the whole model
    for bad in (0, n + 1, [n], [-n - 1], [], [0.5], "0"):
        with pytest.raises(ValueError):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="intermediates_only"):
        model.forward_intermediates(x, stop_early=True)


@pytest.mark.parametrize("case", CASES)
def test_output_fmt_nlc_is_the_map_as_tokens(case):
    model = build(case).eval()
    x = rand_input(model)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        feats = model.forward_features(x)
    for m, t in zip(maps, tokens):
        B, C, H, W = m.shape
        assert t.shape == (B, H * W, C)
        assert torch.equal(t, m.flatten(2).transpose(1, 2))
    if model.family in ("vit", "tnt", "rtnt"):  # the patch tokens, without the class (and distillation) token
        prefix = getattr(model, "num_prefix_tokens", 1)
        assert tokens[0].shape[1] == feats.shape[1] - prefix


@pytest.mark.parametrize("case", CASES)
def test_norm_applies_the_final_norm_where_it_fits(case):
    model = build(case).eval()
    x = rand_input(model)
    with torch.no_grad():
        raw = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, norm=True, output_fmt="NLC", intermediates_only=True)
        normed_maps = model.forward_intermediates(x, norm=True, intermediates_only=True)
        feats = model.forward_features(x)
    fam = model.family
    if fam == "convnet":  # no final norm: nothing changes
        assert all(torch.equal(a, b) for a, b in zip(raw, normed))
    elif fam == "nest":  # only the last level has the final norm's width (as timm)
        assert all(torch.equal(a, b) for a, b in zip(raw[:-1], normed[:-1]))
        torch.testing.assert_close(normed[-1], model.norm(raw[-1]))
        torch.testing.assert_close(normed_maps[-1], feats)  # the last level normed is the features
    else:  # every block's patch tokens through the final norm
        for a, b in zip(raw, normed):
            torch.testing.assert_close(b, model.norm(a))
        prefix = getattr(model, "num_prefix_tokens", 1)
        torch.testing.assert_close(normed[-1], feats[:, prefix:])


def test_feature_indices_follow_timm():
    assert feature_indices(4, None) == [0, 1, 2, 3]
    assert feature_indices(4, 2) == [2, 3]
    assert feature_indices(4, (3, -4, 1, 1)) == [0, 1, 3]
    for bad in (0, 5, [4], [-5], True, 1.0):
        with pytest.raises(ValueError):
            feature_indices(4, bad)


# --------------------------------------------------------------------------------------------------
# features_only
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_feature_info_matches_the_maps(name):
    """Every model's ``feature_info``: one entry per intermediate, channels and stride (both axes) of the
    real maps, and a module that exists."""
    model = build(name).eval()
    x = rand_input(model, batch=1)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert isinstance(model.feature_info, list) and len(model.feature_info) == len(maps)
    for info, m in zip(model.feature_info, maps):
        assert set(info) == {"num_chs", "reduction", "module"}
        model.get_submodule(info["module"])
        assert m.shape[1] == info["num_chs"]
        for side, size in zip(m.shape[-2:], x.shape[-2:]):
            assert side == -(-size // info["reduction"])  # rounded up (the conv net's odd sizes)


@pytest.mark.parametrize("case", CASES)
def test_features_only_backbone(case):
    name = case.split("+")[0]
    ref = build(case).eval()
    x = rand_input(ref)
    with torch.no_grad():
        maps = ref.forward_intermediates(x, intermediates_only=True)
    n = len(maps)
    torch.manual_seed(0)
    full = nestvit.create_model(name, features_only=True, **kwargs_of(case)).eval()
    assert isinstance(full, FeatureListNet) and full.feature_info.out_indices == tuple(range(n))
    for out_indices, want in [(None, list(range(n))), (1, [n - 1]), ([-1, 0], [0, n - 1])]:
        torch.manual_seed(0)
        backbone = nestvit.create_model(name, features_only=True, out_indices=out_indices, **kwargs_of(case)).eval()
        with torch.no_grad():
            out = backbone(x)
        assert isinstance(out, list) and len(out) == len(want)
        info = backbone.feature_info
        assert len(info) == n and info.out_indices == tuple(want)
        assert info.channels() == [o.shape[1] for o in out] == [ref.feature_info[i]["num_chs"] for i in want]
        for o, r, i in zip(out, info.reduction(), want):
            assert o.ndim == 4
            assert [-(-s // r) for s in x.shape[-2:]] == list(o.shape[-2:])
            assert torch.equal(o, maps[i])  # the same weights (same seed) give the same maps
        assert info.channels(0) == out[0].shape[1] and info.reduction([0]) == [info.reduction()[0]]
        assert info.module_name() == [ref.feature_info[i]["module"] for i in want]
        assert info.get_dicts(keys=("num_chs",)) == [{"num_chs": c} for c in info.channels()]
    # a backbone has no classifier, and ends at the last map asked for
    assert not any(k.startswith("model.head") for k in backbone.state_dict())
    backbone(x)[-1].sum().backward()  # the maps are on the autograd path
    first = backbone.model.get_submodule(backbone.feature_info.module_name(0))
    assert all(p.grad is not None for p in first.parameters())


def test_features_only_loads_weights_first(tmp_path):
    from nestvit.interop import save_weights

    kw = tiny_overrides("nest_tiny_cifar")
    torch.manual_seed(1)
    trained = nestvit.create_model("nest_tiny_cifar", **kw).eval()
    path = save_weights(trained, tmp_path / "w.safetensors")
    torch.manual_seed(2)  # other random weights, replaced by the file's
    backbone = nestvit.create_model("nest_tiny_cifar", weights=path, features_only=True, out_indices=[1, 3],
                                    **kw).eval()
    x = rand_input(trained)
    with torch.no_grad():
        want = trained.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
        got = backbone(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_features_only_errors():
    with pytest.raises(TypeError, match="features_only"):
        nestvit.create_model("nest_tiny_cifar", out_indices=[0])
    with pytest.raises(ValueError, match="out of range"):
        nestvit.create_model("nest_tiny_cifar", features_only=True, out_indices=[7],
                             **tiny_overrides("nest_tiny_cifar"))
    with pytest.raises(ValueError, match="features_only"):
        FeatureListNet(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------------

def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int = 0):
    """Output and parameter gradients of one cross-entropy step (random numbers from ``seed``)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out = out if isinstance(out, tuple) else (out,)
    sum(F.cross_entropy(o, y) for o in out).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def layer_calls(model: torch.nn.Module) -> list[int]:
    """A counter of forward calls of the first transformer layer (the first stage for the conv net)."""
    fam = model.family
    target = {"nest": lambda: model.levels[0].transformer_encoder[0], "convnet": lambda: model.stages[0],
              "vit": lambda: model.blocks[0]}.get(fam, lambda: model.blocks[0].layers[0])()
    calls = [0]
    target.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # (recomputation may stop early)
    return calls


@pytest.mark.parametrize("name", ALL + [c for c in CASES if "+" in c])
def test_grad_checkpointing_same_outputs_and_gradients(name):
    model = build(name).train()
    x = rand_input(model)
    y = torch.arange(x.shape[0]) % max(model.num_classes, 1)
    calls = layer_calls(model)
    out, grads = step(model, x, y)
    assert calls[0] == 1
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    calls[0] = 0
    out_ckpt, grads_ckpt = step(model, x, y)
    assert calls[0] == 2, "the layer ran again in backward: it was checkpointed"
    assert all(torch.equal(a, b) for a, b in zip(out, out_ckpt))
    assert grads.keys() == grads_ckpt.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=0, msg=n)
    calls[0] = 0
    with torch.no_grad():  # nothing to recompute without autograd
        model(x)
    assert calls[0] == 1
    model.set_grad_checkpointing(False)
    calls[0] = 0
    step(model, x, y)
    assert calls[0] == 1 and not model.grad_checkpointing


@pytest.mark.parametrize("case", ["nest_tiny_cifar", "nestv_tiny_cifar+local_conv", "vit_tiny_patch4_32",
                                  "rtnt_nano"])
def test_grad_checkpointing_replays_stochastic_depth_and_dropout(case):
    model = build(case, drop_path_rate=0.5, proj_drop_rate=0.2).train()
    x = rand_input(model)
    y = torch.arange(x.shape[0]) % model.num_classes
    out, grads = step(model, x, y, seed=3)
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = step(model, x, y, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(out, out_ckpt))
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=0, msg=n)


def test_grad_checkpointing_updates_batchnorm_statistics_once():
    plain, ckpt = build("convnet").train(), build("convnet").train()
    ckpt.set_grad_checkpointing(True)
    x = rand_input(plain, batch=4)
    y = torch.arange(4) % 5
    for _ in range(2):
        step(plain, x, y)
        step(ckpt, x, y)
    for (n, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=n)


def test_grad_checkpointing_through_intermediates_and_backbone():
    backbone = nestvit.create_model("nest_tiny_224", features_only=True, **tiny_overrides("nest_tiny_224")).train()
    x = rand_input(backbone)
    grads = []
    for on in (False, True):
        backbone.set_grad_checkpointing(on)
        backbone.zero_grad(set_to_none=True)
        sum(m.square().mean() for m in backbone(x)).backward()
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=0, msg=n)


def test_training_key_is_a_runtime_setting():
    kw = tiny_overrides("nest_tiny_cifar")
    data = dict(num_classes=10, in_chans=3, img_size=kw.pop("img_size"))
    plain, plain_kwargs = build_model(ModelSection(name="nest_tiny_cifar", overrides=kw), **data)
    model, kwargs = build_model(ModelSection(name="nest_tiny_cifar", overrides=kw, grad_checkpointing=True), **data)
    assert model.grad_checkpointing and all(level.grad_checkpointing for level in model.levels)
    assert not plain.grad_checkpointing
    assert kwargs == plain_kwargs and "grad_checkpointing" not in kwargs
    assert "grad_checkpointing" not in model.registry_spec["kwargs"]
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_explanations_with_checkpointing_on():
    from nestvit.explain import grad_cam, gradcat

    for name in ("nest_tiny_cifar", "vit_tiny_patch4_32", "rtnt_nano"):
        model = build(name).eval()
        x = rand_input(model)
        want = grad_cam(model, x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(grad_cam(model, x), want)
        if model_family(name) == "nest":
            model.set_grad_checkpointing(False)
            plain = gradcat(model, x)
            model.set_grad_checkpointing(True)
            got = gradcat(model, x)
            assert torch.equal(got.path, plain.path)
            for a, b in zip(got.maps, plain.maps):
                torch.testing.assert_close(a, b)


def test_bench_grad_checkpointing(tmp_path, capsys):
    out = tmp_path / "bench.json"
    tiny = ["nest_tiny_cifar", "--img-size", "16", "--set", "block_size=2", "--set", "embed_dims=16",
            "--set", "num_heads=2", "--set", "depths=1"]
    fast = ["--batch", "2", "--warmup", "0", "--iters", "1", "--peak-size", "64", "--peak-iters", "1"]
    assert main(["bench", *tiny, *fast, "--mode", "train", "--no-data", "--grad-checkpointing",
                 "--json", str(out)]) == 0
    assert "grad-ckpt" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["results"]
    assert row["grad_checkpointing"] is True and row["train_images_per_s"] > 0 and row["train_peak_mem_bytes"]
    assert json.loads(out.read_text())["settings"]["grad_checkpointing"] is True
