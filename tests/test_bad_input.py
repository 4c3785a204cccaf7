"""Bad input gets one clear line naming the problem and the fix (or a warning), and loses nothing.

Issue #37 point 6: non-UTF-8 / empty / unparseable recipes, out-of-range counts, image folders with empty,
tiny or differing classes, a checkpoint of another model, resuming a finished run, leftovers of killed runs
(metrics records, temporary files), file modes, a full disk, a truncated JPEG read by DataLoader workers,
and the command line's user errors (exit 2, one line) versus internal errors (exit 1, a bug).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import nestvit
from nestvit import fileio
from nestvit.cli import main
from nestvit.errors import UserError
from nestvit.train import loop
from nestvit.train.checkpoint import load_state
from nestvit.train.config import ConfigError, load_config, read_recipe
from nestvit.train.metrics import MetricsLog, read_metrics
from tests.train.conftest import tiny_recipe

SRC = Path(nestvit.__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text("# tiny\n" + yaml.safe_dump(tiny_recipe(epochs=1)))
    return path


def one_line_error(capsys) -> str:
    """The command's stderr, which must be exactly one line (a ``nestvit CMD: error: ...``)."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    return err


def files_of(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------- recipes (1, 2, 3, 5)


def test_a_recipe_that_is_not_utf8_names_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# r\xe9glages\nepochs: 1\n".encode("latin-1"))
    assert main(["train", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert str(bad) in err and "not a UTF-8 text file" in err and "save the recipe as UTF-8" in err
    assert not (tmp_path / "run").exists()


def test_an_unparseable_set_value_names_the_key_and_the_value(recipe, tmp_path, capsys):
    assert main(["train", str(recipe), "--set", "model.overrides.depths=[[[", "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "--set model.overrides.depths" in err and "'[[['" in err and "write a list as [1, 2]" in err
    assert "<unicode string>" not in err and "line 1, column" not in err  # no YAML parser dump
    with pytest.raises(ConfigError, match=r"--set optim\.lr: cannot read the value '\{1:'"):
        load_config(tiny_recipe(), ["optim.lr={1:"])
    # a key that takes text keeps the text as it is
    assert load_config(tiny_recipe(), ["data.root=[a"]).data.root == "[a"


@pytest.mark.parametrize("key, value, valid", [
    ("data.limit_train", -3990, ">= 1 (images) or null"),
    ("data.limit_eval", 0, ">= 1 (images) or null"),
    ("data.img_size", 0, ">= 1"),
    ("data.workers", -1, ">= 0"),
    ("data.pad_to", -2, "positive image size or null"),
    ("epochs", 0, ">= 1"),
    ("global_batch", -32, ">= 1"),
    ("eval_batch", 0, ">= 1"),
    ("checkpoint_every", -1, ">= 0"),
    ("schedule.step_every", 0, ">= 1"),
    ("seed", -1, "in 0.."),
])
def test_counts_out_of_range_are_refused_with_the_valid_range(key, value, valid):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be .*{re.escape(valid)}.*got {value}$"):
        load_config(tiny_recipe(), [f"{key}={value}"])


def test_a_negative_limit_is_refused_before_anything_is_written(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--set", "data.limit_train=-3990", "--out", str(run)]) == 2
    assert "data.limit_train must be >= 1 (images) or null (all), got -3990" in one_line_error(capsys)
    assert not run.exists()


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_recipe_is_refused(tmp_path, capsys, text):
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    assert main(["train", str(empty), "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert str(empty) in err and "the recipe is empty" in err and "`{}`" in err
    assert not (tmp_path / "run").exists()


def test_an_explicit_empty_mapping_still_means_every_default(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text("# every default\n{}\n")
    assert read_recipe(path) == ({}, "defaults")


# ------------------------------------------------------------------------------------------- image folders (4, 14)


def image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 12) -> Path:
    """``root/<split>/<class>/<i>.jpg`` with ``counts[split][class]`` noise images each."""
    rng = np.random.default_rng(0)
    for split, classes in counts.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    return root


def folder_args(root: Path, *extra: str) -> list[str]:
    sets = ["data.name=imagefolder", f"data.root={root}", "data.eval_split=val", "data.img_size=8",
            "data.workers=0", "data.limit_train=null", "data.limit_eval=null", "global_batch=4", *extra]
    return [a for s in sets for a in ("--set", s)]


def test_an_image_folder_class_without_images_is_an_error_naming_it(recipe, tmp_path, capsys):
    data = image_folder(tmp_path / "data", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}})
    (data / "train" / "emu").mkdir()  # a class nothing could teach the model: predict used to rank it first
    (data / "train" / "emu" / "notes.txt").write_text("not an image")
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), *folder_args(data)]) == 2
    err = one_line_error(capsys)
    assert "class directory emu of" in err and "has no images" in err and "add images or remove the directory" in err
    assert not (run / "state.pt").exists()


def test_image_folder_classes_that_are_tiny_or_differ_between_splits_are_warned_about(tmp_path):
    from nestvit.train.config import DataSection
    from nestvit.train.inputs import load_split

    data = image_folder(tmp_path / "data", {"train": {"cat": 6, "dog": 3, "emu": 5},
                                            "val": {"cat": 2, "emu": 0, "fox": 2}})
    section = DataSection(name="imagefolder", root=str(data), eval_split="val", img_size=8, workers=0)
    train = load_split(section, "train", torch.device("cpu"))
    assert len(train.notes) == 1 and "fewer than 5 images: dog (3)" in train.notes[0]
    assert "cat" not in train.notes[0] and "emu" not in train.notes[0]
    val = load_split(section, "val", torch.device("cpu"), classes=train.classes)
    assert len(val) == 2 and len(val.notes) == 1  # the fox images are skipped, and said to be
    note = val.notes[0]
    assert note.startswith("warning: ") and "classes differ from the training split's" in note
    assert "no images of the training class(es) dog, emu" in note and "fox not in the training split" in note
    same = load_split(section, "train", torch.device("cpu"), classes=train.classes)  # the same classes: quiet
    assert same.notes == []


def test_the_warnings_are_printed_when_the_run_starts(recipe, tmp_path, capsys):
    data = image_folder(tmp_path / "data", {"train": {"cat": 6, "dog": 2}, "val": {"cat": 2, "fox": 2}})
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), *folder_args(data)]) == 0
    out = capsys.readouterr().out
    assert "fewer than 5 images: dog (2)" in out and "fox not in the training split" in out


def test_a_bad_file_of_the_evaluation_split_keeps_the_trained_epoch(recipe, tmp_path, capsys):
    # before: found after the first epoch, it cost that epoch (no checkpoint to resume from)
    data = image_folder(tmp_path / "data", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}}, size=64)
    bad = data / "val" / "dog" / "1.jpg"
    good = bad.read_bytes()
    bad.write_bytes(good[:300])
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), *folder_args(data)]) == 2
    err = one_line_error(capsys)
    assert f"{bad}: cannot decode image" in err
    assert "The 3 steps trained so far are saved: replace the file, then" in err
    assert f"nestvit train --resume {run}" in err and (run / "state.pt").exists()
    bad.write_bytes(good)
    assert main(["train", "--resume", str(run)]) == 0
    assert "val top-1" in capsys.readouterr().out


def test_a_resume_on_changed_files_says_the_test_images_moved(recipe, tmp_path, capsys):
    # removing bad files (as the error above asks) shifts a hold-out drawn from the folder: the resume says so
    data = image_folder(tmp_path / "data", {"train": {"cat": 10, "dog": 10}})
    run = tmp_path / "run"
    sets = folder_args(data, "data.eval_split=null")
    assert main(["train", str(recipe), "--out", str(run), "--epochs", "1", *sets]) == 0
    from nestvit.train.checkpoint import load_state

    held = {k: v["images"] for k, v in load_state(run)["data_files"].items()}
    import hashlib

    from nestvit.data.folders import HOLDOUT_SALT

    dogs = sorted((data / "train" / "dog").iterdir(),  # the dog the hold-out takes first (its ranking by hash)
                  key=lambda f: hashlib.sha256(HOLDOUT_SALT + str(f.relative_to(data / "train")).encode()).digest())
    dogs[0].unlink()  # a bad file removed: the next-ranked training image moves into the hold-out
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"note: the data changed since the run was saved: train split {held['train']} -> " in out
    assert f"eval split {held['eval']} -> {held['eval']} images (other files)" in out
    assert "Its test numbers before and after are not on the same images (a hold-out drawn from the folder" in out
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    assert "the data changed" not in capsys.readouterr().out  # nothing changed since
    data.rename(tmp_path / "moved")  # the documented move: the same files, the same hold-out
    assert main(["train", "--resume", str(run), "--epochs", "4", "--set", f"data.root={tmp_path / 'moved'}"]) == 0
    assert "the data changed" not in capsys.readouterr().out  # before: "other files", from their absolute paths


@pytest.mark.parametrize("workers", [0, 1])
def test_a_truncated_jpeg_is_one_line_naming_the_file(recipe, tmp_path, capsys, workers):
    data = image_folder(tmp_path / "data", {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 2}}, size=64)
    bad = [data / "train" / "dog" / "3.jpg", data / "train" / "cat" / "5.jpg"]
    for b in bad:
        b.write_bytes(b.read_bytes()[:300])
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), *folder_args(data, f"data.workers={workers}")]) == 2
    err = one_line_error(capsys)
    assert ": cannot decode image" in err and "replace the file or remove it" in err
    assert "DataLoader worker" not in err and "Original Traceback" not in err
    # every bad file at once, not one per run (a scan of the split's files when the first is met)
    assert (f"2 files of imagefolder:train and imagefolder:val are unreadable (all 16 checked): {bad[1]}, {bad[0]}"
            in err)
    saved = (run / "state.pt").exists()  # the steps before the bad batch are kept
    assert saved == ("steps trained so far are saved" in err)
    assert saved or "Replace the files, then run the command again (nothing was trained yet)" in err


# ------------------------------------------------------------------------------------------- resuming (6, 7, 8, 9)


def test_resuming_with_a_config_of_another_model_is_one_line(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--set", "model.overrides.embed_dims=24"]) == 2
    err = one_line_error(capsys)
    assert len(err) < 600 and "was trained with other data or another model: model.overrides.embed_dims" in err
    assert "-> 24" in err and "fine-tune this one: nestvit train finetune" in err
    # a config.yaml of another recipe (a vit) put in the run directory
    other = yaml.safe_load((run / "config.yaml").read_text())
    other["model"] = {"name": "vit_tiny_patch4_32",
                      "overrides": {"embed_dim": 16, "depth": 1, "num_heads": 2}}
    (run / "config.yaml").write_text(yaml.safe_dump(other))
    before["config.yaml"] = files_of(run)["config.yaml"]
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = one_line_error(capsys)
    assert "model.name 'nest_tiny_cifar' -> 'vit_tiny_patch4_32'" in err
    assert files_of(run) == before  # nothing written


def test_resuming_a_finished_run_says_so_and_changes_nothing(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    top1 = json.loads((run / "summary.json").read_text())["test_top1"]
    assert isinstance(top1, float)
    before = files_of(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "is already finished: 1/1 epochs, 4 steps" in out and "nothing changed" in out and "--epochs N" in out
    assert files_of(run) == before  # summary.json keeps its test_top1, not null
    assert json.loads((run / "summary.json").read_text())["test_top1"] == top1


def test_resuming_a_run_killed_in_its_final_plots_redoes_them(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    epochs_before = [r for r in read_metrics(run) if r["kind"] == "epoch"]
    weights = (run / "last.safetensors").read_bytes()
    for name in ("summary.json", "confusion.png", "confusion.json", "loss.png"):  # killed while plotting
        (run / name).unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "redoing them" in out and "resuming at epoch" not in out
    redone = json.loads((run / "summary.json").read_text())
    assert redone["steps"] == summary["steps"] == 4 and redone["test_top1"] == pytest.approx(summary["test_top1"])
    for name in ("confusion.png", "confusion.json", "loss.png"):
        assert (run / name).is_file(), name
    assert [r for r in read_metrics(run) if r["kind"] == "epoch"] == epochs_before  # no training, no new record
    assert (run / "last.safetensors").read_bytes() == weights
    assert main(["train", "--resume", str(run)]) == 0  # and now it is finished
    assert "is already finished" in capsys.readouterr().out


def test_a_new_run_drops_the_records_of_a_run_killed_before_its_first_checkpoint(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = [{"kind": "step", "epoch": 1, "step": s, "train_loss": 9.0} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale) + '{"kind": "st')  # torn
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    assert "dropped 3 record(s)" in capsys.readouterr().out
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]  # once each
    assert all(r.get("train_loss") != 9.0 for r in records)
    assert len([r for r in records if r["kind"] == "epoch"]) == 1


def test_remove_stale_temporaries_takes_only_atomic_path_leftovers(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = [tmp_path / ".state.pt.k3j_9xq2.tmp", tmp_path / ".last.safetensors.abcdefgh.tmp"]
    keep = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / ".a.short.tmp", tmp_path / "sub" /
            ".state.pt.k3j_9xq2.tmp", tmp_path / "state.pt"]
    for p in stale + keep:
        p.write_text("x")
    assert sorted(fileio.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert fileio.remove_stale_temporaries(tmp_path / "missing") == []


def test_temporaries_of_a_killed_run_are_removed_when_it_starts_or_resumes(recipe, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    orphan = run / ".state.pt.ab12cd34.tmp"
    orphan.write_bytes(b"half a checkpoint")
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    assert not orphan.exists() and "removed 1 temporary file(s)" in capsys.readouterr().out
    orphans = [run / ".last.safetensors.zz99yy88.tmp", run / ".metrics.jsonl.q1w2e3r4.tmp"]
    for p in orphans:
        p.write_bytes(b"x")
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert not any(p.exists() for p in orphans) and "removed 2 temporary file(s)" in capsys.readouterr().out
    assert not list(run.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------- files (10, 13)


def test_weights_files_get_the_umask_mode(tmp_path, monkeypatch):
    from nestvit.interop import save_weights

    monkeypatch.setattr(fileio, "_UMASK", 0o022)
    old = os.umask(0o022)
    try:
        path = save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not the 0600 of safetensors' own temporary file


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_writing_text_keeps_the_old_file(tmp_path, monkeypatch):
    path = fileio.atomic_write_text(tmp_path / "summary.json", "old")

    def half_then_full(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:2])
        enospc()

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(fileio.DiskFullError) as info:
        fileio.atomic_write_text(path, "new text")
    message = str(info.value)
    assert "\n" not in message and "the disk is full" in message and "the previous summary.json is intact" in message
    assert isinstance(info.value, UserError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    # how safetensors reports it (its own error type, the OS error in words)
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
              'device" })'),
])
def test_a_full_disk_while_saving_weights_keeps_the_old_file(tmp_path, monkeypatch, failure):
    import safetensors.torch

    from nestvit.interop import save_weights

    model = torch.nn.Linear(2, 2)
    path = save_weights(model, tmp_path / "last.safetensors")
    old = path.read_bytes()

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(old[:10])
        raise failure

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)
    with pytest.raises(fileio.DiskFullError, match=r"last\.safetensors: the disk is full .*the previous "
                                                   r"last\.safetensors is intact"):
        save_weights(model, path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]


def test_a_full_disk_while_saving_the_training_state_is_one_line(recipe, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()

    def half_then_full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK half")
        enospc()

    monkeypatch.setattr(torch, "save", half_then_full)
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 2
    err = one_line_error(capsys)
    assert f"{run / 'state.pt'}: the disk is full" in err and "the previous state.pt is intact" in err
    assert "nestvit train --resume RUN_DIR" in err
    monkeypatch.undo()
    assert load_state(run)["epoch"] == 1 and not list(run.glob(".*.tmp"))
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # with space again, it goes on
    assert load_state(run)["epoch"] == 2


def test_a_full_disk_while_logging_a_record_is_one_line(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"kind": "step", "step": 1})

    class Full:
        def write(self, text):
            enospc()

    log.file.close()
    log.file = Full()
    with pytest.raises(fileio.DiskFullError, match="metrics.jsonl: the disk is full .*records written before are "
                                                   "intact"):
        log.write({"kind": "step", "step": 2})
    assert read_metrics(tmp_path) == [{"kind": "step", "step": 1}]


# ------------------------------------------------------------------------------------------- messages (11, 12)


def test_a_non_finite_loss_names_state_pt_only_when_it_exists(tmp_path, monkeypatch):
    calls = {"n": 0, "at": 3}
    real = loop.classification_loss

    def goes_nan(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == calls["at"] else loss

    monkeypatch.setattr(loop, "classification_loss", goes_nan)
    cfg = load_config(tiny_recipe(epochs=2))
    with pytest.raises(loop.NonFiniteLossError) as info:  # in the first epoch: no checkpoint yet
        loop.train(cfg, tmp_path / "new")
    assert "No checkpoint was written yet" in str(info.value) and "state.pt" not in str(info.value)
    calls.update(n=0, at=6)  # in the second epoch, after the first epoch's checkpoint
    with pytest.raises(loop.NonFiniteLossError) as info:
        loop.train(cfg, tmp_path / "old")
    assert f"The last good checkpoint is {tmp_path / 'old' / 'state.pt'}" in str(info.value)


def test_no_message_names_a_download_flag_that_does_not_exist(recipe, tmp_path, capsys):
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"--download\b", line) and p.name != "pretrained.py"]
    assert offenders == []  # data sets download with --set data.download=true; only `nestvit pretrained` has the flag
    with pytest.raises(SystemExit):
        main(["pretrained", "--help"])
    assert "--download" in capsys.readouterr().out
    assert main(["train", str(recipe), "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'none'}",
                 "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "not found" in err and "--set data.download=true" in err


# ------------------------------------------------------------------------------------------- the command line (15)


@pytest.mark.parametrize("error", [UserError("the file x is broken; fix it"), ValueError("bad value; use 3")])
def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, error):
    def fails(args):
        raise error

    monkeypatch.setattr("nestvit.train.cli_train.run", fails)
    assert main(["train", "x.yaml"]) == 2
    assert one_line_error(capsys) == f"nestvit train: error: {error}\n"


def test_an_internal_error_is_called_a_bug_exit_1_and_debug_reraises(monkeypatch, capsys):
    def fails(args):
        raise KeyError("step_in_epoch")

    monkeypatch.setattr("nestvit.train.cli_train.run", fails)
    assert main(["train", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "internal error" in err and "bug in nestvit" in err and "--debug" in err and "KeyError" in err
    assert "Traceback" not in err
    for argv in (["--debug", "train", "x.yaml"], ["train", "x.yaml", "--debug"]):
        with pytest.raises(KeyError, match="step_in_epoch"):
            main(argv)
    monkeypatch.setattr("nestvit.train.cli_train.run", lambda args: (_ for _ in ()).throw(ValueError("v")))
    with pytest.raises(ValueError, match="v"):
        main(["--debug", "train", "x.yaml"])


def test_an_unknown_model_option_is_a_user_error(recipe, tmp_path, capsys):
    # registry.build_config raises TypeError for it: the trainer says it is the config's mistake
    assert main(["train", str(recipe), "--set", "model.overrides.depthz=2", "--out", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert "model.overrides do not fit nest_tiny_cifar" in err and "'depthz'" in err and "valid options" in err


def test_out_of_memory_is_a_user_error_with_the_fix(monkeypatch, capsys):
    import torch

    from nestvit import cli

    def boom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("nestvit.cli_models.run", boom)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "lower the batch size" in err


def test_an_unknown_model_option_is_one_line_for_every_command(tmp_path, capsys):
    from nestvit import cli

    assert cli.main(["bench", "nest_tiny_cifar", "--set", "no_such_option=1", "--no-data", "--no-memory"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("#")]  # bench's header
    assert len(errors) == 1 and "unknown option(s) ['no_such_option']" in errors[0]
    assert cli.main(["train", "mnist5k_nest", "--set", "model.overrides.depths=abc", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "depths: expected int or a list of int, got 'abc'" in err


@pytest.mark.parametrize("option, message", [  # before: ZeroDivisionError / conv / bernoulli errors, exit 1
    ("block_size=0", "block_size=0 for NestConfig: must be at least 1"),
    ("num_heads=0", "num_heads=(0, 0, 0) for NestConfig: must be at least 1"),
    ("mlp_ratio=-1", "mlp_ratio=-1.0 for NestConfig: must be positive"),
    ("drop_path_rate=2", "drop_path_rate=2.0 for NestConfig: a probability, in [0, 1)"),
    ("embed_dims=65", "width 65 (level 0) is not divisible by 2 heads; choose widths that are multiples"),
    ("num_classes=3", "model.overrides.num_classes=3, but the data give 10 classes (the head follows the data)"),
    ("img_size=48", "model.overrides.img_size=48x48, but the data give 32x32 images (data.img_size; an in-memory"),
    ("patch_size=3", "image height 32 is not divisible by 3; choose an image size that is a multiple of 3 (a recipe "
                     "sets the images' size with data.img_size, an in-memory set's with data.pad_to"),
])
def test_an_impossible_model_option_is_one_line_before_training(option, message, tmp_path, capsys):
    from nestvit import cli

    assert cli.main(["train", "mnist5k_nest", "--set", f"model.overrides.{option}", "--set", "progress=false",
                     "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "internal error" not in err


def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    """Before: train gave "[Errno 20] Not a directory" (or a temporary file's name) after reading the data, bench
    after the whole benchmark."""
    from nestvit import cli

    (tmp_path / "afile").write_text("mine")
    assert cli.main(["train", "mnist5k_nest", "--out", str(tmp_path / "afile" / "run")]) == 2
    assert f"the run folder {tmp_path / 'afile' / 'run'}: cannot create the folder ({tmp_path / 'afile'} is a " \
           "file)" in capsys.readouterr().err
    assert cli.main(["bench", "nest_tiny_cifar", "--json", str(tmp_path)]) == 2
    assert "--json " + str(tmp_path) + ": is a folder; give a file name such as" in capsys.readouterr().err
    assert cli.main(["bench", "nest_tiny_cifar", "--json", str(tmp_path / "afile" / "b.json")]) == 2
    assert "--json " + str(tmp_path / "afile") + ": exists and is not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_run_into_a_folder_of_the_users_files_says_so(tmp_path, capsys):
    from nestvit.train import train
    from nestvit.train.config import load_config
    from tests.train.conftest import tiny_recipe

    out = tmp_path / "digits"
    out.mkdir()
    (out / "0.png").write_bytes(b"mine")
    train(load_config(tiny_recipe(epochs=1)), out)
    assert f"note: {out} already holds 1 file(s) or folder(s) of no run (0.png)" in capsys.readouterr().out
    assert (out / "0.png").read_bytes() == b"mine"


def test_python_callers_bad_arguments_are_one_clear_error(tmp_path):
    """Before: AttributeError ('NoneType' has no attribute 'partition'), torch.stack's "expects a non-empty
    TensorList", a ZeroDivisionError when an item was read."""
    from nestvit.contract import ContractError, InputTransform
    from nestvit.data import DatasetError, load_images

    with pytest.raises(nestvit.registry.UnknownModelError, match="takes a model's name"):
        nestvit.create_model(None)
    with pytest.raises(ContractError, match="read_batch: no images given"):
        InputTransform(channels=1, size=(8, 8), mean=(0.5,), std=(0.5,)).read_batch([])
    for kwargs in ({"holdout": 2}, {"channels": 0}, {"size": 0}):
        with pytest.raises(DatasetError, match="load_images: holdout must be in"):
            load_images(tmp_path, "train", **kwargs)
    with pytest.raises(DatasetError, match="split must be a split's name"):
        load_images(tmp_path, None)


def test_a_weights_file_without_its_run_scores_a_folder_whole_with_a_note_or_its_holdout(recipe, tmp_path, capsys):
    # before: a copied file scored every image, training images too, without a word; --split holdout was refused
    data = image_folder(tmp_path / "data", {"train": {"cat": 10, "dog": 10}})
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), *folder_args(data, "data.eval_split=null")]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--out", str(tmp_path / "own")]) == 0
    own = json.loads((tmp_path / "own" / "eval.json").read_text())
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes((run / "best.safetensors").read_bytes())
    assert main(["eval", str(alone), "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert "(20 images)" in captured.out and f"note: all of {data} is scored: {alone} alone does not say" \
        in captured.err
    assert main(["eval", str(alone), "--data", str(data), "--split", "holdout", "--out", str(tmp_path / "h")]) == 0
    held = json.loads((tmp_path / "h" / "eval.json").read_text())
    assert (held["count"], held["top1"]) == (own["count"], own["top1"]) and own["count"] < 20
