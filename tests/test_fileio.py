"""atomic_path: the old file survives a failed write, and no temporary file is left behind."""

from __future__ import annotations

import pytest

from nestvit.fileio import atomic_path


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
