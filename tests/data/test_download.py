"""Checked, atomic downloads against a local HTTP server."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import os
import pickle
import re
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from nestvit.data import (
    DATASETS,
    MIRRORS,
    REMOTE_FILES,
    ChecksumError,
    DatasetError,
    RemoteFile,
    dataset_urls,
    download_dataset,
    download_file,
    extract_archive,
    load_dataset,
    sha256_file,
)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Handler(SimpleHTTPRequestHandler):
    """Serves a directory, plus /truncated (lies about its length) and /slow (pauses half-way)."""

    half_sent: threading.Event
    resume: threading.Event

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path in ("/truncated", "/slow"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            if self.path == "/slow":
                self.half_sent.set()
                self.resume.wait(10)
                self.wfile.write(PAYLOAD[len(PAYLOAD) // 2 :])
            self.close_connection = True
            return
        super().do_GET()


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # e.g. the client hanging up on purpose after a size mismatch


@pytest.fixture
def server(tmp_path):
    """(base URL, served directory, handler class) of a server on 127.0.0.1."""
    served = tmp_path / "srv"
    served.mkdir()
    handler = type("H", (Handler,), {"half_sent": threading.Event(), "resume": threading.Event()})
    httpd = QuietServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, handler
    handler.resume.set()
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- download_file


def test_good_hash_puts_file_in_place(server, tmp_path):
    url, served, _ = server
    (served / "blob.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "blob.bin"
    assert download_file(f"{url}/blob.bin", dest, sha(PAYLOAD), progress=True) == dest
    assert dest.read_bytes() == PAYLOAD and sha256_file(dest) == sha(PAYLOAD)
    assert leftovers(dest.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
    # the expected hash may be given in upper case
    download_file(f"{url}/blob.bin", tmp_path / "b2", sha(PAYLOAD).upper(), progress=False, size=len(PAYLOAD))


def test_bad_hash_deletes_download_and_names_everything(server, tmp_path):
    url, served, _ = server
    (served / "blob.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "blob.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as e:
        download_file(f"{url}/blob.bin", dest, wrong, progress=False)
    msg = str(e.value)
    assert isinstance(e.value, DatasetError)
    assert str(dest) in msg and wrong in msg and sha(PAYLOAD) in msg and "mismatch" in msg
    assert not dest.exists() and leftovers(tmp_path) == []


def test_failed_download_keeps_existing_file(server, tmp_path):
    url, served, _ = server
    (served / "blob.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"previous good copy")
    with pytest.raises(ChecksumError):
        download_file(f"{url}/blob.bin", dest, "1" * 64, progress=False)
    assert dest.read_bytes() == b"previous good copy" and leftovers(tmp_path) == []


def test_dest_never_half_written(server, tmp_path):
    url, _, handler = server
    dest = tmp_path / "blob.bin"
    errors = []
    worker = threading.Thread(target=lambda: _run(errors, f"{url}/slow", dest, sha(PAYLOAD)))
    worker.start()
    assert handler.half_sent.wait(10)
    assert not dest.exists()  # half the data has arrived: only a temporary file exists
    assert any(p.suffix == ".tmp" for p in tmp_path.iterdir())
    handler.resume.set()
    worker.join(10)
    assert errors == [] and dest.read_bytes() == PAYLOAD and leftovers(tmp_path) == []


def _run(errors, url, dest, digest):
    try:
        download_file(url, dest, digest, progress=False)
    except Exception as e:  # noqa: BLE001 - reported to the test thread
        errors.append(e)


@pytest.mark.parametrize(
    "path, pattern",
    [
        ("/truncated", "failed: incomplete: got 524288 of 1048576 bytes"),
        ("/missing.bin", "HTTP 404"),
    ],
)
def test_transfer_failures_leave_nothing(server, tmp_path, path, pattern):
    url, _, _ = server
    dest = tmp_path / "blob.bin"
    with pytest.raises(DatasetError, match=pattern) as e:
        download_file(url + path, dest, sha(PAYLOAD), progress=False)
    assert str(dest) in str(e.value) and url + path in str(e.value)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_unreachable_and_wrong_size(server, tmp_path):
    url, served, _ = server
    import socket

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DatasetError, match="cannot reach"):
        download_file(f"http://127.0.0.1:{port}/x", tmp_path / "x", sha(b""), progress=False, timeout=5)
    (served / "blob.bin").write_bytes(PAYLOAD)
    with pytest.raises(DatasetError, match="sends 1048576 bytes, expected 1000"):
        download_file(f"{url}/blob.bin", tmp_path / "x", sha(PAYLOAD), progress=False, size=1000)
    with pytest.raises(ValueError, match="64 hex digits"):
        download_file(f"{url}/blob.bin", tmp_path / "x", "abc", progress=False)
    assert not (tmp_path / "x").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the table of files


def test_table_of_files():
    assert set(REMOTE_FILES) == {n for n, info in DATASETS.items() if info.downloadable} == set(MIRRORS)
    for name, files in REMOTE_FILES.items():
        assert len({f.filename for f in files}) == len(files)
        for f in files:
            assert f.sha256 is not None and re.fullmatch(r"[0-9a-f]{64}", f.sha256), (name, f)
    urls = dict((f.filename, u) for f, u in dataset_urls("mnist"))
    assert (
        urls["train-images-idx3-ubyte.gz"]
        == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    )
    assert dataset_urls("cifar10")[0][1] == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert (
        REMOTE_FILES["cifar10"][0].sha256
        == "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
    )
    assert (
        REMOTE_FILES["cifar100"][0].sha256
        == "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    )


def test_mirror_precedence(monkeypatch):
    monkeypatch.setenv("NESTVIT_DATA_MIRROR", "http://mirror.example/data/")
    assert dataset_urls("stl10")[0][1] == "http://mirror.example/data/stl10/stl10_binary.tar.gz"
    assert dataset_urls("stl10", base_url="http://x/y")[0][1] == "http://x/y/stl10_binary.tar.gz"
    with pytest.raises(DatasetError, match="no download"):
        dataset_urls("mnist5k")


def test_file_without_verified_checksum_is_not_fetched(monkeypatch, tmp_path):
    monkeypatch.setitem(REMOTE_FILES, "mnist", (RemoteFile("train-images-idx3-ubyte.gz", None),))
    with pytest.raises(DatasetError, match="no verified SHA-256 is known .* by hand"):
        download_dataset("mnist", tmp_path, base_url="http://127.0.0.1:9/")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- whole datasets


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return gzip.compress(header + array.tobytes())


def test_load_mnist_with_download(server, tmp_path, monkeypatch):
    url, served, _ = server
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte.gz": _idx(train := rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte.gz": _idx(np.array([3, 1, 4, 1, 5], np.uint8)),
        "t10k-images-idx3-ubyte.gz": _idx(rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte.gz": _idx(np.array([9, 2], np.uint8)),
    }
    (served / "mnist").mkdir()
    for name, data in files.items():
        (served / "mnist" / name).write_bytes(data)
    monkeypatch.setitem(REMOTE_FILES, "mnist", tuple(RemoteFile(n, sha(d), len(d)) for n, d in files.items()))
    monkeypatch.setenv("NESTVIT_DATA_MIRROR", url)
    root = tmp_path / "data"
    with pytest.raises(DatasetError, match="download=True"):
        load_dataset("mnist", root=root)
    ds = load_dataset("mnist", root=root, download=True)
    assert ds.labels.tolist() == [3, 1, 4, 1, 5] and np.array_equal(ds.images[:, 0].numpy(), train)
    assert sorted(p.name for p in (root / "mnist").iterdir()) == sorted(files)
    for f in served.joinpath("mnist").iterdir():
        f.unlink()  # now everything is local
    assert load_dataset("mnist", root=root, split="test", download=True).labels.tolist() == [9, 2]
    # a misspelt root: before, the folders made for the download stayed and the error named only the network
    typo = tmp_path / "dat" / "sets"
    with pytest.raises(DatasetError, match=f"download from .* failed.* data.root {typo} did not exist \\(misspelt"):
        load_dataset("mnist", root=typo, download=True)
    assert not (tmp_path / "dat").exists()


def _cifar_archive() -> tuple[bytes, np.ndarray]:
    data = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    members = {f"data_batch_{i}": {b"data": data[:0], b"labels": []} for i in range(1, 6)}
    members["data_batch_1"] = {b"data": data, b"labels": [0, 1, 2, 3]}
    members["test_batch"] = {b"data": data[:1], b"labels": [7]}
    members["batches.meta"] = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, obj in members.items():
            blob = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue(), data


def test_load_cifar10_with_download_extracts(server, tmp_path, monkeypatch):
    url, served, _ = server
    archive, data = _cifar_archive()
    (served / "cifar-10-python.tar.gz").write_bytes(archive)
    monkeypatch.setitem(
        REMOTE_FILES, "cifar10", (RemoteFile("cifar-10-python.tar.gz", sha(archive), extract=True),)
    )
    monkeypatch.setitem(MIRRORS, "cifar10", url + "/")
    monkeypatch.delenv("NESTVIT_DATA_MIRROR", raising=False)
    ds = load_dataset("cifar10", root=tmp_path, download=True)
    assert np.array_equal(ds.images.reshape(4, -1).numpy(), data) and ds.labels.tolist() == [0, 1, 2, 3]
    assert (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    assert leftovers(tmp_path / "cifar10") == []  # no staging directory or partial file left


def test_download_dataset_checksum_failure(server, tmp_path, monkeypatch):
    url, served, _ = server
    archive, _ = _cifar_archive()
    (served / "cifar-10-python.tar.gz").write_bytes(archive + b"tampered")
    monkeypatch.setitem(
        REMOTE_FILES, "cifar10", (RemoteFile("cifar-10-python.tar.gz", sha(archive), extract=True),)
    )
    with pytest.raises(ChecksumError, match="cifar-10-python.tar.gz"):
        download_dataset("cifar10", tmp_path / "cifar10", base_url=url, progress=False)
    assert list((tmp_path / "cifar10").iterdir()) == []


# --------------------------------------------------------------------------- safe extraction


def _tar(path: Path, entries: list[tuple[str, bytes | None, bytes]]) -> Path:
    """entries: (name, data or None, type) with type tarfile.REGTYPE / SYMTYPE / ..."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return path


def test_extract_skips_members(tmp_path):
    archive = _tar(
        tmp_path / "a.tar.gz",
        [
            ("stl10_binary/train_X.bin", b"x", tarfile.REGTYPE),
            ("stl10_binary/unlabeled_X.bin", b"big", tarfile.REGTYPE),
        ],
    )
    out = tmp_path / "out"
    written = extract_archive(archive, out, skip={"stl10_binary/unlabeled_X.bin"})
    assert written == [out / "stl10_binary" / "train_X.bin"] and written[0].read_bytes() == b"x"
    assert not (out / "stl10_binary" / "unlabeled_X.bin").exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "name, kind, pattern",
    [
        ("../escape.txt", tarfile.REGTYPE, "unsafe member path"),
        ("/tmp/abs.txt", tarfile.REGTYPE, "unsafe member path"),
        ("dir/link", tarfile.SYMTYPE, "not a regular file"),
        ("dir/fifo", tarfile.FIFOTYPE, "not a regular file"),
    ],
)
def test_extract_refuses_unsafe_members(tmp_path, name, kind, pattern):
    archive = _tar(tmp_path / "evil.tar.gz", [("dir/ok.txt", b"fine", tarfile.REGTYPE), (name, b"bad", kind)])
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=pattern) as e:
        extract_archive(archive, out)
    assert str(archive) in str(e.value)
    assert list(out.iterdir()) == [] and not (tmp_path / "escape.txt").exists()


def test_extract_corrupt_archive(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [("f", PAYLOAD, tarfile.REGTYPE)])
    archive.write_bytes(archive.read_bytes()[:-2000])
    with pytest.raises(DatasetError, match="corrupt or truncated archive") as e:
        extract_archive(archive, tmp_path / "out")
    assert str(archive) in str(e.value) and list((tmp_path / "out").iterdir()) == []
