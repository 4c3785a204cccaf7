"""Recipes, --set overrides and their errors."""

from __future__ import annotations

import pytest
import torch

from nestvit.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    builtin_recipes,
    from_dict,
    load_config,
    read_recipe,
    to_dict,
    valid_keys,
)


def test_defaults_and_overrides():
    cfg = load_config(None, ["optim.lr=1e-3", "model.name=nest_small_cifar", "aug.mixup_alpha=0.8",
                             "model.overrides.drop_path_rate=0.1", "data.mean=[0.5]", "epochs=3",
                             "optim.betas=[0.9, 0.95]", "distill.teacher_overrides.widths=[8, 16]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # "1e-3" is a str to YAML 1.1
    assert cfg.model.name == "nest_small_cifar"
    assert cfg.model.overrides == {"drop_path_rate": 0.1}
    assert cfg.aug.mixup_alpha == 0.8 and cfg.aug.hflip is False  # the aug section starts from the plain pipeline
    assert cfg.data.mean == (0.5,)
    assert cfg.epochs == 3
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.distill.teacher_overrides == {"widths": [8, 16]}


def test_unknown_key_names_the_closest_or_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.lrr=1"])
    msg = str(e.value)
    assert "unknown key 'optim.lrr'" in msg and "(did you mean optim.lr?); --list-keys prints them all" in msg
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optimizer=adam"])  # nothing close: every key
    assert "valid keys" in str(e.value) and "optim.weight_decay" in str(e.value)
    with pytest.raises(ConfigError, match="unknown key.*epoch .did you mean epochs.*valid keys: epochs"):
        load_config({"epoch": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'train.epochs' .* \(did you mean epochs\?\)"):
        load_config(None, ["train.epochs=3"])  # a key in a section it is not in


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="epochs: expected int, got 'many'"):
        load_config(None, ["epochs=many"])
    with pytest.raises(ConfigError, match="optim.lr: expected float"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="compile: expected bool"):
        load_config(None, ["compile=3"])
    with pytest.raises(ConfigError, match="optim: expected a mapping"):
        load_config({"optim": 3})
    with pytest.raises(ConfigError, match="unknown key 'epochs.x'"):
        load_config(None, ["epochs.x=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["epochs"])


def test_value_checks():
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(ConfigError, match="teacher_weights"):
        load_config(None, ["distill.teacher=convnet"])
    with pytest.raises(ConfigError, match="aug.mean cannot be set.*data.mean"):
        load_config(None, ["aug.mean=[0.5]"])
    assert "aug.mean" not in valid_keys() and "data.mean" in valid_keys()
    with pytest.raises(ConfigError, match="time_budget_min must be >= 0, got -1"):
        load_config(None, ["time_budget_min=-1"])
    assert "time_budget_min" in valid_keys()
    with pytest.raises(ConfigError, match="tta: expected one of 'none', 'flip', 'shift', 'flip-shift', got 'flips'"):
        load_config(None, ["tta=flips"])
    with pytest.raises(ConfigError, match=r"optim.sam_rho must be >= 0 \(0 = off\), got -0.1"):
        load_config(None, ["optim.sam_rho=-0.1"])
    with pytest.raises(ConfigError, match="optim.sam_batch must be >= 0"):
        load_config(None, ["optim.sam_batch=-8"])
    with pytest.raises(ConfigError, match=r"data.std must be positive \(it divides the pixels\), got \(0.0,\)"):
        load_config(None, ["data.std=[0]"])  # before: "loss is nan ... lower optim.lr", which did not help


def test_batch_plan_and_lr_scaling():
    cfg = load_config(None, ["global_batch=1024", "micro_batch=64", "optim.lr=2.5e-4"])
    assert cfg.batch_plan(1) == (1024, 64, 16)
    assert cfg.batch_plan(8) == (128, 64, 2)
    assert cfg.batch_plan(16) == (64, 64, 1)
    assert cfg.scaled_lr() == pytest.approx(2.5e-4 * 1024 / 256)
    assert load_config(None, ["optim.lr_ref_batch=0", "optim.lr=0.01"]).scaled_lr() == 0.01
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        cfg.batch_plan(3)
    with pytest.raises(ConfigError, match="not a multiple of micro_batch"):
        load_config(None, ["global_batch=96", "micro_batch=64"]).batch_plan(1)


def test_round_trip():
    cfg = load_config(None, ["data.std=[0.3]", "model.overrides.depths=[1, 2]"])
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_overrides_do_not_touch_the_input():
    raw = {"optim": {"lr": 1.0}}
    out = apply_overrides(raw, ["optim.lr=2.0"])
    assert raw == {"optim": {"lr": 1.0}} and out == {"optim": {"lr": 2.0}}


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_load(name):
    raw, stem = read_recipe(name)
    assert stem == name
    cfg = load_config(name)
    assert cfg.global_batch >= 1
    text = builtin_recipes()[name].read_text()
    assert text.startswith("#") and "nestvit train" in text  # the header says the command


def test_missing_recipe():
    with pytest.raises(ConfigError, match="neither a file nor a built-in recipe.*mnist5k_nest"):
        load_config("no_such_recipe")


def test_random_resized_crop_is_checked_and_reaches_the_training_split_only(tmp_path):
    import numpy as np
    from PIL import Image

    from nestvit.train.inputs import load_split

    with pytest.raises(ConfigError, match=r"data.random_resized_crop must be in \(0, 1\]"):
        load_config(None, ["data.random_resized_crop=1.5"])
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / split / cls / "0.png")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path}", "data.eval_split=val",
                             "data.random_resized_crop=0.08"])
    train = load_split(cfg.data, "train", torch.device("cpu"))
    val = load_split(cfg.data, "val", torch.device("cpu"))
    assert train.folder.crop_scale == (0.08, 1.0) and val.folder.crop_scale is None


def test_allowed_values_are_declared_once():
    """Literal types are the allowed values: the config refuses others, and they match what the code knows."""
    import typing

    from nestvit.data.augment import TTA_MODES
    from nestvit.train.config import PRECISIONS, TrainConfig, TtaMode

    assert set(typing.get_args(TtaMode)) == set(TTA_MODES)
    assert PRECISIONS == ("fp32", "bf16", "fp16", "auto")
    for bad in (dict(precision="fp64"), dict(tta="mirror")):
        with pytest.raises(ConfigError, match="expected one of"):
            TrainConfig(**bad)  # built in Python, not only from a recipe


def test_tf32_is_a_cuda_switch_and_leaves_the_cpu_alone(monkeypatch):
    import torch

    from nestvit.system import use_tf32

    assert load_config(None).tf32 is True and load_config(None, ["tf32=false"]).tf32 is False
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    use_tf32("cpu", True)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
    try:  # the switch itself (it needs no GPU to be set)
        use_tf32("cuda:0", False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        use_tf32("cuda", True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_a_key_given_twice_in_a_recipe_is_refused(tmp_path):
    # YAML keeps the last of two `optim:` sections without a word: the first one's keys were silently dropped
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("epochs: 1\noptim:\n  lr: 1.0e-3\n  no_decay: 1d_and_tokens\ndata:\n  name: mnist5k\n"
                      "optim:\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 7, column 1 \(the key 'optim' is given twice "
                                          r"\(first at line 2\); merge the two\)"):
        load_config(recipe)
    recipe.write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")  # nested too
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        load_config(recipe)
    recipe.write_text("optim:\n  <<: {lr: 1.0e-3, weight_decay: 0.1}\n  lr: 3.0e-3\n")  # YAML merge keys still work
    cfg = load_config(recipe)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (3.0e-3, 0.1)


def test_python_callers_give_overrides_as_a_list_one_string_or_a_mapping(make_recipe, tmp_path):
    # before: a mapping was "--set expects key=value, got 'epochs'" and a string was read one character at a time
    want = load_config("mnist5k_nest", ["epochs=1", "optim.lr=0.001", "model.overrides.depths=[1, 1, 1]"])
    assert load_config("mnist5k_nest", {"epochs": 1, "optim.lr": 1e-3, "model.overrides.depths": (1, 1, 1)}) == want
    assert load_config("mnist5k_nest", "epochs=1").epochs == 1
    assert load_config("mnist5k_nest", {"data.root": tmp_path}).data.root == str(tmp_path)  # a Path value
    nested = load_config("mnist5k_nest", {"optim": {"lr": 1e-3}, "model": {"overrides": {"depths": [1, 1, 1]}},
                                          "epochs": 1})
    assert nested == want  # nested as a recipe is written
    with pytest.raises(ConfigError, match="overrides: give a list of 'key=value' strings, one such string or a "
                                          "mapping, not 'int'"):
        load_config("mnist5k_nest", 5)
    from nestvit.train import train

    assert train(make_recipe(epochs=1), tmp_path / "run").epochs_done == 1  # a recipe, as load_config takes it
    with pytest.raises(TypeError, match="train takes a TrainConfig or a recipe .* not 'int'; load_config"):
        train(3, tmp_path / "other")
