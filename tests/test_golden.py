"""Conformance with timm's NesT and TNT (files in ../shared/golden, see its README) to 1e-5."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from nestvit.interop import from_timm

CASES = ["nest_cifar_like", "nest_imagenet_like", "tnt_small_image"]


def _read(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    sd = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return meta, sd, tensors


@pytest.mark.parametrize("case", CASES)
def test_golden_features_and_logits_match_timm(case, golden_dir):
    meta, sd, t = _read(golden_dir / f"{case}.safetensors")
    model = from_timm(meta["timm_class"], json.loads(meta["timm_kwargs"]), sd)
    assert not model.training
    with torch.no_grad():
        feats = model.forward_features(t["input"])
        logits = model.forward_head(feats)
        assert (feats - t["features"]).abs().max().item() <= 1e-5
        assert (logits - t["logits"]).abs().max().item() <= 1e-5
        assert (model(t["input"]) - t["logits"]).abs().max().item() <= 1e-5


def test_golden_loads_through_create_model_weights(golden_dir, tmp_path):
    """``create_model(name, weights=PATH)`` reads timm-format files (here: the golden NesT's weights)."""
    from safetensors.torch import save_file

    from nestvit import create_model

    meta, sd, t = _read(golden_dir / "nest_cifar_like.safetensors")
    path = tmp_path / "timm_nest.safetensors"
    save_file(sd, str(path))
    kw = json.loads(meta["timm_kwargs"])
    model = create_model("nest_tiny_cifar", weights=path, embed_dims=tuple(kw["embed_dims"]),
                         num_heads=tuple(kw["num_heads"]), depths=tuple(kw["depths"]), attn="mha", act="gelu").eval()
    with torch.no_grad():
        assert (model(t["input"]) - t["logits"]).abs().max().item() <= 1e-5
