"""``nestvit export``: ONNX (checked with onnxruntime) and torch.export programs of a trained model."""

from __future__ import annotations

import re

import pytest
import torch

import nestvit
from nestvit.cli import main
from nestvit.contract import InputTransform, RunContract
from nestvit.interop import save_weights

TINY = dict(img_size=16, in_chans=1, num_classes=3, patch_size=2, num_levels=2, block_size=4, embed_dims=8,
            num_heads=2, depths=1)


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    contract = RunContract(model="nest_tiny_cifar", kwargs=TINY, classes=("a", "b", "c"),
                           transform=InputTransform(channels=1, size=(16, 16), mean=(0.5,), std=(0.25,)))
    return save_weights(model, tmp_path / "run" / "best.safetensors", contract=contract)


def test_onnx_with_dynamic_batch_checked_by_onnxruntime(weights, capsys):
    pytest.importorskip("onnxruntime", reason="install the test extras: pip install -e '.[test]'")
    import numpy as np
    import onnx
    import onnxruntime as ort

    assert main(["export", str(weights.parent), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    path = weights.parent / "model.onnx"
    assert f"wrote {path}" in out and "checked with onnxruntime on batches of 2 and 3" in out
    assert float(re.search(r"max \|difference\| ([\d.e+-]+)", out).group(1)) < 1e-4
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert RunContract.from_json(meta["nestvit.contract"]).classes == ("a", "b", "c")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 16, 16)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    want = nestvit.load(weights).model(x).detach().numpy()
    assert np.abs(got - want).max() < 1e-4


def test_pt2_program(weights, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert main(["export", str(weights), "--format", "pt2", "--out", str(out)]) == 0
    assert "checked with torch.export.load" in capsys.readouterr().out
    program = torch.export.load(str(out))
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(program.module()(x), nestvit.load(weights).model(x), atol=1e-5)


def test_export_bad_input_is_one_line(weights, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["export", str(weights), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tnt_tiny_patch4_32", "rtnt_nano", "vit_tiny_patch4_32", "convnet"])
def test_every_family_exports_with_a_dynamic_batch(name, tmp_path, capsys):
    from tests.conftest import tiny_overrides

    kwargs = tiny_overrides(name) if name != "convnet" else {"widths": [8, 16], "img_size": 16}
    model = nestvit.create_model(name, **kwargs)
    weights = save_weights(model, tmp_path / "w.safetensors")  # the contract create_model recorded
    assert main(["export", str(weights), "--format", "pt2"]) == 0
    assert "batches of 2 and 3" in capsys.readouterr().out
