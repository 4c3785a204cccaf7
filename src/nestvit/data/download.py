"""Checked downloads of the original dataset files.

:func:`download_file` streams a URL into a temporary file next to the destination, verifies
its SHA-256 and only then renames it into place, so a destination is never half-written.
:data:`REMOTE_FILES` lists the files of each dataset with SHA-256 sums cross-checked against
several independent published sources; :func:`download_dataset` fetches them and unpacks
archives safely.

Where files come from, in order of precedence: the ``base_url`` argument (the directory that
holds the dataset's files), the ``NESTVIT_DATA_MIRROR`` environment variable (a tree with one
sub-directory per dataset name: ``$NESTVIT_DATA_MIRROR/mnist/train-images-idx3-ubyte.gz``),
then :data:`MIRRORS`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

from .datasets import DatasetError

__all__ = [
    "MIRRORS",
    "REMOTE_FILES",
    "ChecksumError",
    "RemoteFile",
    "dataset_urls",
    "download_dataset",
    "download_file",
    "extract_archive",
    "sha256_file",
]

MIRROR_ENV = "NESTVIT_DATA_MIRROR"
_CHUNK = 1 << 20


class ChecksumError(DatasetError):
    """A downloaded file does not have the expected SHA-256."""


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name, SHA-256, size in bytes, and (for archives) what to unpack."""

    filename: str
    sha256: str | None
    size: int | None = None
    extract: bool = False
    skip_members: tuple[str, ...] = ()


MIRRORS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "stl10": "http://ai.stanford.edu/~acoates/stl10/",
}

# SHA-256 sums as published by TensorFlow Datasets (url_checksums/*.txt) and Keras, and repeated
# by many independent projects; a file without a known sum (sha256=None) is never downloaded.
REMOTE_FILES: dict[str, tuple[RemoteFile, ...]] = {
    "mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            9_912_422,
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            28_881,
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            1_648_877,
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            4_542,
        ),
    ),
    "fashion_mnist": (
        RemoteFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            26_421_880,
        ),
        RemoteFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            29_515,
        ),
        RemoteFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            4_422_102,
        ),
        RemoteFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            5_148,
        ),
    ),
    "cifar10": (
        RemoteFile(
            "cifar-10-python.tar.gz",
            "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
            170_498_071,
            extract=True,
        ),
    ),
    "cifar100": (
        RemoteFile(
            "cifar-100-python.tar.gz",
            "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
            169_001_437,
            extract=True,
        ),
    ),
    "stl10": (  # 2.6 GB; the 2.7 GB unlabeled split is not unpacked
        RemoteFile(
            "stl10_binary.tar.gz",
            "f31fd99273a1acb8609c8db427cebb1de3f71de77758cdc0e22956e1289b9866",
            2_640_397_119,
            extract=True,
            skip_members=("stl10_binary/unlabeled_X.bin",),
        ),
    ),
}

_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    dest: str | Path,
    sha256: str,
    *,
    progress: bool = True,
    timeout: float = 60.0,
    size: int | None = None,
) -> Path:
    """Download ``url`` to ``dest`` atomically, verifying its SHA-256.

    The data is streamed into a temporary file in ``dest``'s directory, checked, then moved into
    place with :func:`os.replace`. On any failure the temporary file is removed, an existing
    ``dest`` is left untouched and :class:`DatasetError` (:class:`ChecksumError` for a hash
    mismatch) is raised. ``size`` (optional) is the expected length in bytes.
    """
    from ..fileio import FetchError, fetch_url

    dest = Path(dest)
    expected = sha256.lower()
    if not _HEX64.fullmatch(expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")

    def check(fetched) -> None:
        if fetched.sha256 != expected:
            raise ChecksumError(
                f"{dest}: SHA-256 mismatch for the download from {url}: expected {expected}, "
                f"got {fetched.sha256} ({fetched.received} bytes). The download was deleted; try again or use "
                f"another mirror (${MIRROR_ENV})."
            )

    try:
        fetch_url(url, dest, check=check, progress=progress, timeout=timeout, expect_length=size,
                  user_agent="nestvit-data/1")
    except FetchError as e:
        if e.unreachable:
            raise DatasetError(f"{dest}: cannot reach {url} ({e.reason}); check the network, or fetch "
                               f"{dest.name} by hand into {dest.parent}") from None
        raise DatasetError(f"{dest}: download from {url} failed: {e.reason}. Try again.") from None
    return dest


def dataset_urls(name: str, *, base_url: str | None = None) -> list[tuple[RemoteFile, str]]:
    """The files of dataset ``name`` with the URL each would be fetched from."""
    if name not in REMOTE_FILES:
        raise DatasetError(f"{name}: no download is available; known: {', '.join(REMOTE_FILES)}")
    if base_url is None:
        mirror = os.environ.get(MIRROR_ENV)
        base_url = f"{mirror.rstrip('/')}/{name}/" if mirror else MIRRORS[name]
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    return [(f, base_url + f.filename) for f in REMOTE_FILES[name]]


def download_dataset(
    name: str, dest_dir: str | Path, *, base_url: str | None = None, progress: bool = True
) -> list[Path]:
    """Fetch the files of ``name`` into ``dest_dir`` (existing files are kept) and unpack archives.

    Raises :class:`DatasetError` if a file has no verified checksum: fetch it by hand instead.
    """
    dest_dir = Path(dest_dir).expanduser()
    paths = []
    for remote, url in dataset_urls(name, base_url=base_url):
        dest = dest_dir / remote.filename
        if remote.sha256 is None:
            raise DatasetError(
                f"{name}: no verified SHA-256 is known for {remote.filename}; download it by hand "
                f"from {url} into {dest_dir}"
            )
        if not dest.is_file():
            if progress:
                tqdm.write(f"downloading {url} -> {dest}")
            download_file(url, dest, remote.sha256, progress=progress, size=remote.size)
        if remote.extract:
            extract_archive(dest, dest_dir, skip=remote.skip_members)
        paths.append(dest)
    return paths


def _member_path(name: str, archive: Path) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise DatasetError(f"{archive}: refusing to unpack unsafe member path {name!r}")
    return path


def extract_archive(archive: str | Path, dest_dir: str | Path, *, skip: Collection[str] = ()) -> list[Path]:
    """Unpack the regular files of a tar archive under ``dest_dir``, skipping names in ``skip``.

    Absolute or ``..`` paths, links and device files are refused (:class:`DatasetError`).
    Files are written to a temporary directory first and each is moved into place only when
    complete. Returns the paths written.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    staged: list[PurePosixPath] = []
    try:
        try:
            with tarfile.open(archive, "r|*") as tar:
                for member in tar:
                    rel = _member_path(member.name, archive)
                    if member.isdir() or member.name in skip:
                        continue
                    if not member.isfile():
                        raise DatasetError(
                            f"{archive}: refusing to unpack {member.name!r}: not a regular file"
                        )
                    target = staging.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, _CHUNK)
                    staged.append(rel)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise DatasetError(
                f"{archive}: corrupt or truncated archive ({e}). Delete it and download again."
            ) from None
        written = []
        for rel in staged:
            final = dest_dir.joinpath(*rel.parts)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging.joinpath(*rel.parts), final)
            written.append(final)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
