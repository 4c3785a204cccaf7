"""Atomic file writes, downloads included: no reader ever sees a half-written checkpoint, weights file, record, plot
or download."""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

__all__ = ["DiskFullError", "FetchError", "Fetched", "atomic_path", "atomic_write_text", "disk_full_error",
           "fetch_url", "is_disk_full", "remove_stale_temporaries", "save_figure"]

_UMASK = os.umask(0o022)  # read once, at import, where no other thread can create a file in between
os.umask(_UMASK)


class DiskFullError(UserError, OSError):
    """No space was left on the device while a file was written; the previous version of the file is intact."""

    def __str__(self) -> str:  # the message alone: OSError's would turn into "[Errno 28] None: 'path'"
        return str(self.args[0]) if self.args else ""


_FULL_MARKERS = ("no space left on device", "disk quota exceeded", "os error 28", "storagefull")


def is_disk_full(error: BaseException, folder: str | Path | None = None) -> bool:
    """Whether ``error`` says the disk is full: ``ENOSPC`` / ``EDQUOT``, the words of a library that wraps it
    (safetensors, torch), or any failure while ``folder``'s file system has less than 1 MiB free."""
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(m in str(error).lower() for m in _FULL_MARKERS):
        return True
    if folder is not None:
        try:
            st = os.statvfs(folder)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < (1 << 20)
    return False


def disk_full_error(path: str | Path, *, kept: str | None = None) -> DiskFullError:
    """The one-line error of a write to ``path`` that ran out of space; ``kept`` says what is intact."""
    path = Path(path)
    if kept is None:
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    err = DiskFullError(f"{path}: the disk is full (no space left on the device holding {path.parent}); {kept}. "
                        "Free some space, then run the command again (a training run that saved a checkpoint, "
                        "state.pt: nestvit train --resume RUN_DIR)")
    err.errno, err.filename = errno.ENOSPC, str(path)
    return err


class UnwritableError(UserError, OSError):
    """The folder of a file to write cannot be made or written to (a read-only place, a file in the way)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def why_unwritable(e: OSError) -> str:
    """Why a folder could not be made or written to, in words: a file in the way, or the system's reason."""
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return "a file is in the way"
    return (e.strerror or str(e)).lower()


def _temporary_beside(path: Path) -> str:
    """A new empty temporary file in ``path``'s folder (made if missing); :class:`UnwritableError` naming ``path``
    (not the temporary) where the folder cannot be made or written to."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # the temporary's own name would only confuse: say which file and why
        if is_disk_full(e):
            raise disk_full_error(path) from e
        raise UnwritableError(f"{path}: cannot be written ({why_unwritable(e)}); choose a path in a folder you can "
                              "write to") from None
    os.close(fd)
    return tmp


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error the file is renamed
    over ``path`` (``os.replace``, atomic on POSIX); on error it is removed and ``path`` is untouched.

    ``fsync=True`` flushes the file to disk before the rename (checkpoints). A write that runs out of
    space raises :class:`DiskFullError` (one line: the disk is full, where, the old file is intact)."""
    path = Path(path)
    tmp = _temporary_beside(path)
    try:
        try:
            yield Path(tmp)
            if fsync:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            # mkstemp makes the file 0600, and a writer that renames its own temporary over ``tmp``
            # (safetensors) does too: give it the mode a plain open() would, right before it takes the name
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except Exception as e:
            if is_disk_full(e, path.parent if os.path.exists(tmp) else None):
                raise disk_full_error(path) from e
            raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ``.<name>.<8 characters of mkstemp>.tmp``: what atomic_path leaves when its process is killed
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that killed writers of :func:`atomic_path` left in ``folder`` (not below it).

    Call it where no other process writes into ``folder`` (a run directory when its run starts or resumes)."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in sorted(folder.glob(".*.tmp")):
            if _TEMPORARY.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def cache_home() -> Path:
    """nestvit's own cache folder: ``$NESTVIT_CACHE_DIR``, else ``~/.cache/nestvit`` (data sets, the shard index)."""
    env = os.environ.get("NESTVIT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nestvit"


def json_text(obj: Any, level: int = 0) -> str:
    """``obj`` as ``json.dumps(obj, indent=1)`` writes it, except that a list of plain values stays on one line (a
    confusion matrix: a line a row, not a line a number; 1,000 classes: 1,000 lines, not a million)."""
    pad = " " * (level + 1)
    if isinstance(obj, dict) and obj:
        return "{\n" + ",\n".join(f"{pad}{json.dumps(str(k))}: {json_text(v, level + 1)}" for k, v in obj.items()) \
            + "\n" + " " * level + "}"
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(pad + json_text(v, level + 1) for v in obj) + "\n" + " " * level + "]"
    return json.dumps(obj)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`: the old file or the whole new one, never a torn one."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_figure(fig: Any, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` through :func:`atomic_path`; the format comes from ``path``'s suffix (default PNG)."""
    path = Path(path)
    savefig_kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path


# --------------------------------------------------------------------------------------------------
# Downloads: the one way a URL becomes a file (data sets, published weights)
# --------------------------------------------------------------------------------------------------

class FetchError(Exception):
    """A download that did not arrive whole (HTTP error, no connection, a broken or short transfer); ``reason``
    says which, for the caller's own message. Nothing was written."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.unreachable = reason, unreachable


@dataclass
class Fetched:
    """What arrived: its SHA-256 and MD5 (hex), its size, and the server's headers (names in lower case)."""

    sha256: str
    md5: str
    received: int
    headers: dict[str, str]


def fetch_url(url: str, dest: str | Path, *, check: Callable[[Fetched], None] | None = None, progress: bool = True,
              timeout: float = 60.0, expect_length: int | None = None, user_agent: str = "nestvit") -> Fetched:
    """Stream ``url`` into a temporary file beside ``dest``, flushed to disk, run ``check`` on what arrived (it
    raises to refuse it), then rename it over ``dest``; on any failure ``dest`` is untouched and nothing is left.

    Raises :class:`FetchError` for an HTTP error, no connection, a broken transfer, fewer bytes than the server
    announced or a ``Content-Length`` other than ``expect_length``; :class:`DiskFullError` for a full disk.
    """
    import hashlib
    import http.client
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    dest = Path(dest)
    sha, md5, received = hashlib.sha256(), hashlib.md5(), 0
    with atomic_path(dest, fsync=True) as tmp:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": user_agent})
            with urllib.request.urlopen(request, timeout=timeout) as response, open(tmp, "wb") as out:
                header = response.headers.get("Content-Length") or ""
                length = int(header) if header.isdigit() else None
                if expect_length is not None and length is not None and length != expect_length:
                    raise FetchError(f"the server sends {length} bytes, expected {expect_length}: wrong file or "
                                     "mirror")
                headers = {k.lower(): v for k, v in response.headers.items()}  # HTTP's names are case-blind
                with tqdm(total=length or expect_length, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=dest.name, disable=not progress, leave=False) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        sha.update(chunk)
                        md5.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            raise FetchError(f"HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise FetchError(f"no connection: {e.reason}", unreachable=True) from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, bad replies
            if is_disk_full(e, dest.parent):
                raise
            raise FetchError(f"the transfer broke after {received} bytes: {e}") from None
        if length is not None and received != length:
            raise FetchError(f"incomplete: got {received} of {length} bytes")
        fetched = Fetched(sha.hexdigest(), md5.hexdigest(), received, headers)
        if check is not None:
            check(fetched)
    return fetched
