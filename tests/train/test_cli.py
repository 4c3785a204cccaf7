"""``nestvit train`` / ``eval`` / ``predict`` end to end through ``nestvit.cli.main``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from nestvit.cli import main
from nestvit.train.inputs import synthetic


@pytest.fixture
def recipe(tmp_path, make_recipe):
    path = tmp_path / "tiny.yaml"
    path.write_text("# tiny: nestvit train tiny.yaml\n" + yaml.safe_dump(make_recipe(epochs=1)))
    return path


def test_train_eval_predict(tmp_path, recipe, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", "optim.lr=1e-2", "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.01 x 32/256 = 0.00125" in out and "global 32 = 1 device(s) x 32 per device" in out
    assert f"next: nestvit eval {run}\n      nestvit predict {run} IMAGE_OR_FOLDER" in out  # what the folder is for
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2

    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "synthetic:test (512 images)" in out and "top-1" in out and "class9" in out
    assert main(["eval", str(run / "last.safetensors"), "--data", "synthetic", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev/eval.json").read_text())["count"] == 512
    assert main(["eval", str(run), "--flip-tta", "--out", str(tmp_path / "tta")]) == 0
    assert "512 images, flip TTA (2 views)" in capsys.readouterr().out
    assert json.loads((tmp_path / "tta/eval.json").read_text())["tta"] == "flip"
    monkeypatch.setattr("nestvit.system.cpu_has_fast_bf16", lambda: False)  # an AVX2-only CPU: a warning
    assert main(["eval", str(run), "--tta", "flip-shift", "--precision", "bf16", "--limit", "64"]) == 0
    out, err = capsys.readouterr()
    assert "64 images, flip-shift TTA (18 views), bf16" in out and "use --precision auto (fp32 here)" in err
    assert main(["eval", str(run), "--precision", "auto", "--limit", "64", "--out", str(tmp_path / "auto")]) == 0
    out, err = capsys.readouterr()
    assert "(64 images)" in out and not err  # auto is fp32 on that CPU
    assert json.loads((tmp_path / "auto/eval.json").read_text())["precision"] == "fp32"
    assert (tmp_path / "ev/confusion.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()

    images, labels = synthetic("test", size=8, count=2)
    files = []
    for i, img in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        # an RGB file at another size: predict converts to the model's 1 channel and 8x8
        Image.fromarray(np.repeat(img[0].numpy(), 4, 0).repeat(4, 1)).convert("RGB").save(files[-1])
    assert main(["predict", str(run), *map(str, files), "--top-k", "3"]) == 0
    head, out = capsys.readouterr().out.split("\n", 1)
    best = json.loads((run / "summary.json").read_text())["best_top1"]
    assert head.startswith(f"weights: {run / 'best.safetensors'} (epoch ")
    assert head.endswith(f" of 2, top-1 {best:.2f} %)")
    assert out.count("%") == 6 and str(files[0]) in out


def test_resume_cli(tmp_path, recipe, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "resuming at epoch 2, step 4" in out
    assert "the config differs from the saved run's in epochs (1 -> 2), threads (None -> 1)" in out


def test_errors_are_one_line(tmp_path, recipe, capsys):
    assert main(["train", str(recipe), "--set", "optim.lrr=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'optim.lrr'" in err and "did you mean optim.lr?" in err
    assert main(["train", "no_such_recipe"]) == 2
    assert "built-in classifier recipes" in capsys.readouterr().err
    assert main(["train", "mnist5k_nset"]) == 2
    assert "built-in recipe (did you mean mnist5k_nest" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["train", str(recipe), "--set", "data.name=cifar10", "--set", "data.root=" + str(tmp_path),
                 "--out", str(tmp_path / "y")]) == 2
    assert "cifar10" in capsys.readouterr().err


def test_help_lists_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "built-in recipes" in out and "mnist5k_nest" in out
    assert main(["train", "--list-keys"]) == 0
    assert "model.overrides.*" in capsys.readouterr().out
    assert main(["train", "mnist5k_nest", "--list-keys"]) == 0  # each key with the recipe's value and its type
    lines = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["optim.lr"].split() == ["0.002", "(float)"] and lines["data.pad_to"].split() == ["32", "(int", "|",
                                                                                                 "None)"]
    assert lines["data.name"].startswith("mnist5k ") and "'cosine'" in lines["schedule.name"]


def test_a_closed_pipe_is_quiet(tmp_path):
    # `nestvit models | head -1`: the reader left early; before, an "internal error (a bug in nestvit)"
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "nestvit"
    p = subprocess.Popen([str(exe), "train", "--list-keys"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""


def test_resize_to_is_applied_in_training_eval_and_predict(tmp_path, recipe, capsys):
    """16x16 images resized to the model's 8x8: the weights file alone tells eval and predict to do the same."""
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", "data.img_size=16",
                 "--set", "data.resize_to=8"]) == 0
    assert "1x8x8" in capsys.readouterr().out
    # the bare weights file (no config.yaml beside it): eval reads resize_to from its metadata
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((run / "last.safetensors").read_bytes())
    assert main(["eval", str(alone), "--data", "synthetic", "--limit", "64"]) == 0
    assert "(64 images)" in capsys.readouterr().out
    images, _ = synthetic("test", size=16, count=1)
    Image.fromarray(images[0, 0].numpy()).save(tmp_path / "img.png")
    assert main(["predict", str(run), str(tmp_path / "img.png")]) == 0
    capsys.readouterr()
    # an image file is resized for the model as training resized the set: the same pixels, not PIL's
    from nestvit.contract import read_contract
    from nestvit.data.datasets import resize_images

    read = read_contract(run / "last.safetensors").transform.read(tmp_path / "img.png")
    assert torch.equal(read, resize_images(images[:1], 8)[0])
    # a real in-memory set stored at 28x28 (IDX files): eval of the bare weights fails unless it resizes too
    from tests.data.test_datasets import write_idx_set

    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        write_idx_set(tmp_path / "fm", split, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                      rng.integers(0, 10, n, dtype=np.uint8), gz=False)
    fm = tmp_path / "fm_run"
    assert main(["train", str(recipe), "--out", str(fm), "--set", "data.name=fashion_mnist",
                 "--set", f"data.root={tmp_path / 'fm'}", "--set", "data.resize_to=8"]) == 0
    alone.write_bytes((fm / "last.safetensors").read_bytes())
    assert main(["eval", str(alone), "--data", "fashion_mnist", "--root", str(tmp_path / "fm")]) == 0
    assert "fashion_mnist:test (32 images)" in capsys.readouterr().out
    assert main(["train", str(recipe), "--out", str(tmp_path / "bad"), "--set", "data.resize_to=0"]) == 2
    assert "data.resize_to must be a positive image size" in capsys.readouterr().err


def test_resize_keeps_flat_images_flat_and_is_a_no_op_at_the_same_size():
    from nestvit.data.datasets import resize_images as _resize

    flat = torch.full((3, 1, 28, 28), 77, dtype=torch.uint8)
    assert torch.equal(_resize(flat, 24), torch.full((3, 1, 24, 24), 77, dtype=torch.uint8))
    assert _resize(flat, 28) is flat and _resize(flat, None) is flat
    ramp = torch.arange(28, dtype=torch.uint8).mul(9).expand(1, 1, 28, 28)
    small = _resize(ramp, 14)[0, 0, 0]
    assert small.dtype == torch.uint8 and bool((small[1:] > small[:-1]).all())  # order kept, no wrap-around


def test_resize_and_pad_are_refused_for_image_folders(tmp_path):
    from nestvit.train.config import DataSection
    from nestvit.train.inputs import load_split

    with pytest.raises(ValueError, match=r"data.resize_to=24 .* applies to in-memory data sets; imagefolder images are "
                                         r"resized to data.img_size instead: add --set data.resize_to=null"):
        load_split(DataSection(name="imagefolder", root=str(tmp_path), resize_to=24), "train", torch.device("cpu"))


def test_eval_says_when_the_run_evaluated_fewer_images(tmp_path, recipe, capsys):
    # a run with data.limit_eval scored its first 64 images; eval scores the whole split, and says so
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_images"] == 64 and summary["test_split"] == "synthetic:test"
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    assert "note: the run was evaluated on the first 64 images of synthetic:test (data.limit_eval)" in \
        capsys.readouterr().err
    assert main(["eval", str(run), "--limit", "64"]) == 0
    out, err = capsys.readouterr()
    assert "(64 images)" in out and "limit_eval" not in err


def test_eval_compares_several_checkpoints(tmp_path, recipe, capsys):
    # `nestvit eval runs/a runs/b`: each evaluated as alone, then one table; --out a folder each and the table
    for name, lr in (("a", "1e-3"), ("b", "4e-3")):
        assert main(["train", str(recipe), "--out", str(tmp_path / name), "--set", f"optim.lr={lr}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "a"), str(tmp_path / "b"), "--limit", "64",
                 "--out", str(tmp_path / "cmp")]) == 0
    out, err = capsys.readouterr()
    table = out[out.index("checkpoint  "):].splitlines()
    assert len(table) == 4 and table[1].startswith(str(tmp_path / "a")) and "synthetic:test" in table[2]
    assert table[0].split()[4] == "top-5"  # the runs' k (10 classes here; top-2 for two)
    assert "different data" not in err
    rows = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    each = [json.loads((tmp_path / "cmp" / n / "eval.json").read_text()) for n in ("a", "b")]
    assert [r["top1"] for r in rows] == [e["top1"] for e in each] and rows[0]["count"] == 64


def test_the_comparison_of_runs_of_other_class_counts_says_each_rows_k(tmp_path, capsys, monkeypatch):
    # before: a 3-class run beside a 10-class one headed every row top-3, its top-5 included
    from nestvit.train import cli_eval

    def evaluated(args, checkpoint, out):
        n = 3 if checkpoint == "three" else 10
        counts = {f"c{i}": (1 if checkpoint == "three" else i) for i in range(n)}  # ten: classes of unequal size
        return {"weights": checkpoint, "data": "d", "count": 8, "top1": 50.0, "top5": 90.0, "loss": 1.0,
                "classes": list(counts), "per_class_count": counts, "balanced_top1": 40.0 if n == 10 else 50.0}

    monkeypatch.setattr(cli_eval, "evaluate_one", evaluated)
    assert main(["eval", "ten", "three", "--out", str(tmp_path)]) == 0
    table = capsys.readouterr().out.split("\n\n")[-1].splitlines()
    assert table[0].split()[4] == "top-k" and "90.00% (k=5)" in table[1] and "90.00% (k=3)" in table[2]
    assert table[0].split()[-1] == "balanced" and table[1].endswith(" 40.00%") and table[2].endswith(" 50.00%")
    rows = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["top_k"] for r in rows] == [5, 3] and [r["balanced_top1"] for r in rows] == [40.0, 50.0]


def test_eval_of_a_built_in_set_with_other_classes_is_refused(tmp_path, recipe, capsys):
    # before: scored by label index without a word (a digits model on Fashion-MNIST, its table relabelled)
    from dataclasses import replace

    import nestvit
    from nestvit.interop import save_weights

    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    loaded = nestvit.load(run)
    for classes, code in ((list("abcdefghij"), 2), ([f"class{k}" for k in reversed(range(10))], 2),
                          (["class1", "class0", *(f"class{k}" for k in range(2, 9)), "emu"], 2),
                          ([*(f"class{k}" for k in range(9)), "emu"], 0)):
        path = save_weights(loaded.model, tmp_path / f"{classes[0]}{classes[1]}{classes[-1]}.safetensors",
                            contract=replace(loaded.contract, classes=tuple(classes), info={"data": "mnist5k"}))
        capsys.readouterr()
        assert main(["eval", str(path), "--data", "synthetic", "--limit", "64"]) == code
        err = capsys.readouterr().err
        if code:
            assert "synthetic's classes (class0, class1, class2, class3 and 6 more) are not the model's" in err
            assert "evaluate it on --data mnist5k" in err
        else:
            assert "warning: the model's classes emu are not among synthetic's" in err


def test_training_goes_on_when_the_reader_of_its_output_leaves(tmp_path, recipe):
    # `nestvit train ... | head -1`: before, the run stopped with "[Errno 32] Broken pipe" and lost its steps
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "nestvit"
    run = tmp_path / "run"
    p = subprocess.Popen([str(exe), "train", str(recipe), "--out", str(run), "--epochs", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line written at once, as on a terminal
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2
