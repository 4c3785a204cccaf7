"""Atomic writes: the old file survives a failed write, no temporary file is left behind, and the new
file gets the mode a plain ``open()`` would give it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nestvit.fileio import atomic_path, atomic_write_text, save_figure


@pytest.mark.parametrize("fsync", [False, True])
def test_atomic_path_replaces_or_keeps(tmp_path, fsync):
    target = tmp_path / "sub" / "weights.bin"
    with atomic_path(target, fsync=fsync) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"first")
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target, fsync=fsync) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["weights.bin"]


def test_a_path_that_cannot_be_written_names_itself_not_the_temporary(tmp_path):
    from nestvit.fileio import UnwritableError

    (tmp_path / "grid.png").write_text("a file")
    with pytest.raises(UnwritableError, match=r"grid.png/g.onnx: cannot be written \(a file is in the way\); "
                                              r"choose a path"):
        atomic_write_text(tmp_path / "grid.png" / "g.onnx", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_atomic_files_get_the_umask_mode(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = atomic_write_text(tmp_path / "sub" / "atomic.txt", "x")
    assert atomic.read_text() == "x"
    assert stat.S_IMODE(atomic.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # not mkstemp's 0600


def test_save_figure_writes_a_png_or_keeps_the_old_one(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = path.read_bytes()

    class Broken:
        def savefig(self, fname, **kwargs):
            Path(fname).write_bytes(b"half a PNG")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_figure(Broken(), path)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]
    plt.close(fig)
