"""Conformance with the official JAX/Flax NesT (../shared/golden/official, see its README) to 1e-5.

``from_official`` builds a ``Nest`` from the official model's Flax parameters; ``read_official_checkpoint``
reads them from a flax.serialization msgpack checkpoint, which the tests write themselves.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from nestvit.errors import UserError
from nestvit.interop import WeightsError, from_official, read_official_checkpoint
from nestvit.models.nest import Nest, NestConfig

TOL = 1e-5


@pytest.fixture
def golden(golden_dir):
    path = golden_dir / "official" / "gray_mqa_c1.safetensors"
    if not path.is_file():
        pytest.fail(f"official golden file not found at {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = {k[len("flax/"):]: v for k, v in tensors.items() if k.startswith("flax/")}
    return meta, params, tensors


def _outputs(model, x):
    with torch.no_grad():
        feats, maps = model.forward_intermediates(x)
        return model.forward_head(feats), maps


def _max_err(a, b):
    return (a - b).abs().max().item()


def test_golden_logits_and_levels_match_the_official_model(golden):
    meta, params, t = golden
    model = from_official(params, **json.loads(meta["nestvit_config"]))
    assert not model.training
    logits, maps = _outputs(model, t["input"])
    assert _max_err(logits, t["logits"]) <= TOL
    assert len(maps) == 3
    for i, level in enumerate(maps):
        assert level.shape == t[f"level{i}"].shape
        assert _max_err(level, t[f"level{i}"]) <= TOL
    with torch.no_grad():
        assert _max_err(model(t["input"]), t["logits"]) <= TOL


def test_architecture_is_read_from_the_parameters(golden):
    """Only the layers per level (equal widths) must be given; numpy arrays work as well as tensors."""
    meta, params, t = golden
    model = from_official({k: v.numpy() for k, v in params.items()}, depths=json.loads(meta["flax_depths"]))
    assert model.cfg == NestConfig(**json.loads(meta["nestvit_config"]))
    assert model.cfg.act == "gelu_tanh" and model.cfg.pool_pad == "same"  # the official code's
    logits, _ = _outputs(model, t["input"])
    assert _max_err(logits, t["logits"]) <= TOL


@pytest.mark.parametrize("override", [{"act": "gelu"}, {"pool_pad": "symmetric"}])
def test_overrides_apply_and_the_official_defaults_matter(golden, override):
    meta, params, t = golden
    model = from_official(params, **{**json.loads(meta["nestvit_config"]), **override})
    assert all(getattr(model.cfg, k) == v for k, v in override.items())
    logits, _ = _outputs(model, t["input"])
    assert _max_err(logits, t["logits"]) > 1e-4  # the golden's parameters make such a change visible


def test_equal_width_levels_need_depths(golden):
    _, params, _ = golden
    with pytest.raises(WeightsError, match=r"pass depths=\(\.\.\.\)"):
        from_official(params)
    with pytest.raises(WeightsError, match="4 encoder layers in 3 levels"):
        from_official(params, depths=(1, 1, 1))


def test_missing_and_left_over_parameters_are_one_error(golden):
    meta, params, _ = golden
    cfg = json.loads(meta["nestvit_config"])
    bad = dict(params)
    del bad["EncoderNDBlock_1/LayerNorm_1/scale"]
    bad["EncoderNDBlock_1/BatchNorm_0/mean"] = torch.zeros(32)
    with pytest.raises(WeightsError) as e:
        from_official(bad, **cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing" in msg and "EncoderNDBlock_1/LayerNorm_1/scale" in msg
    assert "1 left over" in msg and "EncoderNDBlock_1/BatchNorm_0/mean" in msg
    assert isinstance(e.value, UserError)


def test_overrides_that_contradict_the_parameters_are_refused(golden):
    meta, params, _ = golden
    cfg = json.loads(meta["nestvit_config"])
    with pytest.raises(WeightsError, match=r"contradicts.*num_heads=\(4, 4, 4\).*\(2, 2, 2\)"):
        from_official(params, **{**cfg, "num_heads": 4})
    with pytest.raises(WeightsError, match="not NestConfig fields"):
        from_official(params, **cfg, heads=2)
    with pytest.raises(WeightsError, match="not parameters of the official NestNet"):
        from_official({"Dense_0/kernel": torch.zeros(2, 2),
                       "PositionEmbedding_0/pos_embedding": torch.zeros(1, 1, 4, 2)})
    with pytest.raises(WeightsError, match="non-empty mapping"):
        from_official({})


# ----------------------------------------------------------------------------------------------
# Other layouts: a nestvit model written out in the official layout (the inverse mapping) reads back
# ----------------------------------------------------------------------------------------------

def _to_official(model: Nest) -> dict[str, torch.Tensor]:
    """nestvit ``Nest`` -> official Flax parameter paths (the inverse of ``from_official``, for these tests)."""
    cfg, sd = model.cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"PatchEmbedding_0/Conv_0/kernel": sd["patch_embed.proj.weight"].permute(2, 3, 1, 0),
           "PatchEmbedding_0/Conv_0/bias": sd["patch_embed.proj.bias"],
           "LayerNorm_0/scale": sd["norm.weight"], "LayerNorm_0/bias": sd["norm.bias"],
           "Dense_0/kernel": sd["head.weight"].t(), "Dense_0/bias": sd["head.bias"]}
    k = 0
    for level in range(cfg.num_levels):
        p = f"levels.{level}."
        out[f"PositionEmbedding_{level}/pos_embedding"] = sd[p + "pos_embed"]
        if level:
            pool = f"ConvPool_{level - 1}/"
            out[pool + "Conv_0/kernel"] = sd[p + "pool.conv.weight"].permute(2, 3, 1, 0)
            out[pool + "Conv_0/bias"] = sd[p + "pool.conv.bias"]
            out[pool + "LayerNorm_0/scale"] = sd[p + "pool.norm.weight"]
            out[pool + "LayerNorm_0/bias"] = sd[p + "pool.norm.bias"]
        C, H = cfg.embed_dims[level], cfg.num_heads[level]
        D = C // H
        for i in range(cfg.depths[level]):
            s, b = f"{p}transformer_encoder.{i}.", f"EncoderNDBlock_{k}/"
            for n, flax_n in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_1")):
                out[f"{b}{flax_n}/scale"], out[f"{b}{flax_n}/bias"] = sd[s + n + ".weight"], sd[s + n + ".bias"]
            for n, flax_n in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
                out[f"{b}MlpBlock_0/{flax_n}/kernel"] = sd[f"{s}mlp.{n}.weight"].t()
                out[f"{b}MlpBlock_0/{flax_n}/bias"] = sd[f"{s}mlp.{n}.bias"]
            a = b + ("MultiQueryAttention_0/" if cfg.attn == "mqa" else "MultiHeadAttention_0/")
            kv = 1 if cfg.attn == "mqa" else H
            w = sd[s + "attn.qkv.weight"].t()  # (C, C + 2 kv D): [q | k | v]
            q, kk, v = w.split([C, kv * D, kv * D], dim=1)
            out[a + "DenseGeneral_0/kernel"] = q.reshape(C, H, D)
            if cfg.attn == "mqa":
                out[a + "Dense_0/kernel"] = torch.cat([kk, v], dim=1)  # (C, 2D)
            else:
                out[a + "DenseGeneral_1/kernel"] = torch.cat([kk.reshape(C, H, D), v.reshape(C, H, D)], dim=2)
            if cfg.qkv_bias:
                qb, kb, vb = sd[s + "attn.qkv.bias"].split([C, kv * D, kv * D])
                out[a + "DenseGeneral_0/bias"] = qb.reshape(H, D)
                if cfg.attn == "mqa":
                    out[a + "Dense_0/bias"] = torch.cat([kb, vb])
                else:
                    out[a + "DenseGeneral_1/bias"] = torch.cat([kb.reshape(H, D), vb.reshape(H, D)], dim=1)
            out[a + "proj_kernel"] = sd[s + "attn.proj.weight"].t().reshape(H, D, C)
            out[a + "bias"] = sd[s + "attn.proj.bias"]
            k += 1
    return out


@pytest.mark.parametrize("attn,qkv_bias", [("mha", False), ("mha", True), ("mqa", False)])
def test_imagenet_like_layouts_read_back_without_a_config(attn, qkv_bias):
    """Widths that grow per level (the ImageNet models) let every field be read from the shapes."""
    torch.manual_seed(0)
    cfg = NestConfig(img_size=32, in_chans=3, num_classes=7, patch_size=2, num_levels=3, block_size=4,
                     embed_dims=(8, 16, 32), num_heads=(1, 2, 4), depths=(2, 1, 3), mlp_ratio=2.0,
                     qkv_bias=qkv_bias, attn=attn, act="gelu_tanh")
    ref = Nest(cfg).eval()
    for p in ref.parameters():  # non-trivial values everywhere, so a layout mistake shows
        torch.nn.init.normal_(p, std=0.3)
    model = from_official(_to_official(ref))
    assert model.cfg == cfg
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (a, maps_a), (b, maps_b) = _outputs(ref, x), _outputs(model, x)
    assert _max_err(a, b) <= TOL and all(_max_err(u, v) <= TOL for u, v in zip(maps_a, maps_b))


# ----------------------------------------------------------------------------------------------
# read_official_checkpoint: flax.serialization's msgpack format, written here without flax
# ----------------------------------------------------------------------------------------------

def _nest(flat: dict[str, torch.Tensor]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v.numpy()
    return tree


def _chunked(arr: np.ndarray, chunks: int) -> dict:
    """flax's form of an array over 1 GiB: flat chunks and the shape, as dicts keyed "0", "1", ..."""
    return {"__msgpack_chunked_array__": True, "shape": {str(i): s for i, s in enumerate(arr.shape)},
            "chunks": {str(i): c for i, c in enumerate(np.array_split(arr.reshape(-1), chunks))}}


class _BF16:
    """A bfloat16 leaf (jax's dtype; numpy has none): flax writes its raw 2-byte values, dtype name "bfloat16"."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t.to(torch.bfloat16)


def _flax_msgpack(tree) -> bytes:
    msgpack = pytest.importorskip("msgpack")

    def ext(x):  # ExtType 1 (arrays) / 3 (numpy scalars) holding msgpack (shape, dtype name, C-order bytes)
        if isinstance(x, _BF16):
            raw = x.t.view(torch.int16).numpy().tobytes()
            return msgpack.ExtType(1, msgpack.packb((tuple(x.t.shape), "bfloat16", raw), use_bin_type=True))
        if isinstance(x, (np.ndarray, np.generic)):
            a = np.asarray(x)
            payload = msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)
            return msgpack.ExtType(1 if isinstance(x, np.ndarray) else 3, payload)
        raise TypeError(type(x))

    return msgpack.packb(tree, default=ext, strict_types=True)


def test_read_official_checkpoint_round_trip(golden, tmp_path):
    """A CLU checkpoint of the official trainer (TrainState: step, optimizer {target, state}, model_state)."""
    meta, params, t = golden
    target = _nest(params)
    target["PositionEmbedding_0"]["pos_embedding"] = _chunked(target["PositionEmbedding_0"]["pos_embedding"], 3)
    moments = _nest({k: torch.zeros_like(v) for k, v in params.items()})
    state = {"step": np.int32(5000), "optimizer": {"target": target, "state": {"step": np.int32(5000),
                                                                                "param_states": moments}},
             "model_state": {}}
    folder = tmp_path / "nest_ckpt"
    folder.mkdir()
    (folder / "ckpt-2.flax").write_bytes(b"an older checkpoint: not read")
    (folder / "ckpt-10.flax").write_bytes(_flax_msgpack(state))
    (folder / "ckpt-10.index").write_bytes(b"tensorflow state: not read")

    for path in (folder / "ckpt-10.flax", folder, folder / "ckpt-10"):
        read = read_official_checkpoint(path)
        assert sorted(read) == sorted(params)
        assert all(torch.equal(read[k], params[k]) and read[k].dtype == torch.float32 for k in params)
    model = from_official(read, depths=json.loads(meta["flax_depths"]))
    logits, _ = _outputs(model, t["input"])
    assert _max_err(logits, t["logits"]) <= TOL


def test_read_train_state_params_and_bfloat16(golden, tmp_path):
    """flax.training's TrainState keeps the weights under ``params`` (here wrapped once more: variables)."""
    _, params, _ = golden
    tree = _nest(params)
    tree["Dense_0"]["kernel"] = _BF16(params["Dense_0/kernel"])
    (tmp_path / "checkpoint_3").write_bytes(b"an older checkpoint: not read")
    (tmp_path / "checkpoint_12").write_bytes(_flax_msgpack({"step": np.int64(1), "params": {"params": tree},
                                                            "opt_state": {}}))
    read = read_official_checkpoint(tmp_path)
    assert sorted(read) == sorted(params)
    assert read["Dense_0/kernel"].dtype == torch.bfloat16
    assert torch.equal(read["Dense_0/kernel"], params["Dense_0/kernel"].to(torch.bfloat16))
    assert from_official(read, depths=(1, 1, 2)).head.weight.dtype == torch.float32  # cast to the model's


def test_read_official_checkpoint_errors(tmp_path):
    pytest.importorskip("msgpack")
    with pytest.raises(WeightsError, match="no such checkpoint"):
        read_official_checkpoint(tmp_path / "missing.flax")
    with pytest.raises(WeightsError, match="no Flax checkpoint in this folder"):
        read_official_checkpoint(tmp_path)
    broken = tmp_path / "ckpt-1.flax"
    broken.write_bytes(_flax_msgpack({"params": {"Dense_0": {"kernel": np.zeros((3, 2), np.float32)}}})[:-5])
    with pytest.raises(WeightsError, match="cannot read a Flax msgpack checkpoint"):
        read_official_checkpoint(broken)
    other = tmp_path / "other.flax"
    other.write_bytes(_flax_msgpack({"model": {"w": np.zeros(2, np.float32)}}))
    with pytest.raises(WeightsError, match="no parameters under optimizer/target or params"):
        read_official_checkpoint(other)
