"""Arguments and files that a user gets wrong, across the commands: one line naming the problem and the fix.

Each case was found by reading the command for input that still ended as a raw traceback, as "a bug in
nestvit", or with advice that does not work; where the message names a fix, the test also follows it.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import nestvit
from nestvit.cli import main
from nestvit.config import ConfigError
from nestvit.contract import ContractError
from nestvit.explain.localization import map_to_box
from nestvit.generate.train import GanConfig
from nestvit.interop import save_weights
from nestvit.train.hooks import Callback, load_callback
from tests.conftest import TINY_CLASSIFIER as TINY


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err and "internal error" not in err, err
    return err


def argparse_error(argv: list[str], capsys) -> str:
    """An argument refused by the parser: exit status 2, a usage line and the error naming the flag."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------- argument types

@pytest.mark.parametrize("argv, flag", [
    (["experiment", "data_efficiency", "--train-sizes", "0"], "--train-sizes"),
    (["experiment", "data_efficiency", "--models", "vits"], "--models"),
    (["experiment", "rtnt_vs_tnt", "--depth", "0"], "--depth"),
    (["experiment", "rtnt_vs_tnt", "--eval-size", "-1"], "--eval-size"),
    (["generate", "sample", "RUN", "--nrow", "-1"], "--nrow"),
    (["generate", "sample", "RUN", "-n", "0"], "-n"),
    (["generate", "eval", "RUN", "-n", "1"], "-n"),
    (["export", "RUN", "--atol", "-1"], "--atol"),
    (["export", "RUN", "--atol", "nan"], "--atol"),
    (["bench", "nest_tiny_cifar", "--batch", "-4"], "--batch"),
    (["bench", "nest_tiny_cifar", "--peak-size", "0"], "--peak-size"),
    (["explain", "RUN", "x.png", "--threshold", "1.5"], "--threshold"),
])
def test_out_of_range_arguments_are_refused_by_the_parser(argv, flag, capsys):
    err = argparse_error(argv, capsys)
    assert f"argument {flag}" in err and "Traceback" not in err


def test_an_unreadable_image_size_names_the_flag(capsys):
    assert main(["bench", "nest_tiny_cifar", "--img-size", "abc"]) == 2
    assert "--img-size expects H or H,W" in one_line_error(capsys)
    assert main(["bench", "nest_tiny_cifar", "--data", "nope"]) == 2  # before any model is timed
    assert "--data nope: neither a data set" in one_line_error(capsys)


def test_the_explain_threshold_is_checked_by_the_library_too():
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        map_to_box(torch.rand(4, 4), 1.5)
    assert map_to_box(torch.arange(16.0).reshape(4, 4), 1.0) == (3, 3, 4, 4)  # 1.0 keeps the maximum


# ---------------------------------------------------------------------------------- --out a file

@pytest.mark.parametrize("argv", [
    ["experiment", "hierarchy", "--quick"],
    ["generate", "train", "gan_nest_fashion_mnist"],
])
def test_an_out_that_is_a_file_is_one_line(argv, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("mine")
    assert main([*argv, "--out", str(file)]) == 2
    assert "exists and is not a folder" in one_line_error(capsys)
    assert file.read_text() == "mine"


# ---------------------------------------------------------------------------------- GAN config ranges

@pytest.mark.parametrize("key, value, says", [
    ("threads", -1, "threads must be >= 0"),
    ("sample_n", -1, "sample_n must be >= 1"),
    ("max_images", -100, "max_images must be >= 0"),
    ("pad_to", -2, "pad_to must be >= 0"),
    ("lr_g", 0.0, "lr_g must be > 0"),
    ("beta2", 1.0, r"beta2 must be in \[0, 1\)"),
    ("ema_beta", -0.1, r"ema_beta must be in \[0, 1\)"),
    ("r1_gamma", -1.0, "r1_gamma must be >= 0"),
    ("eval_every", -2, "eval_every must be >= 1, 0"),
    ("eval_n", 1, "eval_n must be >= 2"),
    ("seed", -1, "seed must be in"),
])
def test_gan_config_values_out_of_range_name_the_range(key, value, says):
    with pytest.raises(ConfigError, match=says):
        GanConfig(**{key: value})


def test_a_gan_set_out_of_range_is_one_line_before_the_run_folder_exists(tmp_path, capsys):
    out = tmp_path / "gan"
    assert main(["generate", "train", "gan_nest_fashion_mnist", "--set", "threads=-1", "--out", str(out)]) == 2
    assert "threads must be >= 0" in one_line_error(capsys)
    assert not out.exists()


# ---------------------------------------------------------------------------------- runs of the other kind

def fake_run(folder, config: dict, weights: str | None = None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    if weights:
        (folder / weights).write_bytes(b"")
    return folder


def test_resuming_a_run_with_the_other_kind_of_command_names_the_right_command(tmp_path, capsys):
    gan = fake_run(tmp_path / "gan", {"kind": "gan", "steps": 10})
    clf = fake_run(tmp_path / "clf", {"kind": "classifier", "epochs": 1})
    assert main(["train", "--resume", str(gan)]) == 2
    assert f"resume it with `nestvit generate train --resume {gan}`" in one_line_error(capsys)
    assert main(["generate", "train", "--resume", str(clf)]) == 2
    err = one_line_error(capsys)
    assert f"resume it with `nestvit train --resume {clf}`" in err and "unknown key" not in err
    # a GAN run written before kinds existed: told by its generator key
    old = fake_run(tmp_path / "old", {"generator": "nest_28", "steps": 10})
    assert main(["train", "--resume", str(old)]) == 2
    assert "nestvit generate train --resume" in one_line_error(capsys)


@pytest.mark.parametrize("text, says", [
    ("", "is empty"), ("steps: [1\n", "not valid YAML at line 2"), ("[1, 2]\n", "must be a mapping")])
def test_resuming_a_gan_run_with_a_damaged_config_is_one_line(tmp_path, capsys, text, says):
    run = tmp_path / "gan"
    run.mkdir()
    (run / "config.yaml").write_text(text)
    assert main(["generate", "train", "--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert says in err and "the run's config is damaged; restore it" in err and "{}" not in err


def test_sampling_from_a_classifier_run_says_it_is_one(tmp_path, capsys):
    clf = fake_run(tmp_path / "clf", {"kind": "classifier"}, weights="best.safetensors")
    for extra in ([], ["--raw"]):
        assert main(["generate", "sample", str(clf), *extra, "--out", str(tmp_path / "g.png")]) == 2
        assert "is a classifier run (no generator.safetensors)" in one_line_error(capsys)
        assert main(["generate", "eval", str(clf), *extra, "--out", str(tmp_path / "m.json")]) == 2
        assert "is a classifier run (no generator.safetensors)" in one_line_error(capsys)
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "m.json").exists()


# ---------------------------------------------------------------------------------- export

def test_an_export_that_fails_its_check_leaves_no_file(weights, tmp_path, monkeypatch, capsys):
    from nestvit import export

    monkeypatch.setattr(export, "check_pt2", lambda *a: 1.0)
    out = tmp_path / "m.pt2"
    assert main(["export", str(weights), "--format", "pt2", "--out", str(out)]) == 1  # a bug, and said to be one
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither the file nor its temporary


def test_plain_weights_name_a_fix_that_every_command_takes(tmp_path, capsys):
    from safetensors.torch import save_file

    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    plain = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(plain))
    assert main(["export", str(plain)]) == 2
    err = one_line_error(capsys)
    assert "records no model" in err and "save_weights(nestvit.create_model(NAME, weights=PATH, **OVERRIDES)" in err
    # the fix it names works: the saved file exports like any run's
    fixed = save_weights(nestvit.create_model("nest_tiny_cifar", weights=plain, **TINY), tmp_path / "model.safetensors")
    assert nestvit.load(fixed).contract.model == "nest_tiny_cifar"
    assert main(["export", str(fixed), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0


# ---------------------------------------------------------------------------------- callbacks, data, hub

class NeedsArgs(Callback):
    def __init__(self, path: str) -> None:
        self.path = path


def test_a_callback_that_cannot_be_built_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--callback json:dumps: dumps is not a nestvit.train.Callback subclass"):
        load_callback("json:dumps")
    with pytest.raises(ConfigError, match=r"NeedsArgs\(\) failed \(TypeError.*built with no arguments"):
        load_callback(f"{__name__}:NeedsArgs")
    for spec in ("mylogger", "mylogger:", ":Logger"):  # before: Python's "Empty module name"
        with pytest.raises(ConfigError, match=rf"--callback {spec}: give MODULE:CLASS \(e.g. my_logger:WandbLogger\)"):
            load_callback(spec)


def test_bench_data_with_fewer_images_than_a_batch_says_so(tmp_path):
    import numpy as np
    from PIL import Image

    from nestvit.bench import bench_data_pipeline

    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / "train" / c / f"{i}.png")
    with pytest.raises(ValueError, match=r"4 training images, fewer than one batch of 8; give --batch 4 or less"):
        bench_data_pipeline((8, 8), 3, 2, batch=8, iters=1, warmup=0, data=str(tmp_path))


def test_a_damaged_hub_config_is_a_contract_error(weights, tmp_path):
    out = nestvit.save_pretrained(weights, tmp_path / "shared")
    for text in ("{not json", json.dumps({"kwargs": {}})):
        (out / "config.json").write_text(text)
        with pytest.raises(ContractError, match="not a config.json written by nestvit.save_pretrained"):
            nestvit.from_pretrained(out)


def test_a_damaged_run_summary_still_saves_a_card(weights, tmp_path):
    (weights.parent / "summary.json").write_text("{truncated")
    with pytest.warns(UserWarning, match="summary.json: not read"):
        out = nestvit.save_pretrained(weights, tmp_path / "shared")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_explain_classes_not_utf8_names_the_file(weights, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    names = tmp_path / "names.txt"
    names.write_bytes("caf\xe9\nb\nc\n".encode("latin-1"))
    assert main(["explain", str(weights), str(image), "--method", "cam", "--classes", str(names),
                 "--out", str(tmp_path / "ex")]) == 2
    assert f"--classes {names}: not a UTF-8 text file" in one_line_error(capsys)


def test_finetuning_plain_weights_names_model_name(tmp_path, capsys):
    tiny = dict(embed_dims=16, num_heads=1, depths=1)
    torch.save(nestvit.create_model("nest_tiny_cifar", **tiny).state_dict(), tmp_path / "plain.pth")
    argv = ["train", "finetune", "--set", f"model.weights={tmp_path / 'plain.pth'}", "--set", "data.name=synthetic",
            "--set", "data.img_size=32", "--set", "data.limit_train=32", "--set", "data.limit_eval=16", "--epochs", "1",
            "--set", "progress=false"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "training --set model.name=NAME --set model.overrides.KEY=VALUE" in one_line_error(capsys)
    named = [*argv, "--set", "model.name=nest_tiny_cifar", *[f"--set=model.overrides.{k}={v}" for k, v in tiny.items()]]
    assert main([*named, "--out", str(tmp_path / "b")]) == 0


# ---------------------------------------------------------------------------------- the GAN journey

@pytest.fixture
def gan_run(tmp_path):
    """A finished 2-step GAN run on 32 Fashion-MNIST images, a narrow ``nest_28`` generator, no evaluations."""
    from nestvit.data import DatasetError, load_dataset
    from nestvit.generate.train import train_gan

    try:
        load_dataset("fashion_mnist", split="test")
    except DatasetError:
        pytest.skip("Fashion-MNIST not available")
    cfg = GanConfig(generator_overrides={"embed_dims": [8, 8, 4], "num_heads": 2, "depths": [1, 1, 1]},
                    batch_size=4, max_images=32, steps=2, eval_every=-1, progress=False, sample_n=4)
    train_gan(cfg, tmp_path / "gan", log=lambda s: None)
    return tmp_path / "gan"


def test_a_refused_gan_resume_leaves_the_runs_config_as_it_was(gan_run, capsys):
    before = (gan_run / "config.yaml").read_text()
    assert main(["generate", "train", "--resume", str(gan_run), "--set", "generator_overrides.depths=[2,2,2]"]) == 2
    err = one_line_error(capsys)
    assert "does not fit the config's networks (the configs differ in generator_overrides.depths)" in err
    assert main(["generate", "train", "--resume", str(gan_run), "--set", "feature_net=nope", "--set",
                 "eval_every=0"]) == 2
    assert "nope: no feature network there" in capsys.readouterr().err.splitlines()[-1]  # after "resumed ..."
    assert (gan_run / "config.yaml").read_text() == before
    assert (gan_run / "summary.json").is_file()  # a finished run has its summary, as a classifier run


def test_gan_outputs_that_cannot_be_written_or_read_are_one_line(gan_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out in (taken, taken / "grid.png"):
        assert main(["generate", "sample", str(gan_run), "-n", "2", "--out", str(out)]) == 2
        assert "exists and is not a folder" in one_line_error(capsys)
    assert main(["generate", "sample", str(gan_run / "generator_ema.safetensors"), "--raw"]) == 2
    assert "is the EMA generator; --raw picks the raw one of a run folder" in one_line_error(capsys)
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((gan_run / "generator_ema.safetensors").read_bytes())
    assert main(["generate", "eval", str(lone)]) == 2
    assert "not in the run folder it was trained in, whose config.yaml names the data and the feature network; " \
        "without it, `nestvit generate eval` needs --feature-net" in one_line_error(capsys)
    # the report: runs without evaluations, missing runs, labels that do not match
    assert main(["generate", "report", str(gan_run)]) == 2
    err = one_line_error(capsys)
    assert "a run with --set eval_every=N" in err and f"`nestvit generate eval {gan_run}` measures its last" in err
    assert main(["generate", "report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in one_line_error(capsys)
    assert main(["generate", "report", str(gan_run), "--labels", "a", "b"]) == 2
    assert "2 label(s) for 1 run(s)" in one_line_error(capsys)
    assert main(["generate", "report", str(gan_run), str(gan_run)]) == 2
    assert "two runs would share the label 'gan' in the table; name each with --labels" in one_line_error(capsys)
    assert main(["generate", "report", str(gan_run), "--out", str(tmp_path / "fid.txt")]) == 2
    assert "a figure is written as" in one_line_error(capsys)
    assert main(["generate", "eval", str(gan_run), "--feature-net", str(gan_run)]) == 2  # a GAN as features
    assert f"{gan_run} is a GAN run; FID features come from a classifier" in one_line_error(capsys)
    for command in (["report", str(gan_run)], ["eval", str(gan_run)]):  # --out a folder: refused first
        assert main(["generate", *command, "--out", str(tmp_path)]) == 2
        assert f"--out {tmp_path} is a folder; give the" in one_line_error(capsys)
    # fine-tuning from a generator
    assert main(["train", "finetune", "--set", f"model.weights={gan_run}", "--set", "data.name=mnist5k"]) == 2
    assert "holds a generator (generator_nest_28), not a classifier" in one_line_error(capsys)


def test_a_save_pretrained_folder_is_read_by_the_commands(gan_run, weights, tmp_path, capsys):
    shared = nestvit.save_pretrained(weights, tmp_path / "shared_clf")
    assert nestvit.load(shared).weights.name == "model.safetensors"
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (16, 16), 128).save(img)
    assert main(["predict", str(shared), str(img)]) == 0
    shared_g = nestvit.save_pretrained(gan_run, tmp_path / "shared_gan")
    card = (shared_g / "README.md").read_text()
    assert "unconditional-image-generation" in card and "softmax" not in card and "G.latent_dim" in card
    assert main(["generate", "sample", str(shared_g), "-n", "2", "--out", str(tmp_path / "g.png")]) == 0
    capsys.readouterr()


def test_export_of_an_absent_ema_says_the_run_had_none(weights, capsys):
    (weights.parent / "last.safetensors").write_bytes(weights.read_bytes())
    assert main(["export", str(weights.parent), "--weights", "ema"]) == 2
    err = one_line_error(capsys)
    assert "has no ema.safetensors (the run was trained without an EMA: ema.decay 0); it has best, last" in err


def test_resume_of_a_folder_stopped_before_its_first_step_says_to_start_it_again(tmp_path, capsys):
    (tmp_path / "early" / "feature_net").mkdir(parents=True)  # a GAN stopped while its feature network trained
    assert main(["generate", "train", "--resume", str(tmp_path / "early")]) == 2
    assert (f"has none yet: run the command that started it again, `nestvit generate train RECIPE --out "
            f"{tmp_path / 'early'}`") in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert one_line_error(capsys).rstrip().endswith("no config.yaml; is it a `nestvit train` run folder?")
