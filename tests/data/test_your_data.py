"""Your images as they are: class folders with a fixed hold-out, split folders, a CSV of path,label, a class
list, tar shards (WebDataset), the defaults the data gives (eval split, image size, workers), one error per bad
input, and train -> eval -> predict end to end on a folder the test writes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import nestvit
from nestvit.cli import main
from nestvit.data.datasets import DatasetError
from nestvit.data.folders import HOLDOUT, find_layout, holdout_count, holdout_mask, load_images, read_labels_csv
from nestvit.train.config import ConfigError, DataSection, ModelSection, load_config
from nestvit.train.inputs import TrainBatches, default_workers, eval_batches, load_split, resolve_data
from tests.train.conftest import TINY_MODEL, tiny_recipe

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def write_image(path: Path, value: int, size: tuple[int, int] = (10, 12)) -> Path:
    """A flat colour image (``value`` in every pixel, so the decoded image says which file it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)
    return path


def class_folders(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    """``root/<class>/<i>.png``, ``counts[class]`` images each, every image a different flat grey."""
    value = start
    for cls, n in counts.items():
        for i in range(n):
            write_image(root / cls / f"{i}.png", value)
            value += 1
    return root


def section(root: Path, **kw) -> DataSection:
    return DataSection(name=kw.pop("name", "imagefolder"), root=str(root), img_size=kw.pop("img_size", 8),
                       workers=0, **kw)


def values(split) -> list[int]:
    """The grey value of each image of a split (which file it is), in order."""
    return [int(split.folder[i][0][0, 0, 0]) for i in range(len(split))]


# ------------------------------------------------------------------------------------------- class folders + hold-out


def test_class_folders_get_a_fixed_per_class_holdout(tmp_path):
    root = class_folders(tmp_path / "pets", {"cat": 10, "dog": 20, "emu": 3})
    cfg = resolve_data(section(root))
    assert cfg.eval_split == HOLDOUT  # no val or test: the hold-out
    train = load_split(cfg, "train", CPU)
    held = load_split(cfg, HOLDOUT, CPU, classes=train.classes)
    assert train.classes == held.classes == ["cat", "dog", "emu"]
    assert held.labels.bincount().tolist() == [1, 2, 1] and len(train) == 33 - 4  # n / 10 rounded, at least one
    assert not set(values(train)) & set(values(held)) and len(set(values(train) + values(held))) == 33
    assert "29 train / 4 holdout images" in train.about and "data.holdout=0.1" in train.about
    assert held.notes == [] and "emu (2)" in train.notes[0]  # a class of 2 training images is warned about
    # the same files in every run, whatever order the folder lists them in or the files were written
    again = class_folders(tmp_path / "again", {"emu": 3, "dog": 20, "cat": 10}, start=0)
    for cls, n in {"cat": 10, "dog": 20, "emu": 3}.items():
        for i in range(n):
            (again / cls / f"{i}.png").write_bytes((root / cls / f"{i}.png").read_bytes())
    held_again = load_split(section(again), HOLDOUT, CPU, classes=train.classes)
    assert [p.relative_to(again) for p, _ in held_again.folder.samples] == \
        [p.relative_to(root) for p, _ in held.folder.samples]
    # a share of 0.25: n / 4 of each class, halves rounded up
    quarter = load_split(section(root, holdout=0.25), HOLDOUT, CPU, classes=train.classes)
    assert quarter.labels.bincount().tolist() == [3, 5, 1]


def test_every_usual_image_extension_is_read(tmp_path):
    from nestvit.data.datasets import class_images, decode_image

    folder = tmp_path
    for i, (name, fmt) in enumerate([("a.JPG", "JPEG"), ("b.jfif", "JPEG"), ("c.jpe", "JPEG"), ("d.avif", "AVIF"),
                                     ("e.TIF", "TIFF"), ("f.pnm", "PPM"), ("notes.txt", None)]):
        if fmt is None:
            (folder / name).write_text("not an image")
        else:
            Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / name, format=fmt)
    found = class_images(folder)
    assert [p.name for p in found] == ["a.JPG", "b.jfif", "c.jpe", "d.avif", "e.TIF", "f.pnm"]
    assert all(decode_image(p, size=8).shape == (3, 8, 8) for p in found)


def test_images_the_layout_leaves_out_are_warned_about(tmp_path):
    root = class_folders(tmp_path / "pets", {"cat": 5, "dog": 5})
    write_image(root / "unsorted.png", 1)
    notes = load_split(section(root), "train", CPU).notes
    assert any("pets: 1 image file(s) lie directly in it (unsorted.png), in no class folder" in n for n in notes)
    split = class_folders(tmp_path / "split" / "train", {"cat": 5, "dog": 5}).parent
    write_image(split / "val" / "0.png", 1)  # a val folder of loose images: not a split
    notes = load_split(section(split), "train", CPU).notes
    assert any("split/val holds images but no class folders, so it is not a split" in n for n in notes)
    flat = class_folders(tmp_path / "flat", {"cat": 5, "dog": 5, "val": 5})  # class folders: val is a class
    notes = load_split(section(flat), "train", CPU).notes
    assert any("val/ is read as a class named 'val'; if it is a split" in n for n in notes)
    import unicodedata

    twins = class_folders(tmp_path / "twins", {"café": 2, unicodedata.normalize("NFD", "café"): 2, "tea": 2})
    with pytest.raises(DatasetError, match="differ only in their Unicode form .* merge them into one folder"):
        load_split(section(twins), "train", CPU)


def test_holdout_rule():
    assert [holdout_count(n, 0.1) for n in (0, 1, 2, 5, 10, 14, 15, 100)] == [0, 0, 1, 1, 1, 1, 2, 10]
    assert holdout_count(3, 0.9) == 2 and holdout_count(50, 0.0) == 0  # never a whole class; 0 = none
    keys = [f"a/{i}.jpg" for i in range(200)]
    mask = holdout_mask(keys, [0] * 200, 0.1)
    assert sum(mask) == 20 and mask == holdout_mask(keys, [0] * 200, 0.1)
    assert holdout_mask(keys[::-1], [0] * 200, 0.1) == mask[::-1]  # by path, not by position
    more = holdout_mask([*keys, "a/new.jpg"], [0] * 201, 0.1)  # one image more moves at most one other
    assert sum(a != b for a, b in zip(mask, more)) <= 1


def test_the_hold_out_is_a_share_of_the_train_split_when_there_is_no_val_or_test(tmp_path):
    root = tmp_path / "data"
    class_folders(root / "train", {"a": 10, "b": 10})
    cfg = resolve_data(section(root))
    assert cfg.eval_split == HOLDOUT
    train = load_split(cfg, "train", CPU)
    held = load_split(cfg, HOLDOUT, CPU, classes=train.classes)
    assert (len(train), len(held)) == (18, 2) and "18 train / 2 holdout" in train.about
    # with a val split, it is evaluated and the train split keeps all its images
    class_folders(root / "val", {"a": 2, "b": 2}, start=100)
    cfg = resolve_data(section(root))
    assert cfg.eval_split == "val" and len(load_split(cfg, "train", CPU)) == 20
    assert values(load_split(cfg, HOLDOUT, CPU, classes=["a", "b"])) == values(held)  # asked for: still a share
    class_folders(root / "test", {"a": 1, "b": 1}, start=200)
    assert resolve_data(section(root)).eval_split == "val"  # val first, then test
    (root / "val").rename(root / "later")
    assert resolve_data(section(root)).eval_split == "test"


@pytest.mark.parametrize("train,val", [("Train", "Val"), ("training", "testing"), ("TRAIN", "validation"),
                                       ("train", "valid")])
def test_split_folders_are_found_in_any_case_and_by_their_usual_names(tmp_path, train, val):
    # before, Train/ and Val/ were two "classes": a model that learnt which folder an image came from
    root = tmp_path / "data"
    class_folders(root / train, {"a": 3, "b": 3})
    class_folders(root / val, {"a": 1, "b": 1}, start=100)
    if val == "valid":  # two of the val group: the first in its order (valid, then dev)
        class_folders(root / "dev", {"a": 1, "b": 1}, start=200)
    assert find_layout(root).kind == "splits"
    cfg = resolve_data(section(root))
    assert cfg.eval_split == val
    train_split = load_split(cfg, "train", CPU)
    assert train_split.classes == ["a", "b"] and len(train_split) == 6
    assert values(load_split(cfg, None, CPU, classes=train_split.classes)) == [100, 101]


def test_a_split_that_does_not_exist_is_one_error_listing_those_that_do(tmp_path):
    root = tmp_path / "data"
    class_folders(root / "train", {"a": 3, "b": 3})
    class_folders(root / "val", {"a": 1, "b": 1})
    with pytest.raises(DatasetError, match=r"data.train_split='fit' does not exist in .*; it has: train, val$"):
        load_split(section(root, train_split="fit"), "fit", CPU)
    flat = class_folders(tmp_path / "flat", {"a": 3, "b": 3})
    with pytest.raises(DatasetError, match="it has: train, holdout .class folders root/<class>/. has no split"):
        load_split(section(flat, eval_split="val"), "val", CPU, classes=["a", "b"])
    with pytest.raises(DatasetError, match="no val or test split to evaluate on, and data.holdout is 0"):
        resolve_data(section(flat, holdout=0.0))
    with pytest.raises(ConfigError, match=r"data.holdout must be in \[0, 1\)"):
        load_config(None, ["data.holdout=1"])
    with pytest.raises(ConfigError, match=r"data.channels must be 1 \(greyscale\), 3 \(RGB\) or null"):
        load_config(None, ["data.channels=2"])


def test_layout_errors_are_one_line_each(tmp_path):
    cases = {
        tmp_path / "missing": r"does not exist \(moved\? a run reads its data from where it was: nestvit train "
                               r"--resume RUN --set data.root=NEW_PATH, nestvit eval RUN --root NEW_PATH\); data.root "
                               "must be root/<class>/",
        write_image(tmp_path / "one.png", 1): "is a file but not a .csv",
        tmp_path / "empty": "has no class folders; expected",
        tmp_path / "loose": "it holds images directly: put each class's images in a folder of its own",
    }
    (tmp_path / "empty").mkdir()
    write_image(tmp_path / "loose" / "x.png", 1)
    for root, message in cases.items():
        with pytest.raises(DatasetError, match=message):
            find_layout(root)
    with pytest.raises(DatasetError, match="data.root is required"):
        find_layout(None)
    assert find_layout(class_folders(tmp_path / "test_like", {"test": 2, "dog": 2})).kind == "classes"


def test_empty_and_tiny_classes(tmp_path):
    root = class_folders(tmp_path / "pets", {"cat": 6, "dog": 1})
    (root / "emu").mkdir()
    with pytest.raises(DatasetError, match="class directory emu of .* has no images"):
        load_split(section(root), "train", CPU)
    (root / "emu").rmdir()
    train = load_split(section(root), "train", CPU)
    held = load_split(section(root), HOLDOUT, CPU, classes=train.classes)
    assert "dog (1)" in train.notes[0]  # a single image: too few, and none held out
    assert len(held.notes) == 1 and "no images of the training class(es) dog" in held.notes[0]
    assert "a class needs 2 or more images to have one held out" in held.notes[0]
    (root / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    assert load_split(section(root), "train", CPU).classes == ["cat", "dog"]


# ------------------------------------------------------------------------------------------- CSV and class list


def test_a_csv_of_path_and_label(tmp_path):
    imgs = tmp_path / "imgs"
    rows = ["path,label"] + [f"imgs/{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(20)]
    for i in range(20):
        write_image(imgs / f"{i}.png", 10 * i)
    elsewhere = write_image(tmp_path / "other" / "abs.png", 250)
    rows.append(f"{elsewhere},cat")  # an absolute path
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n\n")
    cfg = resolve_data(section(tmp_path / "labels.csv"))
    assert cfg.eval_split == HOLDOUT
    train = load_split(cfg, "train", CPU)
    held = load_split(cfg, HOLDOUT, CPU, classes=train.classes)
    assert train.classes == ["cat", "dog"] and (len(train), len(held)) == (19, 2)
    assert "a CSV of path,label" in train.about and not set(values(train)) & set(values(held))
    # the absolute path's hold-out draw depends on the temporary folder's name: look for it in both splits
    split = train if elsewhere in [p for p, _ in train.folder.samples] else held
    image, label = split.folder[[p for p, _ in split.folder.samples].index(elsewhere)]
    assert int(image[0, 0, 0]) == 250 and train.classes[label] == "cat"
    # a class list fixes the order (the label numbering)
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    ordered = load_split(section(tmp_path / "labels.csv", classes=str(tmp_path / "classes.txt")), "train", CPU)
    assert ordered.classes == ["dog", "cat"] and values(ordered) == values(train)
    assert (ordered.labels == 1 - train.labels).all()
    # no header is fine too
    (tmp_path / "bare.csv").write_text("imgs/0.png,dog\nimgs/1.png,cat\nimgs/2.png,dog\nimgs/3.png,cat\n")
    assert len(load_split(section(tmp_path / "bare.csv", holdout=0.0, eval_split="train"), "train", CPU)) == 4
    # written on Windows: backslash separators
    (tmp_path / "windows.csv").write_text("imgs\\0.png,dog\r\nimgs\\1.png,cat\r\n")
    assert [w for w, *_ in read_labels_csv(tmp_path / "windows.csv")] == ["imgs/0.png", "imgs/1.png"]
    (tmp_path / "both.csv").write_text("imgs\\0.png,dog\nimgs/0.png,dog\n")
    with pytest.raises(DatasetError, match="line 2: imgs/0.png is listed twice"):
        read_labels_csv(tmp_path / "both.csv")
    (tmp_path / "drive.csv").write_text("C:\\photos\\0.png,dog\nimgs/1.png,cat\n")
    with pytest.raises(DatasetError, match="Windows paths with a drive letter: write them relative to the CSV's"):
        read_labels_csv(tmp_path / "drive.csv")
    (tmp_path / "header.csv").write_text("filename,class\nimgs/0.png,dog\nimgs/gone.png,cat\n")
    with pytest.raises(DatasetError, match="2 listed file.s. do not exist: .*its first line looks like a header"):
        read_labels_csv(tmp_path / "header.csv")


def test_a_csv_with_a_split_column(tmp_path):
    rows = ["path,label,split"]
    for i in range(12):
        write_image(tmp_path / "imgs" / f"{i}.png", 10 * i)
        rows.append(f"imgs/{i}.png,{'cat' if i % 2 else 'dog'},{['train', 'train', 'val', 'test'][i % 4]}")
    write_image(tmp_path / "imgs" / "emu.png", 200)
    rows.append("imgs/emu.png,emu,val")  # a class the training split does not have: skipped, listed
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    layout = find_layout(tmp_path / "labels.csv")
    assert (layout.kind, layout.splits, layout.split_folders) == ("csv-splits", ("test", "train", "val"), True)
    cfg = resolve_data(section(tmp_path / "labels.csv"))
    assert cfg.eval_split == "val"  # as with split folders: val, then test; no hold-out taken from train
    train = load_split(cfg, "train", CPU)
    val = load_split(cfg, "val", CPU, classes=train.classes)
    test = load_split(cfg, "test", CPU, classes=train.classes)
    assert train.classes == ["cat", "dog"] and (len(train), len(val), len(test)) == (6, 3, 3)
    assert values(train) == [0, 10, 40, 50, 80, 90] and values(val) == [20, 60, 100] and values(test) == [30, 70, 110]
    assert val.folder.unlisted == ["emu"] and "a CSV of path,label,split" in train.about
    # the hold-out of a split CSV is taken from its train split only when asked for
    held = load_split(section(tmp_path / "labels.csv", eval_split=HOLDOUT, holdout=0.5), HOLDOUT, CPU,
                      classes=train.classes)
    assert len(held) == 4 and set(values(held)) <= set(values(train))  # 2 of each class of 3


@pytest.mark.parametrize("text, message", [
    ("", "has no rows; expected lines of path,label"),
    ("path,label\n", "has no rows"),
    ("imgs/0.png,dog\nimgs/nope.png,dog\n", r"1 listed file\(s\) do not exist: imgs/nope.png \(paths are relative"),
    ("imgs/0.png\n", "line 1: expected 2 fields path,label"),
    ("imgs/0.png,dog,extra\n", r"data.train_split='train' does not exist in .*labels.csv; it has: extra"),
    ("imgs/0.png,\n", "line 1: expected 2 fields path,label"),
    ("imgs/0.png,dog\nimgs/1.png,cat,val\n", r"line 2: expected 2 fields path,label \(every row the same\)"),
    ("path,label,split\nimgs/0.png,dog\n", "line 2: expected 3 fields path,label,split"),
    ("imgs/0.png,dog\n\nimgs/0.png,cat\n", "line 3: imgs/0.png is listed twice .first on line 1."),
    ("imgs/0.png,dog\nimgs/1.png,emu\n", r"1 row\(s\) have a label that is not in the class list: imgs/1.png \(emu\)"),
    ("filename,class\nimgs/0.png,dog\nimgs/1.png,cat\n", r"its first line \(filename,class\) looks like a header; a "
                                                         "header must be path,label or path,label,split"),
])
def test_a_bad_csv_is_one_error(tmp_path, text, message):
    for i in range(2):
        write_image(tmp_path / "imgs" / f"{i}.png", i)
    (tmp_path / "labels.csv").write_text(text)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DatasetError, match=message):
        load_split(section(tmp_path / "labels.csv", classes=str(tmp_path / "classes.txt")), "train", CPU)


def test_a_csv_with_many_missing_files_names_three(tmp_path):
    (tmp_path / "labels.csv").write_text("".join(f"gone/{i}.png,a\n" for i in range(7)))
    with pytest.raises(DatasetError, match=r"7 listed file\(s\) do not exist: gone/0.png, gone/1.png, gone/2.png "
                                           "and 4 more"):
        read_labels_csv(tmp_path / "labels.csv")


def test_class_list_for_folders(tmp_path):
    root = class_folders(tmp_path / "pets", {"cat": 4, "dog": 4})
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    ds = load_images(root, "train", classes_file=tmp_path / "classes.txt", holdout=0.0, size=8)
    assert ds.classes == ["dog", "cat"] and ds.counts == [4, 4]
    (tmp_path / "short.txt").write_text("dog\n")
    with pytest.raises(DatasetError, match="class folder.s. cat of .* are not in the class list"):
        load_images(root, "train", classes_file=tmp_path / "short.txt", size=8)
    (tmp_path / "twice.txt").write_text("dog\ncat\ndog\n")
    with pytest.raises(DatasetError, match="names 'dog' twice"):
        load_images(root, "train", classes_file=tmp_path / "twice.txt", size=8)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match="names no classes"):
        load_images(root, "train", classes_file=tmp_path / "blank.txt", size=8)
    with pytest.raises(DatasetError, match="data.classes: .*nope.txt does not exist"):
        load_images(root, "train", classes_file=tmp_path / "nope.txt", size=8)
    numbered = class_folders(tmp_path / "numbered", {"1": 5, "2": 5, "10": 5})
    assert load_split(section(numbered, holdout=0.0, eval_split="train"), "train", CPU).notes == [
        "note: the class names are numbers, sorted as text (as torchvision's ImageFolder sorts them): outputs 0, 1, "
        "2, ... are classes 1, 10, 2; a class list (data.classes, one name a line) fixes another order"]
    (tmp_path / "more.txt").write_text("dog\ncat\nemu\n")  # a class of the list without a folder
    with pytest.raises(DatasetError, match=r"class emu of the class list \(data.classes\) has no folder in .*pets; "
                                           "add a folder of images for it or remove it from the class list"):
        load_split(section(root, classes=str(tmp_path / "more.txt")), "train", CPU)
    import unicodedata  # macOS writes folder names decomposed: the class "café" is still the folder "café"

    decomposed = unicodedata.normalize("NFD", "café")
    (root / "dog").rename(root / decomposed)
    (tmp_path / "accents.txt").write_text("café\ncat\n")
    ds = load_images(root, "train", classes_file=tmp_path / "accents.txt", holdout=0.0, size=8)
    assert ds.counts == [4, 4] and ds.unlisted == []
    trained = load_images(root, "train", holdout=0.0, size=8)  # trained on the decomposed name, evaluated on "café"
    (root / decomposed).rename(root / "café")
    assert load_images(root, "train", classes=trained.classes, holdout=0.0, size=8).counts == [4, 4]


# ------------------------------------------------------------------------------------------- defaults


def test_sizes_default_from_the_model_and_workers_from_the_machine(tmp_path, monkeypatch):
    root = class_folders(tmp_path / "pets", {"a": 2, "b": 2})
    folder = DataSection(name="imagefolder", root=str(root))
    assert resolve_data(folder, ModelSection(name="nest_tiny_cifar")).img_size == 32
    assert resolve_data(folder, ModelSection(name="nest_tiny_224")).img_size == 224
    assert resolve_data(folder, ModelSection(name="nest_tiny_cifar", overrides={"img_size": 16})).img_size == 16
    assert resolve_data(DataSection(name="imagefolder", root=str(root), img_size=48),
                        ModelSection(name="nest_tiny_cifar")).img_size == 48  # given: kept
    with pytest.raises(ConfigError, match="takes 16x32 images but folders and shards give square ones"):
        resolve_data(folder, ModelSection(overrides={"img_size": [16, 32]}))
    mnist = resolve_data(DataSection(), ModelSection())
    assert mnist.img_size is None and mnist.eval_split == "test"  # in-memory sets: their own size
    for cores, workers in {1: 0, 2: 1, 3: 2, 4: 3, 8: 4, 64: 4}.items():
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cores: set(range(n)), raising=False)
        assert default_workers() == workers
    cfg = load_config(None, ["data.name=imagefolder"])
    assert cfg.data.workers is None and cfg.data.img_size is None and cfg.data.eval_split is None
    with pytest.raises(ConfigError, match="data.workers must be >= 0"):
        load_config(None, ["data.workers=-1"])


# ------------------------------------------------------------------------------------------- WebDataset shards


def write_shards(folder: Path, shards: int, per_shard: int, *, labels=lambda n: n % 2, start: int = 0,
                 extra: dict[str, bytes] | None = None) -> list[int]:
    """``folder/shard-000000.tar``...: samples ``<n>.png`` (a flat grey ``n``) + ``<n>.cls`` (``labels(n)``)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    n = start
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for _ in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(np.full((6, 6, 3), n, np.uint8)).save(buf, format="PNG")
                members = {f"{n:06d}.png": buf.getvalue(), f"{n:06d}.cls": str(labels(n)).encode(),
                           **({k.format(n=n): v for k, v in extra.items()} if extra else {})}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                written.append(n)
                n += 1
    return written


def shard_section(root: Path, **kw) -> DataSection:
    return section(root, name="webdataset", **kw)


def stream_values(batches) -> list[int]:
    return [int(v) for images, _ in batches for v in images[:, 0, 0, 0]]


def test_webdataset_does_not_need_torchvision():
    pytest.importorskip("webdataset")
    import subprocess

    code = "import sys, webdataset; from nestvit.data import shards; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_shards_split_across_ranks_and_workers(tmp_path):
    pytest.importorskip("webdataset")
    written = write_shards(tmp_path / "train", shards=4, per_shard=6)
    write_shards(tmp_path / "val", shards=1, per_shard=4, start=100)
    cfg = resolve_data(shard_section(tmp_path))
    assert cfg.eval_split == "val"
    train = load_split(cfg, "train", CPU)
    assert len(train) == 24 and train.classes == ["0", "1"] and train.stream is not None
    assert train.labels.bincount().tolist() == [12, 12]
    # two ranks, no workers: 3 steps of 4 each per epoch, their images disjoint, labels right
    ranks = [TrainBatches(train, global_batch=8, rank=r, world_size=2, seed=0, device=CPU, workers=0)
             for r in range(2)]
    epochs = [list(b.epoch(0)) for b in ranks]
    assert [len(e) for e in epochs] == [3, 3] and all(img.shape == (4, 3, 8, 8) for e in epochs for img, _ in e)
    seen = [stream_values(e) for e in epochs]
    assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == set(written)
    for images, labels in epochs[0]:
        assert (images[:, 0, 0, 0].long() % 2 == labels).all()
    assert stream_values(ranks[0].epoch(0)) == seen[0]  # the order is a function of (seed, epoch)
    assert stream_values(ranks[0].epoch(1)) != seen[0]
    # with two workers, a run resumed mid-epoch sees the batches the uninterrupted run saw
    one = TrainBatches(train, global_batch=4, rank=0, world_size=1, seed=0, device=CPU, workers=2)
    whole = list(one.epoch(0))
    assert len(whole) == 6 and sorted(stream_values(whole)) == written
    for start in (1, 2, 5):
        resumed = list(one.epoch(0, start_step=start))
        assert stream_values(resumed) == stream_values(whole[start:])
    # evaluation: every sample once over all ranks and workers
    val = load_split(cfg, "val", CPU, classes=train.classes)
    got = [stream_values(eval_batches(val, batch=3, rank=r, world_size=2, device=CPU, workers=2)) for r in range(2)]
    assert sorted(got[0] + got[1]) == [100, 101, 102, 103]


def test_shards_without_split_folders_have_the_holdout(tmp_path):
    pytest.importorskip("webdataset")
    write_shards(tmp_path / "shards", shards=3, per_shard=10, labels=lambda n: ["cat", "dog"][n % 2])
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    cfg = resolve_data(shard_section(tmp_path / "shards", classes=str(tmp_path / "classes.txt")))
    assert cfg.eval_split == HOLDOUT
    train = load_split(cfg, "train", CPU)
    held = load_split(cfg, HOLDOUT, CPU, classes=train.classes)
    assert train.classes == ["dog", "cat"] and (len(train), len(held)) == (26, 4)  # 15 a class: 1.5 -> 2
    assert "26 train / 4 holdout samples in 3 shard(s)" in train.about
    seen = stream_values(TrainBatches(train, global_batch=4, rank=0, world_size=1, seed=0, device=CPU).epoch(0))
    held_values = stream_values(eval_batches(held, batch=8, rank=0, world_size=1, device=CPU))
    assert len(seen) == 24 and len(held_values) == 4 and not set(seen) & set(held_values)
    limited = load_split(cfg, "train", CPU, limit=5)
    assert len(limited) == 5 and len(stream_values(eval_batches(limited, batch=8, rank=0, world_size=1,
                                                                device=CPU))) == 5


def test_a_shards_scan_is_indexed_once_and_redone_when_it_changes(tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    import nestvit.data.shards as shards

    monkeypatch.setenv("NESTVIT_CACHE_DIR", str(tmp_path / "cache"))
    written = write_shards(tmp_path / "s", shards=2, per_shard=3)
    cfg = resolve_data(shard_section(tmp_path / "s", holdout=0.0, eval_split="train"))
    scanned = []
    real = shards.scan_shard
    monkeypatch.setattr(shards, "scan_shard", lambda path: scanned.append(path.name) or real(path))
    first = load_split(cfg, "train", CPU)
    assert sorted(scanned) == ["shard-000000.tar", "shard-000001.tar"] and len(first) == 6
    assert len(list((tmp_path / "cache" / "shard_index").glob("*.json"))) == 2
    scanned.clear()
    again = load_split(cfg, "train", CPU)  # read from the index: no shard opened for the scan
    assert scanned == [] and again.labels.tolist() == first.labels.tolist()
    assert sorted(stream_values(eval_batches(again, batch=4, rank=0, world_size=1, device=CPU))) == written
    write_shards(tmp_path / "s", shards=1, per_shard=5, start=50)  # shard 0 rewritten in place: scanned again
    assert len(load_split(cfg, "train", CPU)) == 8 and scanned == ["shard-000000.tar"]
    # an index that cannot be written (a file where its folder should be): every run scans, nothing fails
    monkeypatch.setenv("NESTVIT_CACHE_DIR", str(tmp_path / "blocked"))
    (tmp_path / "blocked").write_text("a file")
    scanned.clear()
    assert len(load_split(cfg, "train", CPU)) == 8 and len(scanned) == 2


def test_bad_shards_are_one_error_each(tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.tar").write_bytes(b"not a tar file at all" * 40)
    write_shards(tmp_path / "nolabel", 1, 2, extra={})
    with tarfile.open(tmp_path / "nolabel" / "shard-000000.tar", "a") as tar:
        info = tarfile.TarInfo("lonely.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "none").mkdir()
    write_shards(tmp_path / "mixed", 1, 2)
    write_shards(tmp_path / "mixed" / "train", 1, 2)
    write_shards(tmp_path / "ints", 1, 4, labels=lambda n: n % 3)
    (tmp_path / "two.txt").write_text("a\nb\n")
    cases = [
        (shard_section(tmp_path / "bad"), "x.tar: not a readable tar shard"),
        (shard_section(tmp_path / "nolabel"), r"sample 'lonely' lacks a label \(.cls\) \(found .png\)"),
        (shard_section(tmp_path / "none"), r"no tar shards \(.tar, .tar.gz, .tgz\) in"),
        (shard_section(tmp_path / "mixed"), "holds both shards and split folders of shards"),
        (shard_section(tmp_path / "ints", classes=str(tmp_path / "two.txt")), "label.s. 2 of the .cls files are not"),
        (shard_section(tmp_path / "missing"), "does not exist; data.root must be root/.*.tar"),
    ]
    for cfg, message in cases:
        with pytest.raises(DatasetError, match=message):
            load_split(cfg, "train", CPU)
    monkeypatch.setitem(sys.modules, "webdataset", None)  # not installed
    with pytest.raises(DatasetError, match="needs the webdataset package: pip install webdataset"):
        load_split(shard_section(tmp_path / "ints"), "train", CPU)


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    model = {"name": "nest_tiny_cifar", "overrides": {**TINY_MODEL, "img_size": 8}}
    path.write_text(yaml.safe_dump(tiny_recipe(epochs=2, global_batch=8, model=model,
                                               data={"name": "imagefolder", "img_size": None, "workers": 0,
                                                     "limit_train": None, "limit_eval": None})))
    return path


def test_one_class_and_a_folder_given_to_a_built_in_set_are_refused(tmp_path):
    one = class_folders(tmp_path / "one", {"red": 4})
    with pytest.raises(DatasetError, match=r"one class, 'red', in the training split; a classifier needs two or more "
                                           r"classes to tell apart \(if the class folders are inside .*red, set "
                                           "data.root to it"):
        load_split(section(one), "train", CPU)
    # before, data.root was silently ignored and the built-in digits trained instead
    with pytest.raises(ValueError, match=r"holds image files in folders, but data.name=mnist5k is a built-in data "
                                         r"set .* set data.name=imagefolder \(and data.pad_to=null\)"):
        load_split(DataSection(name="mnist5k", root=str(one), pad_to=32), "train", CPU)
    (tmp_path / "idx").mkdir()
    load_split(DataSection(name="mnist5k", root=str(tmp_path / "idx")), "test", CPU, limit=4)  # no images there: fine
    (tmp_path / "mnist5k").mkdir()  # one data folder for several sets: the set's own folder is there, so it is read
    load_split(DataSection(name="mnist5k", root=str(tmp_path)), "test", CPU, limit=4)


def test_a_relative_data_root_is_recorded_absolute(tmp_path, recipe, capsys, monkeypatch):
    # trained from one folder with data.root relative to it, the run is evaluated and resumed from another
    class_folders(tmp_path / "work" / "photos", {"a": 6, "b": 6})
    monkeypatch.chdir(tmp_path / "work")
    assert main(["train", str(recipe), "--out", "run", "--set", "data.root=photos"]) == 0
    saved = yaml.safe_load((tmp_path / "work" / "run" / "config.yaml").read_text())["data"]
    assert saved["root"] == str(tmp_path / "work" / "photos")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "work/run"]) == 0
    assert "imagefolder:holdout (2 images)" in capsys.readouterr().out
    assert main(["eval", "work/run", "--data", "work/photos"]) == 0  # the run's own folder: its hold-out again
    assert "imagefolder:holdout (2 images)" in capsys.readouterr().out
    assert main(["train", "--resume", "work/run", "--epochs", "2"]) == 0
    shutil.copytree(tmp_path / "work" / "photos", tmp_path / "copy")  # the run's data still there: other data
    assert main(["eval", "work/run", "--root", "copy"]) == 0
    assert "imagefolder:train (12 images)" in capsys.readouterr().out
    (tmp_path / "work" / "photos").rename(tmp_path / "moved")  # the data moved: --root alone is the run's data there
    assert main(["eval", "work/run"]) == 2
    assert "nestvit eval RUN --root NEW_PATH" in capsys.readouterr().err
    assert main(["eval", "work/run", "--root", "moved"]) == 0
    assert "imagefolder:holdout (2 images)" in capsys.readouterr().out
    (tmp_path / "moved").rename(tmp_path / "work" / "photos")
    with pytest.raises(DatasetError, match=r"photos does not exist \(a relative path, read from the current folder"):
        find_layout("photos")


def test_a_run_that_trained_on_all_of_its_train_split_has_no_holdout_to_evaluate(tmp_path, recipe, capsys):
    root = tmp_path / "data"
    class_folders(root / "Train", {"a": 6, "b": 6})
    class_folders(root / "Val", {"a": 2, "b": 2})
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", f"data.root={root}",
                 "--set", "epochs=1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--split", "holdout"]) == 2  # its hold-out would be trained images
    assert ("trained on all of " + str(root) + "'s Train split (it was evaluated on Val), so it held no images out; "
            "evaluate --split Val") in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run"), "--split", "val"]) == 0


def test_train_eval_predict_on_class_folders(tmp_path, recipe, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "flowers"
    for cls, value in (("daisy", 40), ("rose", 210)):
        for i in range(12):
            pixels = np.clip(rng.normal(value, 25, (14, 18, 3)), 0, 255).astype(np.uint8)
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(root / cls / f"{i:02d}.jpg")
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", f"data.root={root}", "--set", "optim.lr=1e-2"]) == 0
    out = capsys.readouterr().out
    assert "22 train / 2 holdout images (data.holdout=0.1 of each class" in out
    assert "data: imagefolder 22 train / 2 holdout images of 3x8x8, 2 classes (daisy, rose); normalised" in out
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert (saved["eval_split"], saved["holdout"], saved["img_size"], saved["workers"]) == (HOLDOUT, 0.1, 8, 0)

    assert main(["eval", str(run), "--out", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "imagefolder:holdout (2 images)" in out and "daisy" in out and "rose" in out
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["count"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["top1"] == pytest.approx(summary["test_top1"])
    assert main(["eval", str(run), "--split", "train"]) == 0
    assert "imagefolder:train (22 images)" in capsys.readouterr().out
    # the folder itself as --data: the same folder is the run's data (its hold-out) ...
    assert main(["eval", str(run), "--data", str(root)]) == 0
    assert "imagefolder:holdout (2 images)" in capsys.readouterr().out
    # ... another folder is data of its own: its own evaluation split (all of a new test folder here)
    other = tmp_path / "new_photos"
    for split in ("train", "test"):
        for cls in ("daisy", "rose"):
            (other / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((10, 10, 3), 40 if cls == "daisy" else 210, np.uint8)).save(other / split / cls /
                                                                                                 "a.png")
    assert main(["eval", str(run), "--data", str(other)]) == 0
    assert "imagefolder:test (2 images)" in capsys.readouterr().out
    flat = tmp_path / "more_photos"  # class folders only: all of it, not a hold-out
    for cls in ("daisy", "rose"):
        (flat / cls / ".ipynb_checkpoints").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10, 3), 40 if cls == "daisy" else 210, np.uint8)).save(flat / cls / f"{i}.png")
        Image.new("RGB", (10, 10)).save(flat / cls / ".ipynb_checkpoints" / "0-checkpoint.png")  # hidden: left out
    assert main(["eval", str(run), "--data", str(flat)]) == 0
    assert "imagefolder:train (6 images)" in capsys.readouterr().out
    # a class the model does not know is said to be skipped; a class without images is n/a, null in the JSON
    shutil.rmtree(flat / "rose")
    Image.new("RGB", (10, 10)).save((flat / "tulip").mkdir() or flat / "tulip" / "0.png")
    assert main(["eval", str(run), "--data", str(flat), "--out", str(tmp_path / "ev2")]) == 0
    out, err = capsys.readouterr()
    assert f"warning: {flat}: its classes differ from the model's: no images of the model's class(es) rose" in err
    assert "class(es) tulip that the model does not have (their images are skipped)" in err
    assert "n/a  (no images)" in out and "%  of 3 images" in out
    record = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert record["per_class_accuracy"]["rose"] is None and record["per_class_count"] == {"daisy": 3, "rose": 0}
    assert record["balanced_top1"] == record["per_class_accuracy"]["daisy"]  # the class with images only
    assert main(["eval", str(run), "--data", str(tmp_path / "photoz")]) == 2
    assert "neither a data set" in capsys.readouterr().err
    strangers = tmp_path / "strangers"  # class folders that are none of the run's classes
    (strangers / "tulip").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(strangers / "tulip" / "0.png")
    assert main(["eval", str(run), "--data", str(strangers)]) == 2
    err = capsys.readouterr().err
    assert "none of the class folders" in err and "(tulip)" in err and "model's classes (daisy, rose)" in err
    listed = tmp_path / "strangers.csv"  # a CSV whose labels are none of them (numbers for names)
    listed.write_text("path,label\nstrangers/tulip/0.png,0\n")
    assert main(["eval", str(run), "--data", str(listed)]) == 2
    err = capsys.readouterr().err
    assert "none of the labels" in err and "(0)" in err and "label the rows with the class names" in err
    # the ONNX export beside the run reads the run's data as the run does
    assert main(["export", str(run)]) == 0 and main(["eval", str(run / "model.onnx")]) == 0
    assert "imagefolder:holdout (2 images)" in capsys.readouterr().out
    assert main(["eval", str(run), "--data", str(other), "--root", str(root)]) == 2
    assert "give one of them" in capsys.readouterr().err

    picture = tmp_path / "img.png"
    Image.fromarray(np.full((30, 30, 3), 210, np.uint8)).save(picture)
    assert main(["predict", str(run), str(picture), "--top-k", "2"]) == 0
    head, out = capsys.readouterr().out.split("\n", 1)  # the weights it uses, then the predictions
    assert head.startswith(f"weights: {run / 'best.safetensors'} (epoch ")
    assert str(picture) in out and "rose" in out and out.count("%") == 2

    # a folder of images, in batches, to a CSV file and a JSON Lines file: the same numbers as one at a time
    table = tmp_path / "preds" / "flowers.csv"
    assert main(["predict", str(run), str(root), "--batch-size", "5", "--out", str(table)]) == 0
    assert f"wrote {table} (24 images, top 2 of 2 classes)" in capsys.readouterr().out
    rows = list(csv.DictReader(table.open()))
    assert [r["path"] for r in rows] == [str(p) for p in sorted(root.rglob("*.jpg"))]
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    loaded = nestvit.load(run)
    with torch.no_grad():
        one = loaded.model(loaded.transform(loaded.transform.read_batch([rows[7]["path"]]))).softmax(-1)[0]
    assert float(rows[7]["prob_1"]) == pytest.approx(float(one.max()), abs=1e-6)
    assert rows[7]["class_1"] == loaded.classes[int(one.argmax())]
    lines = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), str(picture), str(root / "rose"), "--top-k", "1", "--out", str(lines)]) == 0
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    assert len(records) == 13 and records[0]["path"] == str(picture) and records[0]["top"][0]["class"] == "rose"
    assert main(["predict", str(run), str(picture), "--out", str(tmp_path / "preds.txt")]) == 2
    assert "write a .csv or a .jsonl file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run), str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err


def test_train_on_shards_end_to_end(tmp_path, recipe, capsys):
    pytest.importorskip("webdataset")
    write_shards(tmp_path / "shards", shards=2, per_shard=12, labels=lambda n: ["dark", "light"][n >= 12])
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", "data.name=webdataset",
                 "--set", f"data.root={tmp_path / 'shards'}", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "22 train / 2 holdout samples in 2 shard(s)" in out and "2 steps/epoch" in out
    assert main(["eval", str(run)]) == 0
    assert "webdataset:holdout (2 images)" in capsys.readouterr().out
    # a folder of shards as --data: the run's own (its hold-out), or another one, all of it
    assert main(["eval", str(run), "--data", str(tmp_path / "shards")]) == 0
    assert "webdataset:holdout (2 images)" in capsys.readouterr().out
    write_shards(tmp_path / "more", shards=1, per_shard=6, labels=lambda n: ["dark", "light"][n >= 3])
    assert main(["eval", str(run), "--data", str(tmp_path / "more")]) == 0
    assert "webdataset:train (6 images)" in capsys.readouterr().out
    # split folders of shards: the run trains on all of train, so it has no hold-out to evaluate
    write_shards(tmp_path / "split" / "train", shards=1, per_shard=12, labels=lambda n: ["dark", "light"][n >= 6])
    write_shards(tmp_path / "split" / "val", shards=1, per_shard=4, labels=lambda n: ["dark", "light"][n >= 2])
    assert main(["train", str(recipe), "--out", str(tmp_path / "split_run"), "--set", "data.name=webdataset",
                 "--set", f"data.root={tmp_path / 'split'}", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "split_run"), "--split", "holdout"]) == 2
    assert "so it held no images out; evaluate --split val" in capsys.readouterr().err


def test_a_bad_folder_through_the_command_line_is_one_line(tmp_path, recipe, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", f"data.root={tmp_path / 'empty'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no class folders" in err


def test_two_ranks_stream_their_own_shards(tmp_path):
    """DDP (two CPU processes, gloo): each rank reads its shards, both take the same steps, and the evaluation
    counts every held-out sample once."""
    pytest.importorskip("webdataset")
    from nestvit.train.distributed import spawn_local
    from nestvit.train.loop import train
    from nestvit.train.metrics import read_metrics

    write_shards(tmp_path / "shards", shards=4, per_shard=6)
    model = {"name": "nest_tiny_cifar", "overrides": {**TINY_MODEL, "img_size": 8}}
    cfg = load_config(tiny_recipe(epochs=2, global_batch=8, model=model,
                                  data={"name": "webdataset", "root": str(tmp_path / "shards"), "img_size": None,
                                        "workers": 0, "limit_train": None, "limit_eval": None}))
    spawn_local(2, train, cfg, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]  # 22 samples // 8 a step
    assert json.loads((tmp_path / "run" / "confusion.json").read_text())["count"] == 2


def test_greyscale_files_are_found_and_decoded_to_one_channel(tmp_path):
    from nestvit.data.datasets import decode_image, image_channels

    grey = tmp_path / "g.png"
    Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12)).save(grey)
    rgb = write_image(tmp_path / "c.png", 7)
    palette = tmp_path / "p.png"
    Image.new("P", (4, 4)).save(palette)
    assert image_channels([grey, grey]) == 1
    assert image_channels([grey, rgb]) == 3 and image_channels([palette]) == 3 and image_channels([]) == 3
    assert image_channels([grey] * 100 + [rgb] * 27) == 3  # the last files are among those read
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert image_channels([junk, junk]) == 3  # none read: RGB, and the decoding names the file
    one = decode_image(grey, size=8, channels=1)
    three = decode_image(grey, size=8)
    assert one.shape == (1, 8, 8) and three.shape == (3, 8, 8)
    assert torch.equal(one[0], three[0]) and torch.equal(three[0], three[2])  # the grey values, once


def test_16_bit_and_float_greyscale_keep_their_grey_levels(tmp_path):
    """Pillow's convert("L") clips I;16 / I / F to 0..255: a 16-bit PNG at 46 % grey came out white."""
    from nestvit.contract import InputTransform
    from nestvit.data.datasets import decode_image

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((10, 12), 30000, dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode in ("I;16", "I")
    flt = tmp_path / "f.tiff"
    Image.fromarray(np.full((10, 12), 0.25, dtype=np.float32)).save(flt)
    for path, grey in ((deep, 117), (flt, 64)):  # 30000 * 255 / 65535 = 116.7; 0.25 * 255 = 63.75
        assert decode_image(path, size=8, channels=1).unique().tolist() == [grey]
        assert decode_image(path, size=8, channels=3).unique().tolist() == [grey]
        for resize in ("stretch", "center-crop"):  # predict / explain / nestvit.load read it the same way
            t = InputTransform(channels=1, size=(8, 8), mean=(0.5,), std=(0.5,), resize=resize)
            assert t.read_batch([path]).unique().tolist() == [grey]


def test_data_channels_default_follows_the_training_files(tmp_path):
    from nestvit.train.inputs import resolve_data

    class_folders(tmp_path / "rgb", {"a": 3, "b": 3})
    for cls in ("a", "b"):
        for i in range(3):
            path = tmp_path / "grey" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 12), 40 * i, np.uint8)).save(path)
    assert resolve_data(section(tmp_path / "grey")).channels == 1
    assert resolve_data(section(tmp_path / "rgb")).channels == 3
    assert resolve_data(section(tmp_path / "grey", channels=3)).channels == 3  # said: kept
    rgb_norm = resolve_data(section(tmp_path / "grey", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)))
    assert rgb_norm.channels == 3  # a recipe's own 3-channel normalisation fixes the count
    for name in ("mine", "held"):  # split folders of other names
        class_folders(tmp_path / "named" / name, {"a": 2, "b": 2})
    assert resolve_data(section(tmp_path / "named", train_split="mine", eval_split="held")).channels == 3
    with pytest.raises(ValueError, match="data.channels applies to image folders and shards"):
        load_split(DataSection(name="mnist5k", channels=1), "test", CPU)
    split = load_split(resolve_data(section(tmp_path / "grey")), "train", torch.device("cpu"))
    assert split.channels == 1 and split.folder[0][0].shape == (1, 8, 8)


def test_a_folder_run_from_before_data_channels_resumes_as_rgb(tmp_path, recipe, capsys):
    """Runs written before ``data.channels`` decoded every file to RGB: resumed, they still do (greyscale files
    included), with no "the config differs" note for the key they lack."""
    import torch as _torch

    root = tmp_path / "grey"
    for cls in ("a", "b"):
        for i in range(8):
            (root / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 10), 30 * i, np.uint8)).save(root / cls / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run), "--set", f"data.root={root}", "--set", "data.channels=3",
                 "--epochs", "1"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["data"]["channels"]  # as an older nestvit wrote it
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    state = _torch.load(run / "state.pt", weights_only=True)
    del state["config"]["data"]["channels"]
    _torch.save(state, run / "state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "3x8x8" in out and "differs from the saved run's in epochs (1 -> 2)\n" in out  # no data.channels
    assert nestvit.load(run).transform.channels == 3


def test_an_in_memory_run_from_before_data_channels_resumes(tmp_path, capsys):
    """In-memory sets have no data.channels: a run saved without the key resumes as before (the RTNT study's)."""
    import torch as _torch

    recipe = tmp_path / "mem.yaml"
    model = {"name": "nest_tiny_cifar", "overrides": {**TINY_MODEL, "img_size": 32, "in_chans": 1}}
    recipe.write_text(yaml.safe_dump(tiny_recipe(epochs=1, global_batch=32, model=model,
                                                 data={"name": "mnist5k", "img_size": None, "pad_to": 32,
                                                       "limit_train": 64, "limit_eval": 32})))
    run = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(run)]) == 0
    state = _torch.load(run / "state.pt", weights_only=True)
    del state["config"]["data"]["channels"]
    _torch.save(state, run / "state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2"]) == 0
    assert "1x32x32" in capsys.readouterr().out
