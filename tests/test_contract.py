"""The run contract (``nestvit.contract``): what a weights file says of its model, and bad files and images.

Each bad input a user can hand to a command that reads a model gets one line naming the problem and the
fix, exit status 2, and nothing written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nestvit
from nestvit.cli import main
from nestvit.contract import ContractError, InputTransform, RunContract, load, read_contract
from nestvit.interop import WeightsError, save_weights

TINY = dict(img_size=16, in_chans=1, num_classes=3, patch_size=2, num_levels=2, block_size=4, embed_dims=8,
            num_heads=2, depths=1)


@pytest.fixture
def weights(tmp_path):
    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    transform = InputTransform(channels=1, size=(16, 16), mean=(0.2,), std=(0.4,), content=(12, 12))
    contract = RunContract(model="nest_tiny_cifar", kwargs=TINY, classes=("cat", "dog", "eel"), transform=transform,
                           info={"data": "mnist5k"})
    return save_weights(model, tmp_path / "w.safetensors", contract=contract)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
    return path


def one_line_error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_contract_round_trip_and_transform(weights, image):
    c = read_contract(weights)
    assert c.classes == ("cat", "dog", "eel") and c.kwargs["embed_dims"] == 8 and c.kind == "classifier"
    assert RunContract.from_json(c.to_json()) == c
    loaded = load(weights)
    assert loaded.classes == ["cat", "dog", "eel"] and not loaded.model.training
    x = loaded.transform.read(image)  # RGB 20x30 -> grey, stretched to 12x12, zero-padded to 16x16
    assert x.shape == (1, 16, 16) and x.dtype == torch.uint8
    assert int(x[:, :2].sum()) == 0 and int(x[:, -2:].sum()) == 0 and int(x[:, 2:14, 2:14].sum()) > 0
    y = loaded.transform(x[None])
    assert torch.allclose(y, (x[None].float() / 255 - 0.2) / 0.4)
    folder = InputTransform(channels=3, size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, resize="center-crop")
    assert folder.read(image).shape == (3, 8, 8)


def test_create_model_records_itself_and_save_weights_writes_it(tmp_path):
    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    save_weights(model, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(loaded.model(x), model.eval()(x))
    assert loaded.transform == InputTransform.default(1, 16)  # none recorded: [-1, 1] inputs
    assert loaded.classes == ["class0", "class1", "class2"]


def test_a_flipped_bit_is_refused(weights, image, capsys):
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged"):
        load(weights)
    assert "damaged" in one_line_error(capsys, "predict", str(weights), str(image))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_weights_file_is_one_line_everywhere(weights, image, tmp_path, capsys, damage):
    data = weights.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00" * 100, "empty": b""}[damage])
    for argv in (["explain", str(bad), str(image), "--out", str(tmp_path / "x")], ["predict", str(bad), str(image)],
                 ["eval", str(bad)], ["bench", str(bad)]):
        err = one_line_error(capsys, *argv)
        assert ("not a weights file (empty)" if damage == "empty" else "cannot read weights") in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_a_pth_of_another_model_to_explain_model(tmp_path, image, capsys):
    other = nestvit.create_model("vit_tiny_patch4_32", img_size=16, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    err = one_line_error(capsys, "explain", str(tmp_path / "other.pth"), str(image), "--model", "nest_tiny_cifar",
                         *[f"--set={k}={json.dumps(v)}" for k, v in TINY.items()], "--out", str(tmp_path / "x"))
    assert "does not fit Nest" in err
    # and without --model: the file records none, so the message says how to name it
    assert "--model NAME" in one_line_error(capsys, "explain", str(tmp_path / "other.pth"), str(image),
                                            "--out", str(tmp_path / "x"))


def test_a_decompression_bomb_is_one_line(weights, tmp_path, capsys, monkeypatch):
    """A 400-megapixel PNG: Pillow refuses it as a decompression bomb (its limit lowered here to keep it small)."""
    big = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100 // 2)  # 300x300 is then > 2x the limit: an error
    for argv in (["predict", str(weights), str(big)],
                 ["explain", str(weights), str(big), "--out", str(tmp_path / "x")]):
        assert "too large to open safely" in one_line_error(capsys, *argv)


def test_not_an_image_is_one_line(weights, tmp_path, capsys):
    (tmp_path / "notes.png").write_text("not a picture")
    assert "cannot read the image" in one_line_error(capsys, "predict", str(weights), str(tmp_path / "notes.png"))
    assert "no such image file" in one_line_error(capsys, "predict", str(weights), str(tmp_path / "missing.png"))


def test_predict_skips_an_unreadable_file_and_keeps_the_others(weights, image, tmp_path, capsys):
    # before: one broken file in a folder of photos aborted the whole batch and wrote no CSV
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a.png", "b.png"):
        (photos / name).write_bytes(Path(image).read_bytes())
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "p.csv"
    assert main(["predict", str(weights), str(photos), "--out", str(out), "--batch-size", "2"]) == 0
    std = capsys.readouterr()
    assert "warning: skipped 1 unreadable file(s), left out of the results:\n  " in std.err
    assert "broken.png: cannot read the image" in std.err
    assert "(2 images, top" in std.out and "1 unreadable skipped" in std.out
    assert [row.split(",")[0] for row in out.read_text().splitlines()[1:]] == [str(photos / "a.png"),
                                                                               str(photos / "b.png")]
    (photos / "a.png").write_bytes(b"x")
    (photos / "b.png").write_bytes(b"y")
    assert "none of the 3 files is a readable image" in one_line_error(capsys, "predict", str(weights), str(photos))


def test_eval_of_a_folder_names_every_unreadable_file(weights, image, tmp_path, capsys):
    # before: the first bad file stopped it, named alone, and each rerun met the next one
    for c in ("cat", "dog", "eel"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        (tmp_path / "photos" / c / "0.png").write_bytes(Path(image).read_bytes())
    for c in ("cat", "dog"):
        (tmp_path / "photos" / c / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["eval", str(weights), "--data", str(tmp_path / "photos")]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the note that a lone weights file scores all of it
    assert "2 files are unreadable (all 5 checked): " in err and "cat/bad.png" in err and "dog/bad.png" in err
    assert err.rstrip().endswith(f"replace them or remove them from {tmp_path / 'photos'}, then evaluate again")


def test_explain_skips_an_unreadable_file_and_refuses_a_class_list_of_another_length(weights, image, tmp_path,
                                                                                       capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(Path(image).read_bytes())
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["explain", str(weights), str(photos), str(photos / "a.png"), "--method", "cam",
                 "--out", str(tmp_path / "x")]) == 0
    std = capsys.readouterr()
    assert "warning: skipped 1 unreadable file(s), left out of the results:\n  " in std.err and "broken.png" in std.err
    assert len(list((tmp_path / "x").iterdir())) == 2  # a.png given twice: two files, as before
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")  # the model has 3 classes: before, silently ignored
    assert "2 names, but the model has 3 classes" in one_line_error(
        capsys, "explain", str(weights), str(image), "--classes", str(names), "--out", str(tmp_path / "y"))


def test_unwritable_out_fails_before_the_work(weights, image, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for argv in (["eval", str(weights), "--out", str(blocker / "sub")],
                 ["explain", str(weights), str(image), "--out", str(blocker / "sub")],
                 ["explain", str(weights), str(image), "--out", str(blocker)]):
        assert "--out" in one_line_error(capsys, *argv)


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--limit", "-5"), ("--limit", "0"),
                                        ("--batch-size", "two")])
def test_eval_counts_must_be_positive(weights, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["eval", str(weights), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_not_a_run(tmp_path, capsys):
    assert "no such run directory or weights file" in one_line_error(capsys, "eval", str(tmp_path / "nothing"))
    assert "(did you mean nest_tiny_224.jx_in1k" in one_line_error(capsys, "eval", "nest_tiny_224.jx_in1")  # a tag
    (tmp_path / "empty").mkdir()
    assert "empty: no weights files (best/last/ema.safetensors, model.safetensors): give a training run's folder" \
        in one_line_error(capsys, "predict", str(tmp_path / "empty"), "x.png")
    (tmp_path / "empty" / "config.yaml").write_text("kind: classifier\n")  # a run killed before its first checkpoint
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert f"empty: no weights: the run was stopped before its first checkpoint; train it again (nestvit train " \
        f"{tmp_path / 'empty'}/config.yaml --out {tmp_path / 'empty'})" in \
        one_line_error(capsys, "predict", str(tmp_path / "empty"), "x.png")
    assert "runs/nope: no such run directory or weights file" in one_line_error(capsys, "explain", "runs/nope", "x.png")
    assert "(did you mean nest_tiny_224.jx_in1k" in one_line_error(capsys, "explain", "nest_tiny_224.jx_in1", "x.png")
    with pytest.raises(ContractError, match="newer nestvit"):
        RunContract.from_json(json.dumps({"version": 99, "model": "nest_tiny_cifar"}))
    with pytest.raises(ContractError, match="damaged"):
        RunContract.from_json("{not json")


def test_bench_takes_a_trained_run(weights, capsys):
    fast = ["--batch", "2", "--warmup", "0", "--iters", "1", "--peak-size", "64", "--peak-iters", "1", "--no-memory",
            "--no-data", "--mode", "infer"]
    assert main(["bench", str(weights), *fast]) == 0
    assert f"{weights} (nest_tiny_cifar)" in capsys.readouterr().out


def test_a_folder_jpeg_reads_as_the_eval_split_decodes_it(tmp_path):
    """predict / explain prepare a file exactly as an image folder's evaluation does (JPEG draft mode too)."""
    from nestvit.data.datasets import ImageFolderDataset

    folder = tmp_path / "test" / "a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (370, 500, 3), dtype=np.uint8)).save(folder / "x.jpg", quality=90)
    ds = ImageFolderDataset(tmp_path, split="test", size=16)
    t = InputTransform(channels=3, size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, resize="center-crop")
    assert torch.equal(ds[0][0], t.read(folder / "x.jpg"))


def _sideways(tmp_path: Path, orientation: int):
    """``(file, stored pixels, upright pixels)``: a 12x20 PNG stored turned, with the EXIF tag that says how to
    turn it back."""
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    shown = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))  # what a viewer shows: 12 high
    stored = {6: shown.transpose(Image.Transpose.ROTATE_90), 3: shown.transpose(Image.Transpose.ROTATE_180),
              2: shown.transpose(Image.Transpose.FLIP_LEFT_RIGHT)}[orientation]  # tag 6: turn 90 clockwise
    tags = Image.Exif()
    tags[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    stored.save(path, exif=tags.tobytes())
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(img)), np.asarray(shown))  # the tag is right
    return path, stored, shown


@pytest.mark.parametrize("orientation", [6, 3, 2])
@pytest.mark.parametrize("resize", ["stretch", "center-crop"])
def test_a_photo_stored_sideways_is_read_upright(tmp_path, orientation, resize):
    """Phone photos carry their orientation in EXIF: every reader turns them as viewers do (files and PIL images
    alike; training's image folders too); a contract from before keeps the pixels as stored."""
    from nestvit.data.datasets import ImageFolderDataset

    path, stored, shown = _sideways(tmp_path, orientation)
    t = InputTransform(channels=3, size=(12, 12), mean=(0.5,) * 3, std=(0.5,) * 3, resize=resize)
    assert t.exif_orientation and InputTransform.from_dict(t.to_dict()).exif_orientation
    want = t.read(shown)
    assert torch.equal(t.read(path), want)
    with Image.open(path) as img:
        assert torch.equal(t.read(img), want)
    old = InputTransform.from_dict({k: v for k, v in t.to_dict().items() if k != "exif_orientation"})
    assert not old.exif_orientation
    with pytest.raises(ContractError, match="exif_orientation must be true or false"):
        InputTransform.from_dict({**t.to_dict(), "exif_orientation": "false"})  # a hand-edited config.json
    assert torch.equal(old.read(path), t.read(stored)) and not torch.equal(old.read(path), want)
    if resize == "center-crop":  # training reads the folder the same way
        folder = tmp_path / "test" / "a"
        folder.mkdir(parents=True)
        path.rename(folder / path.name)
        assert torch.equal(ImageFolderDataset(tmp_path, split="test", size=12)[0][0], want)


def test_published_weights_resize_bicubic_as_timm_evaluates_them(tmp_path):
    # before: every centre crop was resized bilinearly, timm's NesT / TNT / DeiT weights included (timm: bicubic)
    from nestvit.pretrained import published

    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    t = InputTransform(channels=3, size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, resize="center-crop",
                       crop_pct=0.8, interpolation="bicubic")
    with Image.open(path) as img:  # shorter side 16 / 0.8 = 20 with Pillow's bicubic filter, centre 16x16
        want = np.asarray(img.resize((28, 20), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((6, 2, 22, 18)))
    assert np.array_equal(t.read(path).permute(1, 2, 0).numpy(), want)
    bilinear = InputTransform.from_dict({k: v for k, v in t.to_dict().items() if k != "interpolation"})
    assert bilinear.interpolation == "bilinear" and not torch.equal(bilinear.read(path), t.read(path))  # as before
    assert InputTransform.from_dict(t.to_dict()) == t
    with pytest.raises(ContractError, match="interpolation must be 'bilinear' or 'bicubic'"):
        InputTransform.from_dict({**t.to_dict(), "interpolation": "lanczos"})
    with pytest.raises(ContractError, match="applies to resize='center-crop'"):
        InputTransform.from_dict({**t.to_dict(), "resize": "stretch"})
    from types import SimpleNamespace

    model = SimpleNamespace(in_chans=3, img_size=(224, 224))
    assert all(published(tag).transform(model).interpolation == "bicubic"
               for tag in ("nest_tiny_224.jx_in1k", "nest_tiny_224.official_in1k", "tnt_s_patch16_224.in1k",
                           "deit_tiny_patch16_224.fb_in1k"))


def test_tar_shards_turn_a_sideways_photo_upright_unless_the_model_was_trained_on_it_as_stored(tmp_path):
    from nestvit.data.shards import ShardSet

    path, stored, shown = _sideways(tmp_path, 6)
    shards = ShardSet(tmp_path, [], [], [], [], ["a"], {"a": 0}, size=12, crop_scale=None)
    sample = {"__url__": "s.tar", "__key__": "k", "png": path.read_bytes(), "cls": b"a"}
    t = InputTransform(channels=3, size=(12, 12), mean=(0.5,) * 3, std=(0.5,) * 3, resize="center-crop")
    assert torch.equal(shards.decode(sample)[0], t.read(shown))
    shards.exif_orientation = False  # nestvit eval of a model whose contract says so
    assert torch.equal(shards.decode(sample)[0], t.read(stored))


def test_a_damaged_exif_block_reads_the_pixels_as_stored_and_damaged_pixels_still_fail(tmp_path):
    from nestvit.contract import UnreadableImageError
    from nestvit.standalone import upright

    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 255, (12, 20, 3), dtype=np.uint8))
    # an EXIF block that says it holds 65,535 entries and ends after one, the orientation tag (6) in it
    stored.save(tmp_path / "exif.png", exif=b"II*\x00\x08\x00\x00\x00\xff\xff\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00")
    t = InputTransform(channels=3, size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, resize="center-crop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow: "Corrupt EXIF data"
        assert torch.equal(t.read(tmp_path / "exif.png"), t.read(stored))
    tags = Image.Exif()
    tags[0x0112] = 6
    stored.save(tmp_path / "pixels.png", exif=tags.tobytes())
    data = bytearray((tmp_path / "pixels.png").read_bytes())
    at = data.index(b"IDAT") + 40
    data[at:at + 40] = bytes(b ^ 0xFF for b in data[at:at + 40])  # the compressed pixels damaged
    (tmp_path / "pixels.png").write_bytes(bytes(data))
    for resize in ("center-crop", "stretch"):  # before: the EXIF step swallowed the error, half the pixels read
        with pytest.raises(UnreadableImageError, match="pixels.png"):
            InputTransform(channels=3, size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, resize=resize).read(
                tmp_path / "pixels.png")
    with Image.open(tmp_path / "pixels.png") as img, pytest.raises(OSError):
        upright(img)


def test_model_overrides_of_set_are_one_syntax_and_one_line_errors(weights, image, tmp_path, capsys):
    """bench and explain read --set model overrides the same way; a value that does not parse is one line."""
    from nestvit.cli_args import parse_sets

    assert parse_sets(["embed_dims=[8, 16]", "act=gelu", "qkv_bias=true"]) == {
        "embed_dims": (8, 16), "act": "gelu", "qkv_bias": True}
    assert "--set depths: cannot read the value" in one_line_error(
        capsys, "explain", str(image), "--model", "nest_tiny_cifar", "--set", "depths=[[[", "--out", str(tmp_path))


def test_create_model_takes_a_run_folder_or_a_save_pretrained_folder_as_weights(weights, tmp_path):
    # as model.weights and nestvit.load do (before: "no such weights file" for a folder)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(weights.read_bytes())
    shared = nestvit.save_pretrained(run, tmp_path / "shared")
    want = nestvit.load(weights).model.state_dict()
    for source in (run, shared):
        got = nestvit.create_model("nest_tiny_cifar", weights=source, **TINY).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_pretrained_takes_your_own_run_with_its_architecture_and_adapts_a_new_head(weights, tmp_path):
    # before: "pretrained='runs/demo': no such file", and the sizes and channels had to be copied by hand
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(weights.read_bytes())
    want = nestvit.load(weights).model.state_dict()
    for source in (run, nestvit.save_pretrained(run, tmp_path / "shared"), weights):
        model = nestvit.create_model("nest_tiny_cifar", pretrained=source, num_classes=5)  # TINY from the file
        assert model.in_chans == 1 and model.num_classes == 5 and "head: re-initialised for 5" in model.adapt_notes[0]
        got = model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("head"))
    with pytest.raises(WeightsError, match=r"create_model\(NAME, pretrained=PATH, ...\) adapts them"):
        nestvit.create_model("nest_tiny_cifar", weights=run, **{**TINY, "num_classes": 5})


@pytest.mark.parametrize("command", ["eval", "predict", "explain"])
def test_threads_hold_for_the_command_only(command, monkeypatch):
    # a shared machine: eval, predict and explain take --threads as bench does, and put the count back after
    import importlib

    from nestvit.cli import COMMANDS

    seen = []
    module = importlib.import_module(COMMANDS[command][0])
    monkeypatch.setattr(module, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    before = torch.get_num_threads()
    assert main([command, "x", *(["y"] if command != "eval" else []), "--threads", "1"]) == 0
    assert seen == [1] and torch.get_num_threads() == before


def test_the_transform_refuses_images_it_would_normalise_wrongly():
    # before: 0..255 floats (or normalised ones) went through as if in [0, 1], without a word
    t = InputTransform(channels=1, size=(4, 4), mean=(0.5,), std=(0.25,))
    x = torch.full((1, 1, 4, 4), 255, dtype=torch.uint8)
    assert torch.equal(t(x), t(x.float() / 255))  # uint8 and [0, 1] floats: the same
    with pytest.raises(ValueError, match=r"float images must lie in \[0, 1\]; these span 255..255"):
        t(x.float())
    with pytest.raises(TypeError, match="not torch.int64"):
        t(x.long())
    with pytest.raises(TypeError, match="must be a torch tensor .* not a ndarray"):
        t(np.zeros((1, 1, 4, 4), np.uint8))


@pytest.mark.parametrize("classes", [3, 0])
def test_save_weights_records_the_head_a_model_has_now(classes, tmp_path):
    # before: the file recorded the class count the model was built with, and did not load after reset_classifier
    model = nestvit.create_model("nest_tiny_cifar", **{**TINY, "num_classes": 10}).eval()
    model.reset_classifier(classes)
    path = save_weights(model, tmp_path / "w.safetensors")
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(load(path).model(x), model(x))


def test_save_weights_takes_the_transform_and_classes_of_your_own_training(tmp_path):
    # a model trained in your own loop: its normalisation and class names travel with it (before: the 0.5 default)
    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    transform = InputTransform(channels=1, size=(16, 16), mean=(0.13,), std=(0.31,))
    loaded = load(save_weights(model, tmp_path / "w.safetensors", transform=transform, classes=["x", "y", "z"]))
    assert loaded.transform == transform and loaded.classes == ["x", "y", "z"]


def test_read_batch_of_one_path_is_a_batch_of_one(image):
    t = InputTransform(channels=1, size=(16, 16), mean=(0.5,), std=(0.25,))
    assert torch.equal(t.read_batch(str(image)), t.read_batch([image]))  # before: "i: no such image file"


@pytest.mark.parametrize("resize", ["stretch", "center-crop"])
@pytest.mark.parametrize("channels", [1, 3])
def test_read_takes_a_pil_image_an_array_or_a_tensor_as_its_file(image, tmp_path, resize, channels, monkeypatch):
    """An image in memory (a camera frame, a notebook's PIL image) is prepared exactly as its file would be."""
    t = InputTransform(channels=channels, size=(16, 16), mean=(0.5,) * channels, std=(0.25,) * channels, resize=resize)
    want = t.read_batch([image])
    monkeypatch.setenv("HOME", str(image.parent))
    with Image.open(image) as pil:
        rgb = np.array(pil)
        for item in (pil, rgb, torch.from_numpy(rgb).permute(2, 0, 1), f"~/{image.name}"):
            assert torch.equal(t.read_batch([item]), want), type(item)
        assert tuple(pil.size) == (30, 20) and pil.mode == "RGB"  # the caller's image is left as it was
    assert torch.equal(t.read_batch(rgb), want)  # one array: a batch of one, not one image per row
    assert torch.equal(t.read_batch(p for p in [image]), want)  # an iterable of paths (Path.glob)
    assert torch.equal(t.read_batch(torch.from_numpy(rgb).permute(2, 0, 1)[None]), want)  # (B, C, H, W) uint8
    grey = rgb.mean(-1).round().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    assert torch.equal(t.read(grey), t.read(tmp_path / "grey.png"))
    for bad, says in ((rgb.astype(np.float32) / 255, r"a float32 array of shape \(20, 30, 3\); it takes the pixels "
                                                    r"of one image: uint8 \(H, W\) or \(H, W, C\) .*\(floats in 0..1"),
                      (torch.zeros(5, 8, 8, dtype=torch.uint8), r"a torch.uint8 tensor of shape \(5, 8, 8\)"),
                      (3, r"cannot read a 'int' object; it takes a file's path, a PIL image or the pixels"),
                      (tmp_path, rf"{tmp_path}: a folder, not an image file: pass its files")):
        with pytest.raises(ContractError, match=says):
            t.read(bad)


def test_a_path_from_home_is_expanded(weights, monkeypatch):
    monkeypatch.setenv("HOME", str(weights.parent))
    assert load(f"~/{weights.name}").weights == weights  # before: "no such file"
    shared = nestvit.save_pretrained(weights, weights.parent / "shared")
    assert nestvit.from_pretrained("~/shared").classes == ["cat", "dog", "eel"]
    assert shared.is_dir()


def test_a_loaded_model_shows_as_one_line(weights):
    assert repr(load(weights)) == (f"Loaded(nest_tiny_cifar, 2,923 parameters, 3 classes, input 1x16x16 stretch, "
                                   f"weights={str(weights)!r})")  # before: the module tree, 94 lines


def test_the_state_file_of_a_run_is_named_as_one(tmp_path, weights):
    (tmp_path / "config.yaml").write_text("kind: train\n")
    torch.save({"model": {}, "optimizer": {}, "step": 3}, tmp_path / "state.pt")
    with pytest.raises(WeightsError, match=r"state.pt is the run's training state .* give the run folder, "):
        load(tmp_path / "state.pt")  # before: "records no model (a timm or torch.save file, not written by nestvit)"
    with pytest.raises(WeightsError, match=r"state.pt is the run's training state"):  # before: "113 missing ..."
        nestvit.create_model("nest_tiny_cifar", pretrained=tmp_path / "state.pt", num_classes=5)


def test_a_file_without_an_input_transform_says_what_is_assumed(tmp_path, weights):
    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    with pytest.warns(UserWarning, match=r"records no input transform: images are stretched to 16x16 and scaled "
                                         r"to \[-1, 1\]"):
        loaded = nestvit.load(tmp_path / "plain.pth", model="nest_tiny_cifar", overrides=TINY)
    assert loaded.transform.mean == (0.5,) * loaded.transform.channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nestvit.load(weights)  # a run's file records its transform: nothing to say


def test_a_run_stopped_before_its_first_weights_says_to_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "state.pt").write_bytes(b"a checkpoint of steps inside the first epoch")
    err = one_line_error(capsys, "eval", str(run))
    assert "no weights yet (a run writes them at the end of each epoch" in err
    assert f"continue it with nestvit train --resume {run}" in err


def test_a_file_that_is_no_weights_file_says_so(tmp_path, image, capsys):
    """Before: a text file or an image given as the model was "records no model ... name its architecture",
    whose fix then failed with "cannot read weights"."""
    notes = tmp_path / "notes"
    notes.write_text("my notes")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path, what in ((notes, "neither safetensors nor a torch.save file"), (image, "neither"), (empty, "empty")):
        err = one_line_error(capsys, "predict", str(path), str(image))
        assert f"{path}: not a weights file ({what}" in err and "records no model" not in err


def test_weights_of_a_single_file_is_said_to_be_ignored(weights, image, capsys):
    assert main(["predict", str(weights), str(image), "--weights", "last"]) == 0
    assert f"note: --weights last chooses among a run folder's weights; {weights} is one file" in \
        capsys.readouterr().err


def test_eval_names_its_own_flag_for_a_split_that_is_not_there(weights, image, tmp_path, capsys):
    for c in ("cat", "dog", "eel"):
        (tmp_path / "photos" / c).mkdir(parents=True)
        (tmp_path / "photos" / c / "0.png").write_bytes(Path(image).read_bytes())
    err = one_line_error(capsys, "eval", str(weights), "--data", str(tmp_path / "photos"), "--split", "foo")
    assert "--split foo does not exist in" in err and "data.eval_split" not in err


def test_save_weights_refuses_a_contract_that_contradicts_the_model(tmp_path):
    # before: accepted; the file then labelled 2 outputs with 3 names, or fed 64-pixel images to a 16-pixel model
    model = nestvit.create_model("nest_tiny_cifar", **TINY)
    with pytest.raises(WeightsError, match="2 class names for a model of 3 classes"):
        save_weights(model, tmp_path / "w.safetensors", classes=["a", "b"])
    for transform, what in ((InputTransform(channels=1, size=32, mean=(0.5,), std=(0.5,)), "32x32 images"),
                            (InputTransform(channels=3, size=16, mean=(0.5,) * 3, std=(0.5,) * 3), "3-channel")):
        with pytest.raises(WeightsError, match=f"the input transform makes {what}.*the model takes"):
            save_weights(model, tmp_path / "w.safetensors", transform=transform)
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(WeightsError, match="is a folder: save_weights writes one file"):
        save_weights(model, tmp_path)
    with pytest.raises(WeightsError, match="is a folder, not a weights file"):
        nestvit.interop.load_weights(model, tmp_path)


@pytest.mark.parametrize("bad, message", [
    (dict(size=(16, 32), resize="center-crop"), "center-crop makes square images"),
    (dict(size=16, crop_pct=0), r"crop_pct 0 must be in \(0, 1\]"),
    (dict(size=16, crop_pct=2.0), "crop_pct 2.0 must be"),
    (dict(size=(16, 0)), "two positive ints"),
])
def test_the_transform_refuses_what_it_cannot_do(bad, message):
    # before: a 16x32 centre crop gave 16x16 images, crop_pct 0 a ZeroDivisionError, size=16 a TypeError later
    with pytest.raises(ContractError, match=message):
        InputTransform(channels=1, mean=(0.5,), std=(0.5,), **bad)
    assert InputTransform(channels=1, size=16, mean=(0.5,), std=(0.5,)).size == (16, 16)


def test_which_weights_of_a_weights_file_are_the_file_or_an_error(weights, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    best = run / "best.safetensors"
    best.write_bytes(weights.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load(best, "best").weights == best and load(best).weights == best
    with pytest.warns(UserWarning, match="which='last' chooses among a run folder's weights; .* is one file "
                                         r"\(the run's best weights\), used as given"):
        assert load(best, "last").weights == best  # before: the best weights, without a word
