"""Sharing a trained model: ``save_pretrained`` / ``from_pretrained`` in the Hub layout, offline."""

from __future__ import annotations

import json
import shutil
import sys
import types
import warnings

import pytest
import torch
import yaml

import nestvit
from nestvit.cli import main
from nestvit.contract import ContractError
from nestvit.hub import push_to_hub


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.train.conftest import tiny_recipe

    folder = tmp_path_factory.mktemp("hub")
    recipe = folder / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(epochs=1)))
    assert main(["train", str(recipe), "--out", str(folder / "run")]) == 0
    return folder / "run"


def test_round_trip_gives_identical_logits(run, tmp_path):
    out = nestvit.save_pretrained(run, tmp_path / "shared")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "nest_tiny_cifar" and config["library_name"] == "nestvit"
    assert config["classes"][:2] == ["class0", "class1"] and config["input"]["size"] == [8, 8]
    card = (out / "README.md").read_text()
    assert "nest_tiny_cifar" in card and "from_pretrained" in card
    assert card.startswith("---\nlibrary_name: nestvit\npipeline_tag: image-classification\n")  # the Hub's task
    a, b = nestvit.load(run), nestvit.from_pretrained(out)
    # the score of the weights saved (the best), rounded; before: the last epoch's, however many decimals
    assert f"| top-1 on test (%) | {a.contract.info['top1']:.2f} |" in card
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(a.model(x), b.model(x)) and a.transform == b.transform and a.classes == b.classes
    # fine-tuned from a Hub model: the card links it (the Hub's model tree), by id, with the prefix dropped
    from dataclasses import replace

    from nestvit.hub import _card

    tuned = replace(a, config=replace(a.config, model=replace(a.config.model, weights="hf-hub:org/base")))
    assert "\nbase_model: org/base\n" in _card(tuned, None) and "base_model" not in card


def test_a_model_from_create_model(tmp_path):
    model = nestvit.create_model("vit_tiny_patch4_32", img_size=16, embed_dim=16, depth=1, num_heads=2)
    with pytest.warns(UserWarning, match="records no input transform: saved as taking images stretched to 16x16"):
        loaded = nestvit.from_pretrained(nestvit.save_pretrained(model, tmp_path / "vit"))
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(loaded.model(x), model.eval()(x))
    # your own training's normalisation travels with it (before: the 0.5 default, silently)
    mine = nestvit.InputTransform(channels=3, size=16, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2),
                                  resize="center-crop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = nestvit.from_pretrained(nestvit.save_pretrained(model, tmp_path / "mine", transform=mine))
    assert again.transform == mine and nestvit.input_transform(again.model) == mine
    assert nestvit.input_transform(model) is None  # built without recorded weights: nothing to say
    with pytest.raises(ContractError, match="no such folder"):
        nestvit.from_pretrained(tmp_path / "nope")


def test_the_model_of_a_loaded_run_keeps_its_input_and_classes_and_a_new_head_is_saved_as_it_is(run, tmp_path,
                                                                                                   monkeypatch):
    loaded = nestvit.load(run)
    (tmp_path / "summary.json").write_text('{"test_top1": 99.9}')  # the working folder's: not the model's results
    monkeypatch.chdir(tmp_path)
    same = nestvit.from_pretrained(nestvit.save_pretrained(loaded.model, tmp_path / "model"))
    assert same.transform == loaded.transform and same.classes == loaded.classes  # before: 0.5 and class0..
    built = nestvit.create_model(loaded.contract.model, pretrained=str(tmp_path / "model"))  # before: no classes
    assert nestvit.from_pretrained(nestvit.save_pretrained(built, tmp_path / "built")).classes == loaded.classes
    other = nestvit.create_model(loaded.contract.model, pretrained=str(tmp_path / "model"), num_classes=3)
    assert nestvit.contract.contract_of(other).classes is None  # a new head: no names of the old one
    assert "99.9" not in (tmp_path / "model/README.md").read_text()
    from dataclasses import replace

    from nestvit.interop import save_weights

    named10 = save_weights(loaded.model, tmp_path / "named10.safetensors",
                           contract=replace(loaded.contract, classes=tuple("abcdefghij")))
    fresh = nestvit.load(named10)
    fresh.model.reset_classifier(10)  # a new head of the same count: before, saved under the old names a, b, ...
    with pytest.warns(UserWarning, match=r"head is new \(reset_classifier: 10 classes, built with 10\)"):
        assert nestvit.from_pretrained(nestvit.save_pretrained(fresh, tmp_path / "head10")).classes[0] == "class0"
    loaded.model.reset_classifier(3)
    with pytest.warns(UserWarning, match=r"head is new \(reset_classifier: 3 classes, built with 10\)"):
        out = nestvit.save_pretrained(loaded, tmp_path / "head3")  # before: a folder that did not load
    again = nestvit.from_pretrained(out)
    assert again.model.num_classes == 3 and again.classes == ["class0", "class1", "class2"]
    assert again.transform == loaded.transform and "top-1 on" not in (out / "README.md").read_text()
    named = nestvit.from_pretrained(nestvit.save_pretrained(loaded.model, tmp_path / "abc", classes=["a", "b", "c"]))
    assert named.classes == ["a", "b", "c"]
    with pytest.raises(ContractError, match="classes: 2 names for a model of 3 classes"):
        nestvit.save_pretrained(loaded, tmp_path / "bad", classes=["a", "b"])
    assert not (tmp_path / "bad").exists()


def test_an_edited_config_json_is_said_to_be_ignored(run, tmp_path):
    # before: a renamed class in config.json changed nothing, without a word
    out = nestvit.save_pretrained(run, tmp_path / "shared")
    config = json.loads((out / "config.json").read_text())
    config["classes"][0] = "renamed"
    (out / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="config.json's classes differ from what model.safetensors records"):
        assert nestvit.from_pretrained(out).classes[0] == "class0"


def test_a_folder_that_mixes_two_models_is_refused(run, tmp_path):
    out = nestvit.save_pretrained(run, tmp_path / "shared")
    config = json.loads((out / "config.json").read_text())
    config["kwargs"]["embed_dims"] = 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ContractError, match="mixes two models"):
        nestvit.from_pretrained(out)
    with pytest.raises(ContractError, match="no model.safetensors"):
        nestvit.from_pretrained(tmp_path)


def test_the_hub_without_and_with_huggingface_hub(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ContractError, match="pip install 'nestvit\\[hub\\]'"):
        nestvit.from_pretrained("hf-hub:org/name")
    # a stand-in for huggingface_hub, backed by a local folder: nothing leaves this machine
    repo = tmp_path / "remote"
    calls = {}

    class HfApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["repo"] = repo_id

        def upload_folder(self, folder_path, repo_id, commit_message):
            shutil.copytree(folder_path, repo)

    fake = types.SimpleNamespace(HfApi=HfApi, snapshot_download=lambda repo_id, allow_patterns: str(repo))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    assert push_to_hub(run, "org/name", token="t") == "https://huggingface.co/org/name"
    assert calls == {"token": "t", "repo": "org/name"}
    loaded = nestvit.from_pretrained("hf-hub:org/name")
    assert loaded.contract.model == "nest_tiny_cifar"
    # every command that reads a model takes the Hub id, as timm's create_model does
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("L", (8, 8), 100).save(tmp_path / "x.png")
    assert nestvit.load("hf-hub:org/name").weights == repo / "model.safetensors"
    assert main(["predict", "hf-hub:org/name", str(tmp_path / "x.png")]) == 0
    assert main(["explain", "hf-hub:org/name", str(tmp_path / "x.png"), "--method", "cam",
                 "--out", str(tmp_path / "ex")]) == 0
    assert main(["export", "hf-hub:org/name", "--format", "pt2"]) == 0
    assert (tmp_path / "model.pt2").is_file() and not (repo / "model.pt2").exists()  # here, not in the cache
    from nestvit.train.config import ModelSection
    from nestvit.train.runs import build_model

    model, kwargs = build_model(ModelSection(name=None, weights="hf-hub:org/name"), num_classes=3, in_chans=1,
                                img_size=8)  # fine-tuning from the Hub: the architecture and weights come from it
    assert kwargs["num_classes"] == 3 and type(model).__name__ == type(loaded.model).__name__


def test_the_card_of_ema_weights_shows_the_emas_score(tmp_path):
    # before: the raw model's last top-1 under the EMA's weights
    from tests.train.conftest import tiny_recipe

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(epochs=1, ema={"decay": 0.5})))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    shared = nestvit.save_pretrained(tmp_path / "run" / "ema.safetensors", tmp_path / "shared")
    card = (shared / "README.md").read_text()
    assert f"| top-1 on test (%) | {summary['ema_top1']:.2f} |" in card
