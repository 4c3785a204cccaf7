"""``nestvit explain`` end to end: checkpoints (file, run directory, none), every method, valid PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import nestvit
from nestvit.cli import main
from nestvit.interop import save_weights

PNG = b"\x89PNG\r\n\x1a\n"
NEST = ("nest_tiny_cifar", dict(img_size=32, in_chans=1, num_classes=4, patch_size=2, num_levels=3, block_size=None,
                                embed_dims=8, num_heads=2, depths=1))
VIT = ("vit_tiny_patch4_32", dict(img_size=32, in_chans=3, num_classes=4, embed_dim=16, depth=2, num_heads=2))
TNT = ("tnt_tiny_patch4_32", dict(img_size=16, num_classes=4, dims=(16, 4), num_heads=(2, 1), depth=2))


def save(tmp_path, spec, name, *, with_meta=True):
    """A weights file with the model metadata of hand-made files (``model_overrides``, read as the old layout),
    or with none at all (a plain safetensors state dict, as other libraries write)."""
    model_name, overrides = spec
    torch.manual_seed(0)
    model = nestvit.create_model(model_name, **overrides)
    if not with_meta:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / name))
        return tmp_path / name
    meta = {"model": model_name, "model_overrides": json.dumps(overrides), "classes": json.dumps(list("abcd")),
            "mean": json.dumps([0.5]), "std": json.dumps([0.25])}
    return save_weights(model, tmp_path / name, metadata=meta)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    a = tmp_path / "cat.png"
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(a)  # non-square: resize + crop
    b = tmp_path / "dog.jpg"
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(b)
    return [a, b]


def check_png(path, min_size=(300, 200)):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.width >= min_size[0] and im.height >= min_size[1]
        return im.size


@pytest.mark.parametrize("method", ["gradcat", "cam", "gradcam"])
def test_nest_methods_write_pngs(tmp_path, images, method, capsys):
    ckpt = save(tmp_path, NEST, "nest.safetensors")
    out = tmp_path / "out"
    argv = ["explain", str(ckpt), *map(str, images), "--method", method, "--out", str(out), "--json"]
    if method == "gradcat":
        argv += ["--top-k", "2"]
    else:
        argv += ["--threshold", "0.5"]
    assert main(argv) == 0
    for img in images:
        w, _ = check_png(out / f"{img.stem}_{method}.png")
        if method == "gradcat":
            assert w >= 3 * 300  # two explained classes + the bars
    report = json.loads((out / "explain.json").read_text())
    assert report["method"] == method and len(report["images"]) == 2
    if method == "gradcat":
        e = report["images"][0]["explained"]
        assert len(e) == 2 and len(e[0]["path"]) == 3 and e[0]["levels"] == [3, 2, 1]
        assert e[0]["name"] in "abcd"
    else:
        assert len(report["images"][0]["box"]) == 4
    assert "->" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["cam", "gradcat"])
def test_a_folder_a_batch_at_a_time_with_a_png_per_image_of_the_same_name(tmp_path, images, method):
    ckpt = save(tmp_path, NEST, "nest.safetensors")
    for folder in ("cats", "dogs"):
        (tmp_path / "pets" / folder).mkdir(parents=True)
        (tmp_path / "pets" / folder / "0.png").write_bytes(images[0].read_bytes())
    out = tmp_path / "out"
    assert main(["explain", str(ckpt), str(tmp_path / "pets"), str(images[1]), "--method", method, "--batch-size", "2",
                 "--out", str(out), "--json"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{s}_{method}.png" for s in ("cats_0", "dog", "dogs_0")]
    report = json.loads((out / "explain.json").read_text())["images"]
    assert [r["image"] for r in report] == [str(tmp_path / "pets" / c / "0.png") for c in ("cats", "dogs")] + \
        [str(images[1])]


def test_vit_gradcam_and_rollout_from_a_run_directory(tmp_path, images):
    run = tmp_path / "run"
    run.mkdir()
    save(tmp_path, VIT, "run/best.safetensors")
    for method in ("gradcam", "rollout"):
        assert main(["explain", str(run), str(images[0]), "--method", method, "--out", str(tmp_path / "o")]) == 0
        check_png(tmp_path / "o" / f"cat_{method}.png")


def test_tnt_rollout_with_class_and_gradcat_refused(tmp_path, images, capsys):
    ckpt = save(tmp_path, TNT, "tnt.safetensors")
    assert main(["explain", str(ckpt), str(images[1]), "--method", "rollout", "--out", str(tmp_path / "o")]) == 0
    check_png(tmp_path / "o" / "dog_rollout.png")
    assert main(["explain", str(ckpt), str(images[1]), "--method", "gradcat", "--out", str(tmp_path / "o")]) == 2
    assert "GradCAT" in capsys.readouterr().err


def test_model_flags_without_metadata_and_random_weights(tmp_path, images, capsys):
    bare = save(tmp_path, NEST, "bare.safetensors", with_meta=False)
    assert main(["explain", str(bare), str(images[0]), "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err
    sets = [f"--set={k}={json.dumps(v)}" for k, v in NEST[1].items()]
    assert main(["explain", str(bare), str(images[0]), "--model", NEST[0], *sets, "--class", "3",
                 "--out", str(tmp_path / "o1")]) == 0
    check_png(tmp_path / "o1" / "cat_gradcat.png")
    # no checkpoint at all: --model alone gives a random-weight demo
    assert main(["explain", str(images[1]), "--model", NEST[0], *sets, "--method", "cam",
                 "--out", str(tmp_path / "o2")]) == 0
    check_png(tmp_path / "o2" / "dog_cam.png")
    assert "random weights" in capsys.readouterr().err
    assert main(["explain", str(images[1]), "--out", str(tmp_path / "o3")]) == 2  # neither checkpoint nor --model


def test_the_class_to_explain_by_name_or_index():
    from nestvit.explain.cli import class_index

    names = ["blue sky", "café", "10", "2"]  # numbers sorted as text: the name wins over the index
    assert class_index("café", names, 4) == 1 and class_index("2", names, 4) == 3 and class_index("1", names, 4) == 1
    assert class_index("3", None, 4) == 3
    with pytest.raises(ValueError, match=r"--class tulip: give a class name or an index in 0..3; its classes: blue "
                                         "sky, café, 10, 2"):
        class_index("tulip", names, 4)
    with pytest.raises(ValueError, match=r"--class 4: give a class name or an index in 0..3$"):
        class_index("4", None, 4)



def test_class_names_fold_case_where_one_name_fits():
    from nestvit.explain.cli import class_index

    assert class_index("STRIPES", ["circles", "stripes"], 2) == 1
    with pytest.raises(ValueError, match="give a class name"):
        class_index("cat", ["Cat", "CAT"], 2)  # two names fold to it: none is guessed


def test_output_names_tell_extensions_and_folders_apart():
    from pathlib import Path

    from nestvit.cli_args import output_stems

    paths = [Path("odd/sq.bmp"), Path("odd/sq.gif"), Path("cats/0.png"), Path("dogs/0.png"), Path("x.png"),
             Path("x.png"), Path("up/a.PNG"), Path("low/a.png"), Path("runs/demo"), Path("runs/demo.onnx")]
    assert output_stems(paths) == ["sq_bmp", "sq_gif", "cats_0", "dogs_0", "4_x", "5_x", "up_a", "low_a",
                                   "8_runs_demo", "9_runs_demo"]


def test_maps_keep_their_scale_and_the_explained_class(tmp_path, images, capsys):
    """The occlusion of another class than the prediction: said on stdout, its bar highlighted, the map on a
    colour bar of its own values (not stretched to the full range), and explain.json names the classes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from nestvit.explain import plot

    ckpt = save(tmp_path, NEST, "nest.safetensors")
    out = tmp_path / "out"
    assert main(["explain", str(ckpt), str(images[0]), "--method", "occlusion", "--class", "c", "--out", str(out),
                 "--json", "--top-k", "9"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"weights: {ckpt}\n") and "explained c; top-1 " in captured.out
    assert "--top-k 9: the model has 4 classes; showing all of them" in captured.err
    entry = json.loads((out / "explain.json").read_text())["images"][0]
    assert entry["name"] == "c" and sorted(entry["top_names"]) == list("abcd") and len(entry["map_range"]) == 2
    fig, ax = plt.subplots()
    shown = plot.overlay(ax, np.zeros((8, 8), np.uint8), torch.tensor([[0.0199, 0.0201]]).expand(8, 2))
    assert shown.get_clim() == (0.0, pytest.approx(0.0201))  # a flat map looks flat: from 0, not min-max
    shown = plot.overlay(ax, np.zeros((8, 8), np.uint8), torch.tensor([[-0.002, 0.003]]))
    assert shown.get_clim() == (pytest.approx(-0.003), pytest.approx(0.003))  # signed: centred at 0
    shown = plot.overlay(ax, np.zeros((8, 8), np.uint8), torch.tensor([[-0.002, 0.0]]))  # all against the class
    assert shown.get_clim() == (pytest.approx(-0.002), pytest.approx(0.002)) and shown.get_cmap().name == "RdBu_r"
    plt.close(fig)
    dark = plot._np_image(np.ones((4, 4), np.uint8))  # a 0/1 mask is near-black, as the model sees it
    assert dark.max() == pytest.approx(1 / 255)
