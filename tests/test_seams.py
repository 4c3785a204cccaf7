"""Where the commands meet: what one command writes, every other command reads.

One chain per model family, at tiny sizes on the built-in real digits (``mnist5k``): ``nestvit train`` (a
few steps of the README's recipe) -> ``eval`` -> ``predict`` -> ``explain`` with every method the family
supports -> ``train --resume`` -> ``nestvit.load`` of the run and of the bare weights file, with the same
logits as ``predict`` printed. And the GAN's: ``generate train`` -> ``generate sample`` -> resume.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import nestvit
from nestvit.cli import main
from nestvit.train.config import load_config

# every family of the registry, tiny, on mnist5k digits padded to 32x32 (the README recipe's data)
FAMILIES = {
    "nest": ("nest_tiny_cifar", {"patch_size": 2, "num_levels": 3, "block_size": 4, "embed_dims": 8,
                                 "num_heads": 2, "depths": 1}, ("gradcat", "cam", "gradcam")),
    "tnt": ("tnt_tiny_patch4_32", {"dims": [16, 4], "num_heads": [2, 1], "depth": 2}, ("gradcam", "rollout")),
    "rtnt": ("rtnt_nano", {"dims": [16, 4, 4], "num_heads": [2, 1, 1], "depth": 2, "img_size": 32},
             ("gradcam", "rollout")),
    "vit": ("vit_tiny_patch4_32", {"embed_dim": 16, "depth": 2, "num_heads": 2}, ("gradcam", "rollout")),
    "convnet": ("convnet", {"widths": [8, 16]}, ("cam", "gradcam")),  # CAM: a pooled map and a linear head
}
METHODS = ("gradcat", "cam", "gradcam", "rollout")


def tiny_run_recipe(tmp_path, name: str, overrides: dict):
    """The README's ``mnist5k_nest`` recipe with another (tiny) model and 4 steps of 32 images."""
    recipe = yaml.safe_load(open(nestvit.train.config.builtin_recipes()["mnist5k_nest"]).read())
    recipe.update(epochs=1, global_batch=32, eval_batch=64, log_every=1, progress=False)
    recipe["model"] = {"name": name, "overrides": overrides}
    recipe["data"].update(limit_train=128, limit_eval=64)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def digit_png(tmp_path, index: int = 0):
    """A real test digit as a 28x28 grayscale PNG (what a user would pass to predict and explain)."""
    from nestvit.data import load_dataset

    image = load_dataset("mnist5k", split="test").images[index, 0].numpy()
    path = tmp_path / f"digit{index}.png"
    Image.fromarray(image).save(path)
    return path


def printed_probs(out: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\s+(\S+)\s+([\d.]+)%$", out, re.M)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_command_reads_what_train_writes(family, tmp_path, capsys):
    name, overrides, methods = FAMILIES[family]
    recipe = tiny_run_recipe(tmp_path, name, overrides)
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()

    assert main(["eval", str(run), "--limit", "32", "--out", str(tmp_path / "ev")]) == 0
    assert "mnist5k:test (32 images)" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["count"] == 32

    digit = digit_png(tmp_path)
    assert main(["predict", str(run), str(digit), "--top-k", "10"]) == 0
    probs = printed_probs(capsys.readouterr().out)
    assert len(probs) == 10 and abs(sum(probs.values()) - 100) < 0.1

    for method in METHODS:
        code = main(["explain", str(run), str(digit), "--method", method, "--out", str(tmp_path / "x"), "--json"])
        err = capsys.readouterr().err
        if method in methods:
            assert code == 0, err
            assert (tmp_path / "x" / f"digit0_{method}.png").read_bytes()[:4] == b"\x89PNG"
        else:  # a method the family cannot give: one line saying why, nothing half-written
            assert code == 2 and err.count("\n") == 1, err

    # the run contract: the bare weights file, copied away from its run, is the same model with the same inputs
    alone = tmp_path / "elsewhere" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((run / "best.safetensors").read_bytes())
    for source in (run, alone):
        loaded = nestvit.load(source)
        assert loaded.classes == [str(k) for k in range(10)] or len(loaded.classes) == 10
        x = loaded.transform(loaded.transform.read_batch([digit]))
        with torch.no_grad():
            p = loaded.model(x).softmax(-1)[0]
        got = {loaded.classes[k]: 100 * float(v) for k, v in enumerate(p)}
        assert all(abs(got[c] - probs[c]) < 0.006 for c in probs)  # predict prints two decimals
    assert nestvit.load(alone).config is None and nestvit.load(run).config is not None
    assert main(["eval", str(alone), "--limit", "32"]) == 0  # the data set comes from the contract
    assert "mnist5k:test (32 images)" in capsys.readouterr().out

    # resume continues, and what it writes still loads
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "resuming at epoch 2" in capsys.readouterr().out
    assert nestvit.load(run, "last").contract.info["epoch"] == 2


def test_readme_demo_then_explain_gradcat(tmp_path, capsys):
    """The issue's journey: ``nestvit train mnist5k_nest --out r && nestvit explain r digit.png --method gradcat``."""
    run = tmp_path / "r"
    assert main(["train", "mnist5k_nest", "--out", str(run), "--epochs", "1", "--set", "data.limit_train=128",
                 "--set", "data.limit_eval=64", "--set", "model.overrides.embed_dims=8",
                 "--set", "progress=false"]) == 0
    capsys.readouterr()
    digit = digit_png(tmp_path, 3)
    assert main(["explain", str(run), str(digit), "--method", "gradcat", "--top-k", "2", "--out",
                 str(tmp_path / "explain"), "--json"]) == 0
    report = json.loads((tmp_path / "explain" / "explain.json").read_text())
    assert [e["name"] for e in report["images"][0]["explained"]][0] in [str(k) for k in range(10)]
    loaded = nestvit.load(run)
    # the run padded 28x28 digits to 32x32: the transform says so, and reads a file the same way
    t = loaded.transform
    assert t.size == (32, 32) and t.content == (28, 28) and t.resize == "stretch" and t.channels == 1
    x = t.read(digit)
    assert x.shape == (1, 32, 32) and int(x[:, :2].sum()) == 0 and int(x[:, :, :2].sum()) == 0


def test_old_weights_files_still_load(tmp_path):
    """A run's weights file from before the run contract (``model_kwargs`` / ``mean`` / ``pad_to`` keys)."""
    from safetensors.torch import save_file

    kwargs = {"num_classes": 10, "in_chans": 1, "img_size": [32, 32], **FAMILIES["nest"][1]}
    model = nestvit.create_model("nest_tiny_cifar", **kwargs).eval()
    meta = {"format": "nestvit", "family": "nest", "model": "nest_tiny_cifar", "model_kwargs": json.dumps(kwargs),
            "classes": json.dumps([str(k) for k in range(10)]), "mean": json.dumps([0.13]),
            "std": json.dumps([0.3]), "pad_to": "32", "unpadded": "[28, 28]", "resize_to": "null",
            "data": '"mnist5k"', "epoch": "3", "step": "93"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"), meta)
    loaded = nestvit.load(tmp_path / "old.safetensors")
    assert loaded.transform.content == (28, 28) and loaded.transform.mean == (0.13,)
    assert loaded.contract.info == {"data": "mnist5k", "epoch": 3, "step": 93}
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded.model(x), model(x))


def test_gan_train_sample_resume(tmp_path, capsys):
    run = tmp_path / "gan"
    tiny = ["--set", "dataset=mnist5k", "--set", "max_images=64", "--set", "batch_size=8", "--set", "eval_every=-1",
            "--set", "generator_overrides.embed_dims=[8,8,4]", "--set", "generator_overrides.num_heads=[2,2,1]",
            "--set", "generator_overrides.depths=[1,1,1]", "--set", "progress=false", "--set", "sample_every=1000",
            "--set", "ckpt_every=2", "--set", "log_every=1", "--set", "sample_n=4"]
    assert main(["generate", "train", "gan_nest_fashion_mnist", "--out", str(run), "--set", "steps=2", *tiny]) == 0
    assert main(["generate", "sample", str(run), "-n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    loaded = nestvit.load(run)  # the EMA generator of the latest checkpoint
    assert loaded.contract.kind == "generator" and loaded.contract.info["step"] == 2
    assert loaded.transform.channels == 1 and loaded.transform.size == (28, 28)
    assert nestvit.load(run, "discriminator").contract.kind == "discriminator"
    assert main(["generate", "train", "--resume", str(run), "--set", "steps=4"]) == 0
    assert nestvit.load(run, "raw").contract.info["step"] == 4
    # a generator is not a classifier: the classifier commands say so in one line
    assert main(["predict", str(run), str(digit_png(tmp_path))]) == 2
    assert "not a classifier" in capsys.readouterr().err


def test_config_of_a_run_reads_back(tmp_path):
    """The trainer's ``config.yaml`` is the config system's own format (``load_config`` reads it)."""
    recipe = tiny_run_recipe(tmp_path, "vit_tiny_patch4_32", FAMILIES["vit"][1])
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    cfg = load_config(tmp_path / "run" / "config.yaml")
    assert cfg.model.name == "vit_tiny_patch4_32" and cfg.data.name == "mnist5k"
    assert np.isclose(sum(nestvit.load(tmp_path / "run").transform.std), sum(cfg.data.std))


def test_finetune_a_run_on_a_folder_at_another_size_channels_and_classes(tmp_path, capsys, monkeypatch):
    """#38's journey: a run trained on grey 32x32 digits (10 classes) -> `nestvit train finetune` on an RGB
    image folder of 3 classes at 64x64 -> eval, predict and export of the fine-tuned run."""
    recipe = tiny_run_recipe(tmp_path, *FAMILIES["nest"][:2])
    pre = tmp_path / "pre"
    assert main(["train", str(recipe), "--out", str(pre)]) == 0
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in ("cat", "dog", "eel"):
            folder = tmp_path / "pets" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    capsys.readouterr()
    run = tmp_path / "ft"
    monkeypatch.chdir(tmp_path)  # model.weights relative, as typed
    assert main(["train", "finetune", "--set", "model.weights=pre", "--set", f"data.root={tmp_path / 'pets'}",
                 "--set", "data.img_size=64", "--set", "data.workers=0", "--set", "global_batch=12",
                 "--set", "epochs=1", "--set", "progress=false", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "head: re-initialised for 3 classes (the weights had 10)" in out
    assert "resampled" in out and "from 1 to 3 input channels" in out
    loaded = nestvit.load(run)
    assert loaded.contract.model == "nest_tiny_cifar" and loaded.classes == ["cat", "dog", "eel"]
    assert loaded.transform.size == (64, 64) and loaded.transform.resize == "center-crop"
    assert loaded.contract.kwargs["embed_dims"] == 8  # the architecture came from the pretrained run
    card = (nestvit.save_pretrained(run, tmp_path / "shared") / "README.md").read_text()
    assert "| fine-tuned from | `pre` |" in card  # where it started, without the local path
    img = tmp_path / "pets" / "test" / "dog" / "0.png"
    assert main(["eval", str(run)]) == 0 and main(["predict", str(run), str(img)]) == 0
    assert main(["export", str(run), "--format", "pt2"]) == 0
    assert "max |difference|" in capsys.readouterr().out
    assert load_config(run / "config.yaml").model.weights == str(pre)  # recorded absolute: resume from anywhere
    monkeypatch.chdir(tmp_path / "pets")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    pre.rename(tmp_path / "pre_moved")  # the starting weights moved: the run's own weights give the architecture
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0  # before: "no such run directory"
    assert f"note: model.weights {pre} is gone; the architecture comes from {run / 'last.safetensors'}" \
        in capsys.readouterr().out
    assert nestvit.load(run).contract.kwargs == loaded.contract.kwargs


def test_grey_image_folders_train_a_grey_model_and_finetune_keeps_its_normalisation(tmp_path, capsys):
    """Greyscale files make a 1-channel run (not RGB copies); fine-tuning a grey run on grey files adapts no
    channels and keeps the normalisation its weights learnt; RGB files still make a 3-channel run."""
    recipe = tiny_run_recipe(tmp_path, *FAMILIES["nest"][:2])
    pre = tmp_path / "pre"
    assert main(["train", str(recipe), "--out", str(pre)]) == 0  # grey digits, in memory, mean/std measured
    rng = np.random.default_rng(0)
    for mode, shape in (("L", (40, 48)), ("RGB", (40, 48, 3))):
        for c in ("a", "b"):
            folder = tmp_path / mode / c
            folder.mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["--set", "data.img_size=32", "--set", "data.workers=0", "--set", "global_batch=8", "--set", "epochs=1",
              "--set", "progress=false"]
    capsys.readouterr()
    assert main(["train", "finetune", "--set", f"model.weights={pre}", "--set", f"data.root={tmp_path / 'L'}",
                 *common, "--out", str(tmp_path / "ft_grey")]) == 0
    out = capsys.readouterr().out
    assert "input channels" not in out  # nothing adapted: 1 channel to 1 channel
    grey = nestvit.load(tmp_path / "ft_grey")
    assert grey.transform.channels == 1 and grey.transform.mean == nestvit.load(pre).transform.mean
    assert load_config(tmp_path / "ft_grey" / "config.yaml").data.channels == 1  # recorded for eval and resume
    assert main(["eval", str(tmp_path / "ft_grey")]) == 0
    from nestvit.data.datasets import decode_image

    file = tmp_path / "L" / "a" / "0.png"  # predict and eval decode a file as training did: one decoding
    assert torch.equal(grey.transform.read(file), decode_image(file, size=32, channels=1))
    # from scratch on grey files: 1 channel, ImageNet's channel mean; RGB files: 3 channels
    for mode, channels, mean in (("L", 1, (0.449,)), ("RGB", 3, (0.485, 0.456, 0.406))):
        assert main(["train", str(recipe), "--set", "data.name=imagefolder", "--set", f"data.root={tmp_path / mode}",
                     "--set", "data.pad_to=null", *common,
                     "--out", str(tmp_path / f"scratch_{mode}")]) == 0
        t = nestvit.load(tmp_path / f"scratch_{mode}").transform
        assert t.channels == channels and t.mean == mean
    assert main(["train", str(recipe), "--set", "data.name=imagefolder", "--set", f"data.root={tmp_path / 'L'}",
                 "--set", "data.pad_to=null", "--set", "data.channels=3", *common,
                 "--out", str(tmp_path / "forced")]) == 0
    assert nestvit.load(tmp_path / "forced").transform.channels == 3
    # fine-tuning with the same classes in another order (a class list): the head follows the names
    from nestvit.train.config import ModelSection
    from nestvit.train.runs import build_model

    run = tmp_path / "scratch_L"
    trained = nestvit.load(run).model.state_dict()
    for classes, flipped in ((["b", "a"], True), (["a", "b"], False), (["x", "y"], False)):
        model, _ = build_model(ModelSection(name=None, weights=str(run)), num_classes=2, in_chans=1, img_size=32,
                               classes=classes)
        head = model.state_dict()["head.weight"]
        assert torch.equal(head, trained["head.weight"].flip(0) if flipped else trained["head.weight"])
        assert ("reordered" in " ".join(model.adapt_notes)) == flipped
        assert ("kept row by row" in " ".join(model.adapt_notes)) == (classes == ["x", "y"])
    # classes shared in part (before: rows by position, "b" served by "a"'s row), or fewer / more of them (before:
    # the whole head re-initialised): shared names keep their rows, new ones start fresh
    for classes in (["emu", "a"], ["b"], ["b", "emu", "a"]):
        model, _ = build_model(ModelSection(name=None, weights=str(run)), num_classes=len(classes), in_chans=1,
                               img_size=32, classes=classes)
        head = model.state_dict()["head.weight"]
        for k, c in enumerate(classes):
            if c in ("a", "b"):
                assert torch.equal(head[k], trained["head.weight"][["a", "b"].index(c)]), (classes, c)
            else:  # the new head's own initial row, none of the trained ones
                assert not any(torch.equal(head[k], row) for row in trained["head.weight"]), (classes, c)
        notes = " ".join(model.adapt_notes)
        assert "keep their rows by name" in notes and "re-initialised" not in notes, notes
        assert ("start fresh" in notes) == ("emu" in classes) and "()" not in notes, notes
    # a teacher (no fresh rows: it must teach every class): a name it lacks takes the row of a class the data lack
    model, _ = build_model(ModelSection(name=None, weights=str(run)), num_classes=2, in_chans=1, img_size=32,
                           classes=["emu", "a"], adapt=False)
    assert torch.equal(model.state_dict()["head.weight"], trained["head.weight"].flip(0))  # emu <- b, a <- a
    assert "lack emu: emu is served by b's row; a by name" in " ".join(model.adapt_notes)


def test_a_relative_weights_path_of_an_older_run_names_the_fix_on_resume(tmp_path, monkeypatch):
    from nestvit.train.config import ConfigError, TrainConfig, replace
    from nestvit.train.loop import absolute_weights

    monkeypatch.chdir(tmp_path)
    cfg = replace(TrainConfig(), model={"weights": "runs/pre"}, distill={"teacher_weights": "nest_tiny_224.jx_in1k"})
    assert absolute_weights(cfg) == cfg  # a new run: the missing path is reported where it is read
    with pytest.raises(ConfigError, match=r"model.weights runs/pre: not found from .* add --set "
                                          r"model.weights=ABSOLUTE_PATH"):
        absolute_weights(cfg, resume=True)  # a published tag (the teacher here) is no path: left as it is
    (tmp_path / "runs" / "pre").mkdir(parents=True)
    assert absolute_weights(cfg, resume=True).model.weights == str(tmp_path / "runs" / "pre")
