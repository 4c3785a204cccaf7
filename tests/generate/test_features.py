"""The FID feature network is a classifier training run: trained by the one loop, read through its run contract."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from nestvit.contract import InputTransform, RunContract
from nestvit.generate.metrics import (
    ClassifierFeatures,
    FeatureNetError,
    get_feature_extractor,
    load_feature_net,
    train_feature_net,
)
from nestvit.interop import save_weights
from nestvit.train import SmallConvNet, load_config


def test_features_are_the_classifiers_pre_logits_on_its_own_normalisation():
    torch.manual_seed(0)
    net = SmallConvNet(in_chans=1, num_classes=10, widths=(8, 16)).eval()
    fx = ClassifierFeatures(net, InputTransform(channels=1, size=(28, 28), mean=(0.2,), std=(0.4,)), "t:0")
    x = torch.rand(6, 1, 28, 28) * 2 - 1  # the generators' space
    seen = ((x + 1) / 2 - 0.2) / 0.4  # what the classifier saw in training: (x / 255 - mean) / std
    with torch.no_grad():
        want_f = net.forward_head(net.forward_features(seen), pre_logits=True)
        want_l = net(seen)
    feats, logits = fx.both(x)
    assert feats.shape == (6, 16) and logits.shape == (6, 10)
    torch.testing.assert_close(feats, want_f)
    torch.testing.assert_close(logits, want_l)
    torch.testing.assert_close(fx.features(x[:2]), want_f[:2])
    with pytest.raises(FeatureNetError, match=r"takes 1x28x28 images, got 1x32x32.*pad_to"):
        fx.features(torch.zeros(2, 1, 32, 32))


def test_the_recipe_is_the_conv_net_on_inputs_in_minus_one_to_one():
    cfg = load_config("fid_features")
    assert cfg.model.name == "convnet" and cfg.data.name == "fashion_mnist"
    assert cfg.data.mean == (0.5,) and cfg.data.std == (0.5,)  # [-1, 1]: the generators' output space
    assert not cfg.aug.randaugment and cfg.aug.mixup_alpha == 0 and cfg.aug.label_smoothing == 0


def test_feature_net_trains_as_a_run_and_auto_reads_it_back(tmp_path):
    run = tmp_path / "fx"
    weights = train_feature_net("synthetic", run, epochs=1, log=None)
    assert weights == run / "last.safetensors" and (run / "summary.json").is_file()
    fx = load_feature_net(run)
    assert fx.name.startswith("synthetic_convnet:") and fx.transform.mean == (0.5,)
    stamp = weights.stat().st_mtime_ns
    again = get_feature_extractor("auto", cache=run, dataset="synthetic", log=None)  # finished: read, not retrained
    assert again.name == fx.name and weights.stat().st_mtime_ns == stamp
    assert load_feature_net(weights).name == fx.name  # the weights file names the same network


def test_feature_net_refuses_what_is_not_a_classifier(tmp_path):
    from nestvit.generate.models import build_generator

    G = build_generator("nest_28", embed_dims=(8, 8, 4), depths=(1, 1, 1), num_heads=2, latent_dim=8)
    save_weights(G, tmp_path / "g.safetensors", contract=RunContract(model="generator_nest_28", kind="generator"))
    with pytest.raises(FeatureNetError, match="not a classifier.*generator"):
        load_feature_net(tmp_path / "g.safetensors")
    # the retired FeatureNet (its pre-contract metadata): named as such, with the command that replaces it
    save_file({"conv1.weight": torch.zeros(1)}, tmp_path / "old.safetensors",
              metadata={"model": "feature_net", "in_chans": "1", "num_classes": "10", "dim": "128"})
    with pytest.raises(FeatureNetError, match="retired.*nestvit train fid_features.*not comparable"):
        load_feature_net(tmp_path / "old.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FeatureNetError, match="not a nestvit classifier"):
        load_feature_net(tmp_path / "junk.safetensors")


def _feature_net(path, seed, data="fashion_mnist"):
    torch.manual_seed(seed)
    net = SmallConvNet(img_size=28, in_chans=1, num_classes=10, widths=(4, 8))
    contract = RunContract(model="convnet", kwargs={"img_size": 28, "in_chans": 1, "num_classes": 10, "widths": [4, 8]},
                           transform=InputTransform(channels=1, size=(28, 28), mean=(0.5,), std=(0.5,)),
                           info={"data": data})
    return save_weights(net, path, contract=contract)


def test_gan_resume_refuses_another_feature_network(tmp_path):
    from nestvit.data import DatasetError, load_dataset
    from nestvit.generate.train import GanConfig, read_metrics, train_gan

    try:
        load_dataset("fashion_mnist", split="test")
    except DatasetError:
        pytest.skip("Fashion-MNIST not available")
    a, b = _feature_net(tmp_path / "a.safetensors", 0), _feature_net(tmp_path / "b.safetensors", 1)
    cfg = GanConfig(generator="nest_28", generator_overrides={"embed_dims": [8, 8, 4], "num_heads": 2},
                    batch_size=4, max_images=32, steps=2, eval_every=1, eval_n=16, sample_every=1, ckpt_every=1,
                    progress=False, feature_net=str(a))
    run = tmp_path / "run"
    said: list[str] = []
    train_gan(cfg, run, stop_at=1, log=said.append)
    assert not [line for line in said if "was trained on" in line]  # the same data: no note
    names = {r["feature_net"] for r in read_metrics(run) if "feature_net" in r}
    assert names == {load_feature_net(a).name}
    said.clear()
    with pytest.raises(FeatureNetError, match="was evaluated with feature_net=.*a.safetensors, not auto; "
                                              "FIDs of different feature networks are not comparable"):
        train_gan(GanConfig(**{**cfg.__dict__, "feature_net": "auto"}), run, resume=True, log=said.append)
    assert said == []  # refused before anything was set up (an "auto" network is trained for minutes)
    with pytest.raises(FeatureNetError, match=r"measured with the feature network .*, not .*b.safetensors\); FIDs of "
                                              "different feature networks are not comparable"):
        train_gan(GanConfig(**{**cfg.__dict__, "feature_net": str(b)}), run, resume=True, log=lambda s: None)
    shutil.copyfile(a, tmp_path / "moved.safetensors")  # the same network elsewhere: compared by its hash, resumes
    train_gan(GanConfig(**{**cfg.__dict__, "feature_net": str(tmp_path / "moved.safetensors"), "steps": 1}), run,
              resume=True, log=lambda s: None)
    train_gan(cfg, run, resume=True, log=lambda s: None)  # the same network: resumes
    assert [r["step"] for r in read_metrics(run) if r.get("kind") == "eval"] == [0, 1, 2]
    train_gan(cfg, run, resume=True, log=lambda s: None)  # a finished run resumed: its last evaluation stands
    assert [r["step"] for r in read_metrics(run) if r.get("kind") == "eval"] == [0, 1, 2]
    train_gan(GanConfig(**{**cfg.__dict__, "eval_n": 24}), run, resume=True, log=lambda s: None)  # another n
    assert [(r["step"], r["n"]) for r in read_metrics(run) if r.get("kind") == "eval"][-1] == (2, 24)
    # the generator without its run folder (a save_pretrained folder): measured against its recorded data set
    import nestvit
    from nestvit.generate.train import evaluate_run

    shared = nestvit.save_pretrained(run, tmp_path / "shared")
    alone = evaluate_run(shared, n=16, feature_net=str(a), log=lambda s: None)
    assert alone["fid"] == evaluate_run(run, n=16, feature_net=str(a), log=lambda s: None)["fid"]
    assert alone["data"] == "fashion_mnist"
    other_data = _feature_net(tmp_path / "m.safetensors", 2, data="mnist5k")
    said.clear()
    train_gan(GanConfig(**{**cfg.__dict__, "feature_net": str(other_data), "steps": 1}), tmp_path / "run2",
              log=said.append)
    assert any("was trained on mnist5k, this run's data is fashion_mnist" in line for line in said)


def test_generate_eval_repeats_the_runs_last_evaluation(tmp_path, monkeypatch, capsys):
    """`nestvit generate eval RUN` with the run's eval_n and seed gives the run's last FID / KID / IS again."""
    import json

    from nestvit.cli import main
    from nestvit.data import DatasetError, load_dataset
    from nestvit.generate.train import GanConfig, read_metrics, train_gan

    try:
        load_dataset("fashion_mnist", split="test")
    except DatasetError:
        pytest.skip("Fashion-MNIST not available")
    monkeypatch.chdir(tmp_path)
    a, b = _feature_net(tmp_path / "a.safetensors", 0), _feature_net(tmp_path / "b.safetensors", 1)
    cfg = GanConfig(generator="nest_28", generator_overrides={"embed_dims": [8, 8, 4], "num_heads": 2},
                    batch_size=4, max_images=32, steps=2, eval_every=1, eval_n=16, sample_every=1, ckpt_every=1,
                    progress=False, feature_net="a.safetensors")  # relative, as a user writes it
    run = tmp_path / "run"
    train_gan(cfg, run, log=lambda s: None)
    last = [r for r in read_metrics(run) if r.get("kind") == "eval"][-1]
    assert main(["generate", "eval", str(run), "-n", "16", "--out", "ev.json", "--device", "cpu"]) == 0
    got = json.loads((tmp_path / "ev.json").read_text())
    assert got["step"] == 2 and got["generator"] == "ema" and got["n"] == 16 and got["split"] == "test"
    for key in ("fid", "kid", "is"):
        assert got[key] == pytest.approx(last[key], rel=1e-6, abs=1e-9), key
    assert got["feature_net"] == last["feature_net"]
    assert "FID" in capsys.readouterr().out
    # another network, the raw generator, another sample count: other numbers, named as such
    assert main(["generate", "eval", str(run), "-n", "24", "--raw", "--feature-net", str(b), "--out", "b.json"]) == 0
    other = json.loads((tmp_path / "b.json").read_text())
    assert other["generator"] == "raw" and other["n"] == 24 and other["feature_net"] == load_feature_net(b).name
    assert other["feature_net"] != got["feature_net"]
    assert "not on the run's curve" in capsys.readouterr().err
    assert main(["generate", "eval", str(run / "generator.safetensors"), "-n", "16", "--out", "r.json"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["generator"] == "raw"  # named by the file's own role
    # the relative feature_net was recorded absolute: the run evaluates from any folder
    assert yaml.safe_load((run / "config.yaml").read_text())["feature_net"] == str(a)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["generate", "eval", str(run), "-n", "16"]) == 0
    # a run of an older version recorded it relative: not found from here, said so with the fix
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace(str(a), "a.safetensors"))
    capsys.readouterr()
    assert main(["generate", "eval", str(run), "-n", "16"]) == 2
    err = capsys.readouterr().err
    assert "a.safetensors, a path relative to where the run was trained" in err and "--feature-net" in err
    assert main(["generate", "eval", str(run), "-n", "16", "--feature-net", str(a)]) == 0
    with pytest.raises(SystemExit):
        main(["generate", "eval", str(run), "-n", "1"])
    assert "at least 2 samples" in capsys.readouterr().err
