"""GAN training: R1, loss dynamics on a toy set, exact resume, recipes and overrides, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nestvit.generate.train import (
    ConfigError,
    GanConfig,
    apply_overrides,
    latest_checkpoint,
    load_generator,
    load_recipe,
    r1_penalty,
    read_metrics,
    train_gan,
)

TINY = dict(generator="nest_tiny", discriminator="resnet_tiny", batch_size=8, eval_every=-1, progress=False,
            log_every=1, sample_every=1000, ckpt_every=1000, sample_n=4)


def _toy(n: int = 64, value: int = 200, chans: int = 3, size: int = 16) -> torch.Tensor:
    return torch.full((n, chans, size, size), value, dtype=torch.uint8)


class _Linear(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x):
        return (x * self.w).sum(dim=(1, 2, 3)) + 0.5


class _Square(torch.nn.Module):
    def forward(self, x):
        return x.square().sum(dim=(1, 2, 3))


def test_r1_linear_discriminator():
    w = torch.arange(12.0).reshape(1, 3, 2, 2) / 10
    d = _Linear(w)
    x = torch.randn(5, 3, 2, 2)
    logits, pen = r1_penalty(d, x)
    assert torch.allclose(logits, (x * w).sum(dim=(1, 2, 3)) + 0.5)
    assert pen.item() == pytest.approx(float(w.square().sum()), rel=1e-6)  # ||w||^2 = 5.06
    pen.backward()  # differentiable: d||w||^2/dw = 2w
    assert torch.allclose(d.w.grad, 2 * w)


def test_r1_quadratic_discriminator():
    x = torch.randn(4, 1, 3, 3)
    _, pen = r1_penalty(_Square(), x)  # grad = 2x -> mean_i 4 ||x_i||^2
    assert pen.item() == pytest.approx(float(4 * x.square().sum(dim=(1, 2, 3)).mean()), rel=1e-6)


def test_r1_through_nest_discriminator():
    """Double backward through attention works (math SDPA path)."""
    from nestvit.generate.models import build_discriminator

    d = build_discriminator("nest_tiny")
    _, pen = r1_penalty(d, torch.randn(2, 3, 16, 16))
    pen.backward()
    assert d.net.levels[0].transformer_encoder[0].attn.qkv.weight.grad is not None


def test_gan_steps_reduce_discriminator_loss(tmp_path):
    cfg = GanConfig(**TINY, steps=20, lr_d=2e-3, lr_g=2e-4, r1_gamma=0.0, seed=1)
    train_gan(cfg, tmp_path, data=_toy())
    rows = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    assert len(rows) == 20
    first = rows[0]["loss_d"]
    last = sum(r["loss_d"] for r in rows[-5:]) / 5
    assert first == pytest.approx(2 * 0.6931, abs=0.05)  # log(4) for an undecided discriminator
    assert last < first - 0.2, (first, last)


def test_a_run_on_your_own_images_says_so_and_resumes_only_with_them(tmp_path):
    import nestvit
    from nestvit.config import ConfigError
    from nestvit.generate.train import OWN_DATA, evaluate_run

    cfg = GanConfig(**TINY, steps=2)
    said: list[str] = []
    train_gan(cfg, tmp_path, data=_toy(), stop_at=1, log=said.append)
    assert nestvit.load(tmp_path).contract.info["data"] == OWN_DATA  # not cfg.dataset (fashion_mnist)
    with pytest.raises(ValueError, match=r"trained on images given from Python, not on fashion_mnist; resume it the "
                                         r"same way, with the same images: train_gan\(cfg, RUN, resume=True"):
        train_gan(cfg, tmp_path, resume=True)
    with pytest.raises(ConfigError, match="trained on images given from Python, which nestvit cannot read again"):
        evaluate_run(tmp_path, n=8)
    train_gan(cfg, tmp_path, resume=True, data=_toy())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ck = latest_checkpoint(path)
    out = {}
    for f in ("generator", "generator_ema", "discriminator"):
        out.update({f"{f}.{k}": v for k, v in load_file(ck / f"{f}.safetensors").items()})
    return out


@pytest.mark.parametrize("gen,disc", [("nest_tiny", "resnet_tiny"), ("conv_tiny", "nest_tiny")])
def test_resume_is_exact(tmp_path, gen, disc):
    data = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    cfg = GanConfig(**{**TINY, "generator": gen, "discriminator": disc}, steps=6, r1_every=2, r1_gamma=1.0,
                    ema_beta=0.9)
    train_gan(cfg, tmp_path / "straight", data=data)
    s = train_gan(cfg, tmp_path / "split", data=data, stop_at=3)
    assert s["step"] == 3
    with open(tmp_path / "split/metrics.jsonl", "a") as f:  # a record torn by the kill
        f.write('{"kind": "train", "step": 4, "lo')
    train_gan(cfg, tmp_path / "split", data=data, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "straight" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "split" / "state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    assert torch.equal(sa["rng"]["generators"]["data"], sb["rng"]["generators"]["data"])
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    # the log of the split run has every step once
    assert [r["step"] for r in read_metrics(tmp_path / "split") if r["kind"] == "train"] == list(range(1, 7))


def test_a_used_folder_is_refused_and_a_killed_start_is_cleaned(tmp_path):
    """train_gan itself (not only the CLI) keeps a run from being overwritten; a new run in a folder whose run was
    killed before its first checkpoint starts a clean log, without the old temporaries; threads come back."""
    cfg = GanConfig(**{**TINY, "threads": 1}, steps=2)
    train_gan(cfg, tmp_path / "run", data=_toy())
    with pytest.raises(ValueError, match="already holds a run; resume it"):
        train_gan(cfg, tmp_path / "run", data=_toy())
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 0, "kind": "eval", "fid": 9.0}\n{"step": 1, "kind": "train"}\n')
    (killed / ".state.pt.1a2b3c4d.tmp").write_bytes(b"half")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_gan(cfg, killed, data=_toy())
        assert torch.get_num_threads() == 2  # cfg.threads=1 held for the run only
    finally:
        torch.set_num_threads(threads)
    assert [(r["kind"], r["step"]) for r in read_metrics(killed)] == [("train", 1), ("train", 2)]
    assert not list(killed.glob(".*.tmp"))


def test_checkpoint_contents_and_load_generator(tmp_path):
    """The classifier runs' layout: the three weights files (with their run contracts) and one state.pt."""
    cfg = GanConfig(**{**TINY, "ckpt_every": 2}, steps=6)
    train_gan(cfg, tmp_path, data=_toy())
    assert latest_checkpoint(tmp_path) == tmp_path
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert set(state) >= {"kind", "step", "models", "optimizers", "rng", "config"} and state["step"] == 6
    assert set(state["models"]) == {"generator", "generator_ema", "discriminator"}
    G = load_generator(tmp_path)
    assert G.img_size == 16 and not G.training
    assert torch.equal(G.state_dict()[next(iter(G.state_dict()))],
                       state["models"]["generator_ema"][next(iter(G.state_dict()))])


def test_legacy_checkpoint_folders_still_sample_but_do_not_resume(tmp_path):
    cfg = GanConfig(**TINY, steps=1)
    train_gan(cfg, tmp_path / "new", data=_toy())
    old = tmp_path / "old" / "checkpoints" / "step_000001"
    old.mkdir(parents=True)
    for f in ("generator.safetensors", "generator_ema.safetensors", "discriminator.safetensors"):
        (old / f).write_bytes((tmp_path / "new" / f).read_bytes())
    (tmp_path / "old" / "checkpoints" / "latest").write_text("step_000001\n")
    assert load_generator(tmp_path / "old").img_size == 16
    with pytest.raises(FileNotFoundError, match="older nestvit"):
        train_gan(cfg, tmp_path / "old", data=_toy(), resume=True)


def test_bf16_option_runs(tmp_path):
    cfg = GanConfig(**TINY, steps=2, bf16=True, r1_every=1)
    s = train_gan(cfg, tmp_path, data=_toy())
    assert s["step"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss_d"])) for r in read_metrics(tmp_path))


def test_recipes_and_overrides():
    for name in ("gan_nest_fashion_mnist", "gan_conv_fashion_mnist"):
        cfg = load_recipe(name)
        assert cfg.dataset == "fashion_mnist" and cfg.beta1 == 0.0 and cfg.beta2 == 0.99
    nest, conv = load_recipe("gan_nest_fashion_mnist"), load_recipe("gan_conv_fashion_mnist")
    import dataclasses

    diff = {k for k, v in dataclasses.asdict(nest).items() if dataclasses.asdict(conv)[k] != v}
    assert diff == {"generator"}  # the baseline differs only in the generator
    cfg = apply_overrides(nest, ["steps=10", "bf16=true", "lr_g=3e-4", "generator_overrides.depths=[1,1,1]"])
    assert cfg.steps == 10 and cfg.bf16 is True and cfg.lr_g == 3e-4
    assert cfg.generator_overrides == {"depths": [1, 1, 1]}
    with pytest.raises(ConfigError, match="unknown key.*stepz.*did you mean steps"):
        apply_overrides(nest, ["stepz=3"])
    with pytest.raises(ConfigError, match="steps: expected int"):
        apply_overrides(nest, ["steps=ten"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(nest, ["steps"])


def test_recipe_unknown_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("kind: gan\nsteps: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(p)


def test_one_config_system_for_both_kinds(tmp_path, capsys):
    """GAN and classifier recipes: one loader, one --set syntax, one ConfigError, told apart by their kind."""
    from nestvit import config
    from nestvit.cli import main
    from nestvit.train.config import ConfigError as TrainConfigError
    from nestvit.train.config import load_config

    assert ConfigError is TrainConfigError is config.ConfigError
    assert set(config.builtin_recipes("gan")) == {"gan_conv_fashion_mnist", "gan_nest_fashion_mnist"}
    assert "mnist5k_nest" in config.builtin_recipes("classifier")
    with pytest.raises(ConfigError, match="is a gan recipe.*nestvit generate train"):
        load_config("gan_nest_fashion_mnist")
    with pytest.raises(ConfigError, match="is a classifier recipe.*nestvit train"):
        load_recipe("mnist5k_nest")
    p = tmp_path / "old.yaml"
    p.write_text("steps: 3\n")  # a GAN recipe from before kinds: says how to declare it
    with pytest.raises(ConfigError, match="add the line `kind: gan`"):
        load_recipe(p)
    # any depth of dotted keys, values as YAML, the same messages
    cfg = apply_overrides(load_recipe("gan_nest_fashion_mnist"), ["generator_overrides.depths=[1, 1, 1]"])
    assert cfg.generator_overrides == {"depths": [1, 1, 1]}
    with pytest.raises(ConfigError, match="cannot read the value"):
        apply_overrides(cfg, ["generator_overrides.depths=[[["])
    assert main(["generate", "train", "--list-keys"]) == 0
    keys = capsys.readouterr().out.split()
    assert "steps" in keys and "generator_overrides.*" in keys
    # a run's config.yaml records its kind and reads back
    text = config.dump(cfg)
    assert text.startswith("kind: gan")


def test_cli_sample_writes_png(tmp_path):
    from nestvit.cli import main

    train_gan(GanConfig(**TINY, steps=1), tmp_path / "run", data=_toy())
    out = tmp_path / "grid.png"
    assert main(["generate", "sample", str(tmp_path / "run"), "-n", "6", "--out", str(out), "--seed", "3"]) == 0
    im = Image.open(out)
    im.verify()
    im = Image.open(out)
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.size == (2 * 16 + 3 * 2, 3 * 16 + 4 * 2)  # 6 images, round(sqrt 6) = 2 per row -> 3 rows
    # the same seed gives the same grid
    out2 = tmp_path / "grid2.png"
    main(["generate", "sample", str(tmp_path / "run"), "-n", "6", "--out", str(out2), "--seed", "3"])
    assert out.read_bytes() == out2.read_bytes()
    # a folder: one PNG per image, the same images as the grid's cells
    assert main(["generate", "sample", str(tmp_path / "run"), "-n", "6", "--out", str(tmp_path / "imgs"),
                 "--seed", "3"]) == 0
    files = sorted((tmp_path / "imgs").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(6)]
    grid, first = np.array(Image.open(out)), np.array(Image.open(files[0]))
    assert first.shape == (16, 16, 3) and np.array_equal(first, grid[2:18, 2:18])
    assert main(["generate", "sample", str(tmp_path / "run"), "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["generate", "sample", str(tmp_path / "run"), "-n", "2", "--out", str(tmp_path / "imgs")]) == 2
    assert len(list((tmp_path / "imgs").iterdir())) == 6  # samples of another run are not mixed in


def test_cli_train_on_fashion_mnist(tmp_path, capsys):
    from nestvit.cli import main
    from nestvit.data import DatasetError, load_dataset

    try:
        load_dataset("fashion_mnist", split="test")
    except DatasetError:
        pytest.skip("Fashion-MNIST not available")
    run = tmp_path / "run"
    args = ["generate", "train", "gan_nest_fashion_mnist", "--out", str(run), "--set", "steps=2",
            "--set", "batch_size=4", "--set", "eval_every=-1", "--set", "max_images=32", "--set", "progress=false",
            "--set", "generator_overrides.embed_dims=[8,8,4]", "--set", "generator_overrides.num_heads=2",
            "--set", "threads=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: 2 steps" in out and "next: nestvit generate sample" in out
    assert (run / "samples" / "step_000002.png").is_file()
    # a second train into the same directory is refused; --resume continues it
    assert main(args) == 2
    assert main(["generate", "train", "--resume", str(run), "--set", "steps=3"]) == 0
    assert torch.load(run / "state.pt", weights_only=True)["step"] == 3


def test_device_is_chosen_and_an_absent_gpu_is_named(tmp_path):
    from nestvit.errors import UserError

    cfg = GanConfig(**{**TINY, "steps": 1})
    s = train_gan(cfg, tmp_path / "cpu", data=_toy(), device="cpu")
    assert s["device"] == "cpu" and s["step"] == 1
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device; use --device cpu"):
            train_gan(cfg, tmp_path / "gpu", data=_toy(), device="cuda")


def test_a_discriminator_or_batch_that_does_not_fit_the_data_is_one_clear_error(tmp_path):
    """Before: a discriminator of another size or channel count was a raw conv error (an internal error in the
    CLI); a batch of 100,000 from 4,000 images was killed by the kernel."""
    with pytest.raises(ValueError, match=r"discriminator resnet_32 takes 3x32x32 images but the data are 3x16x16; "
                                         r"pick the preset of that size \(nest_tiny or resnet_tiny, as the generator "
                                         r"nest_tiny\)"):
        train_gan(GanConfig(**{**TINY, "discriminator": "resnet_32"}, steps=1), tmp_path / "a", data=_toy())
    with pytest.raises(ValueError, match="batch_size 64 is larger than the 3 training images"):
        train_gan(GanConfig(**{**TINY, "batch_size": 64}, steps=1), tmp_path / "b", data=_toy()[:3])


def test_your_own_images_train_a_gan_as_docs_generation_md_says(tmp_path, capsys):
    """docs/generation.md, "Your own images": load_images -> one uint8 tensor -> train_gan -> generate sample;
    `generate train` itself names that way for an image folder."""
    import numpy as np
    from PIL import Image

    from nestvit.cli import main
    from nestvit.config import ConfigError
    from nestvit.data import load_images

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "my_images" / c).mkdir(parents=True)
        for i in range(6):
            image = rng.integers(0, 255, (30 + i, 40), dtype=np.uint8)  # of several sizes
            Image.fromarray(image).save(tmp_path / "my_images" / c / f"{i}.png")
    ds = load_images(tmp_path / "my_images", "train", holdout=0, size=28, channels=1)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.dtype == torch.uint8 and images.shape == (12, 1, 28, 28)
    cfg = GanConfig(generator="nest_28", discriminator="resnet_28", steps=1, batch_size=4, progress=False)
    train_gan(cfg, tmp_path / "my_gan", data=images, log=lambda s: None)
    assert main(["generate", "sample", str(tmp_path / "my_gan"), "-n", "4", "--out", str(tmp_path / "g.png")]) == 0
    with pytest.raises(ConfigError, match=r"dataset 'imagenet': `nestvit generate train` reads an in-memory set .* "
                                          "or your own images: dataset imagefolder with data_root=FOLDER"):
        GanConfig(dataset="imagenet")


def test_a_missing_data_set_names_the_fix_that_applies_to_a_gan_config(tmp_path, monkeypatch):
    """The data sets' own hint is `--set data.download=true`, a key GAN configs do not have."""
    from nestvit.data import DatasetError
    from nestvit.generate.train import load_train_images

    monkeypatch.setenv("NESTVIT_DATA_DIR", str(tmp_path))  # an empty data folder: CIFAR-10 is not there
    with pytest.raises(DatasetError, match=r"fetch the files once from Python: "
                                           r"nestvit.data.load_dataset\('cifar10', download=True\)") as e:
        load_train_images(GanConfig(dataset="cifar10"))
    assert "data.download" not in str(e.value)


def test_a_gan_trains_on_a_folder_of_your_images_from_the_command_line(tmp_path, capsys):
    from nestvit.cli import main

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "photos" / cls).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / cls / f"{i}.png")
    run = tmp_path / "run"
    common = ["--set", "threads=1", "--set", "progress=false", "--set", "ckpt_every=1"]
    assert main(["generate", "train", "gan_nest_fashion_mnist", "--out", str(run), "--set", "dataset=imagefolder",
                 "--set", f"data_root={tmp_path / 'photos'}", "--set", "generator=nest_tiny", "--set",
                 "discriminator=resnet_tiny", "--set", "steps=2", "--set", "batch_size=8", *common]) == 0
    err = capsys.readouterr().err
    assert f"data: {tmp_path / 'photos'} 16 images of 3x16x16" in err
    assert "no FID/KID/IS evaluations: for your images name a feature network, --set feature_net=RUN" in err
    assert main(["generate", "train", "--resume", str(run), "--set", "steps=3"]) == 0  # the folder is in its config
    assert main(["generate", "sample", str(run), "-n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert main(["generate", "eval", str(run), "-n", "4"]) == 2
    assert "without a feature network for FID: name one with --feature-net RUN" in capsys.readouterr().err
    assert main(["generate", "report", str(run)]) == 2
    assert "trained on your own images" in capsys.readouterr().err
    # FID against the folder's own images, with a classifier trained on that folder (the command the message names)
    features = tmp_path / "features"
    assert main(["train", "fid_features", "--out", str(features), "--set", "data.name=imagefolder", "--set",
                 f"data.root={tmp_path / 'photos'}", "--set", "data.img_size=16", "--set", "data.mean=[0.5,0.5,0.5]",
                 "--set", "data.std=[0.5,0.5,0.5]", "--set", "global_batch=4", "--set", "epochs=1", "--threads", "1",
                 "--set", "progress=false"]) == 0
    capsys.readouterr()
    assert main(["generate", "eval", str(run), "-n", "16", "--feature-net", str(features)]) == 0
    out = capsys.readouterr().out
    assert f"16 samples vs {tmp_path / 'photos'} train, features imagefolder_convnet:" in out
    assert "may not describe these images" not in capsys.readouterr().err
    measured = tmp_path / "measured"
    assert main(["generate", "train", "gan_nest_fashion_mnist", "--out", str(measured), "--set", "dataset=imagefolder",
                 "--set", f"data_root={tmp_path / 'photos'}", "--set", "generator=nest_tiny", "--set",
                 "discriminator=resnet_tiny", "--set", "steps=2", "--set", "batch_size=8", "--set", "eval_every=2",
                 "--set", "eval_n=16", "--set", f"feature_net={features}", *common]) == 0
    evals = [r for r in read_metrics(measured) if r["kind"] in ("eval", "eval_floor")]
    assert [(r["kind"], r["step"]) for r in evals] == [("eval_floor", 0), ("eval", 0), ("eval", 2)]
    capsys.readouterr()
    assert main(["generate", "report", str(measured), "--out", str(tmp_path / "report")]) == 0
    assert main(["generate", "train", "gan_nest_fashion_mnist", "--set", "dataset=imagefolder"]) == 2
    assert "dataset imagefolder needs data_root=FOLDER" in capsys.readouterr().err
    (tmp_path / "photos" / "a" / "0.png").unlink()  # the images changed: the resume says so
    assert main(["generate", "train", "--resume", str(run), "--set", "steps=4"]) == 0
    assert "warning: the training images changed since the run's last checkpoint (then 16 images" in \
        capsys.readouterr().err
    (tmp_path / "photos").rename(tmp_path / "moved")
    assert main(["generate", "train", "--resume", str(run), "--set", "steps=5"]) == 2
    assert "does not exist (moved? a run reads its images from where they were: nestvit generate train --resume " \
        "RUN --set data_root=NEW_PATH)" in capsys.readouterr().err
    assert main(["generate", "train", "--resume", str(run / "config.yaml")]) == 2
    assert "config.yaml is a file; --resume takes the run folder it was trained in" in capsys.readouterr().err
