"""NesT variants (``nestvit.models.nest_variants``): the other papers' options, their registry twins, and the
weights files written while those options were fields of ``NestConfig``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import nestvit
from nestvit.contract import RunContract
from nestvit.interop import CHECKSUM_KEY, tensors_sha256
from nestvit.models.nest import CONFIGS, Nest
from nestvit.models.nest_variants import (
    VARIANT_OPTIONS,
    NestVariant,
    NestVariantConfig,
    legacy_nest_kwargs,
    variant_name,
)
from nestvit.registry import list_models, model_family

# A small model with every variant option, as ``create_model("nest_tiny_cifar", **OLD_KWARGS)`` built it while
# the options were fields of NestConfig; cpu_chunk_tokens was one too, and went into every file's kwargs.
OLD_KWARGS = dict(img_size=8, in_chans=1, num_classes=3, patch_size=2, num_levels=2, block_size=2, embed_dims=[4, 8],
                  num_heads=[1, 2], depths=1, stem_dim=4, stem_depth=2, patch_overlap=True, patch_blur=True,
                  local_conv=True, cpu_chunk_tokens=4096)
# its state dict then (names and shapes, in order), printed by that version of nestvit
OLD_STATE = {
    "patch_embed.stem.0.weight": (4, 1, 3, 3), "patch_embed.stem.0.bias": (4,), "patch_embed.stem.1.weight": (4,),
    "patch_embed.stem.1.bias": (4,), "patch_embed.stem.3.weight": (4, 4, 3, 3), "patch_embed.stem.3.bias": (4,),
    "patch_embed.stem.4.weight": (4,), "patch_embed.stem.4.bias": (4,), "patch_embed.proj.weight": (4, 4, 3, 3),
    "patch_embed.proj.bias": (4,), "levels.0.pos_embed": (1, 4, 4, 4),
    "levels.0.transformer_encoder.0.norm1.weight": (4,), "levels.0.transformer_encoder.0.norm1.bias": (4,),
    "levels.0.transformer_encoder.0.attn.qkv.weight": (12, 4), "levels.0.transformer_encoder.0.attn.qkv.bias": (12,),
    "levels.0.transformer_encoder.0.attn.proj.weight": (4, 4), "levels.0.transformer_encoder.0.attn.proj.bias": (4,),
    "levels.0.transformer_encoder.0.norm2.weight": (4,), "levels.0.transformer_encoder.0.norm2.bias": (4,),
    "levels.0.transformer_encoder.0.mlp.fc1.weight": (16, 4), "levels.0.transformer_encoder.0.mlp.fc1.bias": (16,),
    "levels.0.transformer_encoder.0.mlp.fc2.weight": (4, 16), "levels.0.transformer_encoder.0.mlp.fc2.bias": (4,),
    "levels.0.local_convs.0.weight": (4, 1, 3, 3), "levels.0.local_convs.0.bias": (4,),
    "levels.1.pos_embed": (1, 1, 4, 8), "levels.1.pool.conv.weight": (8, 4, 3, 3), "levels.1.pool.conv.bias": (8,),
    "levels.1.pool.norm.weight": (8,), "levels.1.pool.norm.bias": (8,),
    "levels.1.transformer_encoder.0.norm1.weight": (8,), "levels.1.transformer_encoder.0.norm1.bias": (8,),
    "levels.1.transformer_encoder.0.attn.qkv.weight": (16, 8), "levels.1.transformer_encoder.0.attn.qkv.bias": (16,),
    "levels.1.transformer_encoder.0.attn.proj.weight": (8, 8), "levels.1.transformer_encoder.0.attn.proj.bias": (8,),
    "levels.1.transformer_encoder.0.norm2.weight": (8,), "levels.1.transformer_encoder.0.norm2.bias": (8,),
    "levels.1.transformer_encoder.0.mlp.fc1.weight": (32, 8), "levels.1.transformer_encoder.0.mlp.fc1.bias": (32,),
    "levels.1.transformer_encoder.0.mlp.fc2.weight": (8, 32), "levels.1.transformer_encoder.0.mlp.fc2.bias": (8,),
    "levels.1.local_convs.0.weight": (8, 1, 3, 3), "levels.1.local_convs.0.bias": (8,),
    "norm.weight": (8,), "norm.bias": (8,), "head.weight": (3, 8), "head.bias": (3,),
}


def _old_file(path, meta: dict[str, str]):
    """A weights file with the old model's tensors (random values) and ``meta``."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in OLD_STATE.items()}
    save_file(sd, str(path), metadata={"format": "nestvit", "family": "nest", **meta, CHECKSUM_KEY: tensors_sha256(sd)})
    return sd


def test_variant_state_dict_keys_are_those_of_the_old_config():
    name, kwargs = legacy_nest_kwargs("nest_tiny_cifar", OLD_KWARGS)
    assert name == "nestv_tiny_cifar" and "cpu_chunk_tokens" not in kwargs
    model = nestvit.create_model(name, **kwargs)
    assert isinstance(model, NestVariant) and model.family == "nest"
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == OLD_STATE
    assert list(model.state_dict()) == list(OLD_STATE)


def test_a_file_saved_with_the_old_kwargs_loads(tmp_path):
    """The run contract of a file written then (``model: nest_tiny_cifar``, the variant options and
    ``cpu_chunk_tokens`` in its kwargs) builds the variant twin, and the weights load strictly."""
    contract = json.dumps({"version": 1, "model": "nest_tiny_cifar", "kwargs": OLD_KWARGS, "kind": "classifier",
                           "classes": None, "transform": None, "info": {}})
    path = tmp_path / "old.safetensors"
    sd = _old_file(path, {"nestvit.contract": contract, "model": "nest_tiny_cifar"})
    loaded = nestvit.load(path)
    assert isinstance(loaded.model, NestVariant) and loaded.model.cfg.stem_dim == 4 and loaded.model.cfg.local_conv
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert loaded.model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    # re-saved, the file records the twin's name and no retired key
    assert loaded.model.registry_spec["model"] == "nestv_tiny_cifar"
    assert "cpu_chunk_tokens" not in loaded.model.registry_spec["kwargs"]
    # a start for fine-tuning, as nestvit.load reads it (before: "unknown option(s) ['cpu_chunk_tokens']")
    model = nestvit.create_model("nest_tiny_cifar", pretrained=path, num_classes=5)
    assert isinstance(model, NestVariant) and model.num_classes == 5 and model.cfg.stem_dim == 4


def test_a_training_run_file_from_before_the_contract_loads(tmp_path):
    """Older still: ``model`` / ``model_kwargs`` / ``mean`` / ``std`` keys of ``nestvit train``."""
    path = tmp_path / "best.safetensors"
    _old_file(path, {"model": "nest_tiny_cifar", "model_kwargs": json.dumps(OLD_KWARGS), "mean": "[0.5]",
                     "std": "[0.25]", "data": '"fashion_mnist"'})
    loaded = nestvit.load(path)
    assert isinstance(loaded.model, NestVariant) and loaded.transform.size == (8, 8)


def test_legacy_kwargs_rewrite():
    assert legacy_nest_kwargs("nest_tiny_cifar", {"cpu_chunk_tokens": 0, "depths": 1}) == (
        "nest_tiny_cifar", {"depths": 1})  # plain NesT stays NesT
    assert legacy_nest_kwargs("nest_base_224", {"patch_overlap": False}) == ("nestv_base_224", {"patch_overlap": False})
    assert legacy_nest_kwargs("nestv_tiny_cifar", {"stem_dim": 8, "cpu_chunk_tokens": 1}) == (
        "nestv_tiny_cifar", {"stem_dim": 8})
    kw = {"cpu_chunk_tokens": 1}
    assert legacy_nest_kwargs("vit_tiny_patch4_32", kw) == ("vit_tiny_patch4_32", kw)  # other families: untouched
    built = RunContract(model="nest_tiny_cifar", kwargs={"img_size": [16, 16], "block_size": 2, "embed_dims": 8,
                                                         "num_heads": 1, "depths": 1, "cpu_chunk_tokens": 0}).build()
    assert type(built) is Nest and built.img_size == (16, 16)


def test_every_nest_entry_has_a_variant_twin():
    assert {variant_name(n) for n in CONFIGS} == set(list_models("nestv_*"))
    for name in CONFIGS:
        twin = variant_name(name)
        assert model_family(twin) == "nest" and twin == name.replace("nest_", "nestv_", 1)
        with torch.device("meta"):
            a, b = nestvit.create_model(name), nestvit.create_model(twin)
        assert type(b) is NestVariant and b.cfg == NestVariantConfig.of(a.cfg)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_variant_without_options_is_nest():
    kw = dict(img_size=16, block_size=2, embed_dims=8, num_heads=2, depths=1)
    nest = nestvit.create_model("nest_tiny_cifar", **kw).eval()
    twin = nestvit.create_model("nestv_tiny_cifar", **kw).eval()
    twin.load_state_dict(nest.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(nest(x), twin(x))
    nest.load_state_dict(twin.state_dict())  # the same keys both ways (strict)


def test_results_recipe_names_a_variant_entry():
    from nestvit.train.config import builtin_recipes, read_recipe

    raw, _ = read_recipe(builtin_recipes()["results_best_fashion_mnist"])
    name, overrides = raw["model"]["name"], raw["model"]["overrides"]
    assert name == "nestv_tiny_cifar" and overrides["stem_dim"] == 32 and overrides["stem_depth"] == 2
    with torch.device("meta"):
        model = nestvit.create_model(name, in_chans=1, **overrides)
    assert round(model.num_params() / 1e6, 3) == 2.207  # the recipe's 2,207,402 parameters of the published runs


def test_variant_options_are_validated():
    assert set(VARIANT_OPTIONS) <= {f for f in NestVariantConfig.__dataclass_fields__}
    with pytest.raises(ValueError, match="stem_dim must be 0"):
        NestVariant(stem_dim=-1)
    with pytest.raises(ValueError, match="stem_depth must be at least 1"):
        NestVariant(stem_dim=8, stem_depth=0)


def test_conv_stem_option():
    """``stem_dim``: conv3x3 -> LN -> act before the patch embedding; off by default (timm's key layout)."""
    plain = nestvit.create_model("nestv_tiny_cifar", embed_dims=8, num_heads=1, depths=1)
    assert not any(k.startswith("patch_embed.stem") for k in plain.state_dict())
    model = nestvit.create_model("nestv_tiny_cifar", in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32),
                                 num_heads=(1, 2, 4), depths=1, stem_dim=6)
    assert model.patch_embed.stem[0].weight.shape == (6, 1, 3, 3)
    assert model.patch_embed.proj.weight.shape == (8, 6, 2, 2)
    x = torch.randn(3, 1, 32, 32)
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.patch_embed.parameters())
    # the stem sees pixels: changing one pixel changes only the patches its 3x3 neighbourhood reaches
    model.eval()
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    with torch.no_grad():
        a, b = (model._embed(t) for t in (x, x2))  # (B, 16, 16, 8)
    changed = (a - b).abs().amax(dim=(0, 3)) > 0
    assert changed[0, 0] and changed.sum() == 1  # pixel (0, 0) reaches pixels 0-1: patch (0, 0) only


def test_patch_overlap():
    """``patch_overlap``: kernel 2p-1, stride p, padding p-1: same grid, and a pixel on a patch border reaches
    both neighbouring patches (p=2: pixel 1 sits in patch 0 and under the kernel of patch 1)."""
    model = nestvit.create_model("nestv_tiny_cifar", in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32),
                                 num_heads=(1, 2, 4), depths=1, patch_overlap=True).eval()
    assert model.patch_embed.proj.weight.shape == (8, 1, 3, 3)
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 1, 1] += 1.0
    with torch.no_grad():
        a, b = (model._embed(t) for t in (x, x2))
    assert a.shape == (2, 16, 16, 8)
    changed = (a - b).abs().amax(dim=(0, 3)) > 0
    assert changed[:2, :2].all() and changed.sum() == 4
    plain = nestvit.create_model("nestv_tiny_cifar", patch_size=4, num_levels=2, embed_dims=8, num_heads=1, depths=1)
    wide = nestvit.create_model("nestv_tiny_cifar", patch_size=4, num_levels=2, embed_dims=8, num_heads=1, depths=1,
                                patch_overlap=True)
    assert wide.patch_embed.proj.weight.shape[-2:] == (7, 7) and plain.patch_embed.proj.weight.shape[-2:] == (4, 4)
    assert wide(torch.randn(1, 3, 32, 32)).shape == (1, wide.num_classes)


def test_conv_stem_depth():
    """``stem_depth=2``: two conv3x3 layers, so a pixel reaches two pixels away (5x5 receptive field)."""
    model = nestvit.create_model("nestv_tiny_cifar", in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32),
                                 num_heads=(1, 2, 4), depths=1, stem_dim=6, stem_depth=2).eval()
    assert [k for k in model.state_dict() if k.startswith("patch_embed.stem") and k.endswith("weight")] == [
        "patch_embed.stem.0.weight", "patch_embed.stem.1.weight", "patch_embed.stem.3.weight",
        "patch_embed.stem.4.weight"]  # the first layer keeps the keys of a one-layer stem
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 0, 0] += 1.0
    with torch.no_grad():
        a, b = (model._embed(t) for t in (x, x2))
    changed = (a - b).abs().amax(dim=(0, 3)) > 0
    assert changed[:2, :2].all() and changed.sum() == 4  # pixels 0-2 reach patches 0-1 along each axis


def test_patch_blur():
    """``patch_blur``: a fixed [1, 2, 1]^2 / 16 filter before the stride-p embedding: no new weights in the
    state dict, a flat image stays flat inside, and a pixel reaches the patches beside it (anti-aliasing)."""
    kw = dict(in_chans=1, patch_size=2, num_levels=3, embed_dims=(8, 16, 32), num_heads=(1, 2, 4), depths=1)
    plain = nestvit.create_model("nestv_tiny_cifar", **kw).eval()
    blur = nestvit.create_model("nestv_tiny_cifar", patch_blur=True, **kw).eval()
    assert blur.state_dict().keys() == plain.state_dict().keys()
    blur.load_state_dict(plain.state_dict())
    flat = torch.full((1, 1, 32, 32), 0.7)
    assert torch.allclose(blur.patch_embed.blur(flat)[..., 1:-1, 1:-1], flat[..., 1:-1, 1:-1])
    x = torch.randn(2, 1, 32, 32)
    x2 = x.clone()
    x2[:, :, 2, 2] += 1.0  # the first pixel of patch (1, 1)
    with torch.no_grad():
        for model, reach in ((plain, [(1, 1)]), (blur, [(0, 0), (0, 1), (1, 0), (1, 1)])):
            changed = ((model._embed(x) - model._embed(x2)).abs().amax(dim=(0, 3)) > 0).nonzero().tolist()
            assert changed == [list(p) for p in reach]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert blur(x).shape == (2, blur.num_classes)


def test_local_conv_crosses_block_borders_within_a_level():
    """``local_conv``: a depthwise conv3x3 before every layer; a changed token then reaches the neighbouring
    blocks inside level 0 (and their attention the whole of them), which plain NesT keeps inside its block."""
    kw = dict(in_chans=1, patch_size=1, num_levels=2, block_size=4, embed_dims=(8, 16), num_heads=(1, 2),
              depths=(2, 1))  # depth 2: the second conv sees what the first layer's attention spread
    plain = nestvit.create_model("nestv_tiny_cifar", img_size=8, **kw).eval()
    local = nestvit.create_model("nestv_tiny_cifar", img_size=8, local_conv=True, **kw).eval()
    assert len(local.levels[0].local_convs) == 2 and not plain.levels[0].local_convs
    assert local.levels[0].local_convs[0].weight.shape == (8, 1, 3, 3)
    x = torch.randn(2, 8, 8, 8)  # (B, H, W, C) level-0 input: 2x2 blocks of 4x4 tokens
    x2 = x.clone()
    x2[:, 3, 3] += torch.randn(8)  # the bottom-right token of block (0, 0)
    with torch.no_grad():
        changed = [((m.levels[0](x) - m.levels[0](x2)).abs().amax(dim=(0, 3)) > 0) for m in (plain, local)]
    assert changed[0][:4, :4].all() and changed[0].sum() == 16  # block (0, 0) only
    assert changed[1].all()  # all four blocks
    local(torch.randn(2, 1, 8, 8)).square().mean().backward()
    assert all(c.weight.grad.abs().sum() > 0 for level in local.levels for c in level.local_convs)


def test_experiment_reuses_a_run_saved_under_the_old_model_name(tmp_path):
    """``nestvit experiment best_fashion_mnist`` reads back an hour trained when the recipe said
    ``nest_tiny_cifar`` with ``stem_dim`` (and the trainer saved ``cpu_chunk_tokens``), instead of retraining."""
    import yaml

    from nestvit import experiments as E
    from nestvit.train.config import TrainConfig, builtin_recipes, from_dict, read_recipe, to_dict

    raw, _ = read_recipe(builtin_recipes()["results_best_fashion_mnist"])
    planned = from_dict(TrainConfig, raw)
    old = {**raw, "model": {"name": "nest_tiny_cifar", "overrides": {**raw["model"]["overrides"],
                                                                      "cpu_chunk_tokens": 8192}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(from_dict(TrainConfig, old))))
    assert E._same_config(tmp_path, planned)
    other = {**old, "model": {**old["model"], "overrides": {**old["model"]["overrides"], "stem_dim": 48}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(from_dict(TrainConfig, other))))
    assert not E._same_config(tmp_path, planned)
