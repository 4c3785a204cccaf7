"""``nestvit export``: ONNX (checked with onnxruntime) and torch.export programs of a trained model."""

from __future__ import annotations

import json
import re

import pytest
import torch

import nestvit
from nestvit.cli import main
from nestvit.contract import ContractError, RunContract, read_contract
from nestvit.interop import save_weights
from tests.conftest import TINY_CLASSIFIER as TINY


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
    # bench reads the export's architecture and says that it times PyTorch, not onnxruntime
    assert main(["bench", str(path), "--mode", "infer", "--compile", "off", "--dtype", "fp32", "--batch", "1",
                 "--warmup", "0", "--iters", "1", "--no-memory", "--no-data"]) == 0
    assert "is an export: bench times its architecture (nest_tiny_cifar) in PyTorch" in capsys.readouterr().err


def test_pt2_program(weights, tmp_path, capsys):
    out = tmp_path / "m.pt2"
    assert main(["export", str(weights), "--format", "pt2", "--out", str(out)]) == 0
    assert "checked with torch.export.load" in capsys.readouterr().out
    import zipfile

    assert {n.split("/")[0] for n in zipfile.ZipFile(out).namelist()} == {"m"}  # its own name, not a temporary one
    program = torch.export.load(str(out))
    x = torch.randn(4, 1, 16, 16)
    assert torch.allclose(program.module()(x), nestvit.load(weights).model(x), atol=1e-5)


def test_export_bad_input_is_one_line(weights, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["export", str(weights), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    notes = tmp_path / "notes.txt"  # before: ONNX bytes written over it, exit 0
    notes.write_text("mine")
    assert main(["export", str(weights), "--out", str(notes)]) == 2
    assert "onnx exports are .onnx files; name it notes.onnx" in capsys.readouterr().err
    assert main(["export", str(weights), "--format", "onnx", "--out", str(tmp_path / "m.pt2")]) == 2
    assert notes.read_text() == "mine" and not (tmp_path / "m.pt2").exists()
    for opset, said in ((999, "--opset 999: the installed onnx knows opsets up to"),
                        (17, "--opset 17: this model cannot be converted to it (the exporter's own opset is 18)")):
        assert main(["export", str(weights), "--opset", str(opset), "--out", str(tmp_path / "o.onnx")]) == 2
        err = capsys.readouterr().err  # before: opset 18 written, exit 0, with a traceback of the converter
        assert said in err and "Traceback" not in err and not (tmp_path / "o.onnx").exists()
    assert main(["export", str(weights), "--out", str(notes / "m.onnx")]) == 2  # a file where a folder goes
    assert "--out " + str(notes) + ": exists and is not a folder" in capsys.readouterr().err


def test_export_format_follows_out_and_a_replaced_file_is_said(weights, tmp_path, capsys):
    assert main(["export", str(weights), "--out", str(tmp_path / "m.pt2")]) == 0
    assert "wrote " + str(tmp_path / "m.pt2") + " (" in capsys.readouterr().out  # pt2 from the suffix
    assert main(["export", str(weights), "--out", str(tmp_path / "m.pt2")]) == 0
    assert "m.pt2 (replacing the file there)" in capsys.readouterr().out
    mine = tmp_path / "mine.safetensors"  # a weights file of the user's name: its export takes that name
    mine.write_bytes(weights.read_bytes())
    assert main(["export", str(mine), "--format", "pt2", "--no-check"]) == 0
    assert (tmp_path / "mine.pt2").is_file() and not (tmp_path / "model.pt2").exists()


@pytest.mark.parametrize("name", ["tnt_tiny_patch4_32", "rtnt_nano", "vit_tiny_patch4_32", "convnet"])
def test_every_family_exports_with_a_dynamic_batch(name, tmp_path, capsys):
    from tests.conftest import tiny_overrides

    kwargs = tiny_overrides(name) if name != "convnet" else {"widths": [8, 16], "img_size": 16}
    model = nestvit.create_model(name, **kwargs)
    weights = save_weights(model, tmp_path / "w.safetensors")  # the contract create_model recorded
    assert main(["export", str(weights), "--format", "pt2"]) == 0
    assert "batches of 2 and 3" in capsys.readouterr().out


def test_predict_and_eval_read_the_onnx_export(weights, tmp_path, capsys):
    """What is shipped is checked with the same commands as the run: the same predictions and accuracy."""
    pytest.importorskip("onnxruntime", reason="install the test extras: pip install -e '.[test]'")
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "photos"
    for c in "abc":
        (folder / "test" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(folder / "test" / c / f"{i}.png")
    assert main(["export", str(weights), "--out", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m.onnx")]) == 2  # was an internal error of torch.export
    assert "is an export already; export the run folder or weights file" in capsys.readouterr().err
    with pytest.raises(ContractError, match="is an export"):  # was an empty model.safetensors
        nestvit.save_pretrained(tmp_path / "m.onnx", tmp_path / "shared")
    assert not (tmp_path / "shared").exists()
    for source in (weights, tmp_path / "m.onnx"):
        out = tmp_path / f"ev_{source.suffix[1:]}"
        assert main(["eval", str(source), "--data", str(folder), "--out", str(out)]) == 0
        assert main(["predict", str(source), str(folder), "--out", str(out / "p.jsonl")]) == 0
    capsys.readouterr()
    run, shipped = (json.loads((tmp_path / f"ev_{s}" / "eval.json").read_text()) for s in ("safetensors", "onnx"))
    assert run["count"] == shipped["count"] == 9 and run["top1"] == shipped["top1"]
    assert shipped["loss"] == pytest.approx(run["loss"], abs=1e-5)
    a, b = ([json.loads(x) for x in (tmp_path / f"ev_{s}" / "p.jsonl").read_text().splitlines()]
            for s in ("safetensors", "onnx"))
    assert [r["top"][0]["class"] for r in a] == [r["top"][0]["class"] for r in b]
    assert max(abs(x["prob"] - y["prob"]) for r, s in zip(a, b) for x, y in zip(r["top"], s["top"])) < 1e-5


def test_exports_that_predict_does_not_read_are_one_line(weights, tmp_path, capsys):
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (16, 16)).save(image)
    (tmp_path / "junk.onnx").write_text("junk")
    assert main(["predict", str(tmp_path / "junk.onnx"), str(image)]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    assert main(["export", str(weights), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    assert main(["predict", str(tmp_path / "m.pt2"), str(image)]) == 2
    assert "may unpickle" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "m.pt2"), "--weights", "last", "--data", "x"]) == 2
    assert "is an exported model: its weights and architecture are fixed" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "m.pt2"), str(image), "--out", str(tmp_path / "ex")]) == 2
    assert "gradcat needs the PyTorch model" in capsys.readouterr().err


def test_an_onnx_export_without_class_names_predicts_and_loads_in_python(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="install the test extras: pip install -e '.[test]'")
    from PIL import Image

    model = nestvit.create_model("nest_tiny_cifar", **TINY)  # create_model's contract: no classes, no transform
    weights = save_weights(model, tmp_path / "w.safetensors")
    assert main(["export", str(weights), "--out", str(tmp_path / "m.onnx")]) == 0
    Image.new("L", (16, 16)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "m.onnx"), str(tmp_path / "x.png"), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.count("%") == 2
    assert read_contract(tmp_path / "m.onnx").model == "nest_tiny_cifar"  # what bench reads of a file
    loaded = nestvit.load(tmp_path / "m.onnx")  # the one loader reads exports too
    assert loaded.classes == ["class0", "class1", "class2"]
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(loaded.model(x), nestvit.load(weights).model(x), atol=1e-4)
    # what the PyTorch model refuses, the export refuses too (before: logits of raw 0..255 pixels, raw runtime errors)
    for bad, says in ((torch.zeros(1, 1, 16, 16, dtype=torch.uint8), "takes normalised float images, not torch.uint8"),
                      (x[0], r"got shape \(1, 16, 16\); one image: add the batch dimension"),
                      (torch.randn(1, 1, 8, 8), "was built for 16x16 input, got 8x8; resize the images")):
        with pytest.raises((TypeError, ValueError), match=says):
            loaded.model(bad)
    with pytest.raises(ContractError, match="exported model"):
        nestvit.load(tmp_path / "m.onnx", "last")
    # occlusion needs forward passes only: it explains what you ship, and as the PyTorch model does
    reports = []
    for source in (tmp_path / "m.onnx", weights):
        out = tmp_path / f"ex_{source.suffix[1:]}"
        assert main(["explain", str(source), str(tmp_path / "x.png"), "--method", "occlusion", "--threshold", "0.5",
                     "--json", "--out", str(out)]) == 0
        reports.append(json.loads((out / "explain.json").read_text())["images"][0])
        assert (out / "x_occlusion.png").is_file()
    assert reports[0]["class"] == reports[1]["class"] and reports[0]["box"] == reports[1]["box"]
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "m.onnx"), str(tmp_path / "x.png"), "--method", "cam"]) == 2
    assert "cam needs the PyTorch model" in (err := capsys.readouterr().err) and "--method occlusion" in err


def test_predict_with_tta_averages_the_views_softmax(weights, tmp_path):
    """``predict --tta`` scores as ``eval --tta`` does: the mean of the views' softmax outputs."""
    import json

    import numpy as np
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)).save(image)
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(weights), str(image), "--tta", "flip", "--top-k", "3", "--out", str(out)]) == 0
    got = {t["class"]: t["prob"] for t in json.loads(out.read_text())["top"]}
    loaded = nestvit.load(weights)
    x = loaded.transform.read_batch([image])
    with torch.no_grad():
        want = sum(loaded.model(loaded.transform(v)).softmax(-1)[0] for v in (x, x.flip(-1))) / 2
    assert got == pytest.approx({c: float(p) for c, p in zip(loaded.classes, want)}, abs=1e-6)


@pytest.mark.parametrize("generator", ["nest_tiny", "conv_tiny"])
def test_a_generator_exports_noise_to_images(generator, tmp_path, capsys):
    """A GAN run's EMA generator as ONNX (z -> images, dynamic batch, checked) and as a pt2 program; commands
    that read classifier exports say what the file is."""
    ort = pytest.importorskip("onnxruntime", reason="install the test extras: pip install -e '.[test]'")
    from nestvit.generate.train import GanConfig, load_generator, train_gan

    run = tmp_path / "gan"
    cfg = GanConfig(generator=generator, discriminator="resnet_tiny", batch_size=8, steps=1, eval_every=-1,
                    progress=False, sample_n=4)
    train_gan(cfg, run, data=torch.full((16, 3, 16, 16), 200, dtype=torch.uint8), log=lambda s: None)
    assert main(["export", str(run)]) == 0
    out = capsys.readouterr().out
    assert "input z (B, " in out and "images in [-1, 1]" in out and "max |difference|" in out
    onnx_file = run / "generator.onnx"
    G = load_generator(run)
    z = torch.randn(5, G.latent_dim)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["z"] and session.get_outputs()[0].name == "images"
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"z": z.numpy()})[0]), G(z), atol=1e-4, rtol=0)
    assert read_contract(onnx_file).kind == "generator"
    assert main(["predict", str(onnx_file), str(onnx_file)]) == 2
    assert "holds a generator" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "pt2"]) == 0
    assert (run / "generator.pt2").is_file() and not list(run.glob(".*unchecked*"))
    assert "Expect archive file" not in capsys.readouterr().err
    assert main(["export", str(run), "--format", "pt2", "--weights", "raw"]) == 0  # beside the EMA's, not over it
    assert (run / "generator_raw.pt2").is_file() and (run / "generator.pt2").is_file()


def test_for_export_gives_python_users_a_dynamic_batch():
    # what `nestvit export` does, from Python: without it the batch is fixed in the graph
    model = nestvit.create_model("nest_tiny_cifar", **TINY).eval()
    x = torch.randn(2, 1, 16, 16)
    from nestvit.export import for_export

    with for_export():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    y = torch.randn(5, 1, 16, 16)
    assert torch.allclose(program.module()(y), model(y), atol=1e-5)


def test_export_onnx_from_python_has_a_dynamic_batch(weights, tmp_path):
    # before: called outside for_export(), the batch of the example was fixed in the graph, and predict of
    # the file (whose contract nestvit accepts) failed on any other batch as an internal error
    pytest.importorskip("onnxruntime", reason="install the test extras: pip install -e '.[test]'")
    from nestvit.export import export_onnx

    loaded = nestvit.load(weights)
    path = export_onnx(loaded.model, torch.randn(1, 1, 16, 16), tmp_path / "direct.onnx",  # one image: batch 1
                       contract_json=loaded.contract.to_json())
    exported = nestvit.load(path)
    for batch in (1, 3):
        y = torch.randn(batch, 1, 16, 16)
        assert torch.allclose(exported.model(y), loaded.model(y), atol=1e-4)
