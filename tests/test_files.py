"""scm.files: the one atomic writer. A file or folder appears complete or not at all, what is written is fsynced
before the rename and the folder after it, a failed write leaves the old content and no temporary behind, and no
other module of the library renames or writes files by itself."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from scm.files import atomic_folder, atomic_write, atomic_write_json

SRC = Path(__file__).resolve().parents[1] / "src" / "scm"


@pytest.fixture
def synced(monkeypatch):
    """The paths os.fsync was called on, in order."""
    calls = []
    real = os.fsync

    def spy(fd):
        calls.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_atomic_write_bytes_text_and_writer_functions(tmp_path, synced):
    target = tmp_path / "a" / "b.bin"
    atomic_write(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert synced[-1] == target.parent  # the folder, after the rename (the file itself before it)
    assert any(p.name.startswith(".b.tmp-") for p in synced[:-1])
    atomic_write(target, "é")
    assert target.read_text() == "é"
    arrays = tmp_path / "x.npz"  # a writer that wants its own suffix keeps it (np.savez appends ".npz" otherwise)
    atomic_write(arrays, lambda p: np.savez(p, x=np.arange(3)))
    with np.load(arrays) as z:
        assert z["x"].tolist() == [0, 1, 2]
    atomic_write_json(tmp_path / "c.json", {"k": [1, 2]})
    assert (tmp_path / "c.json").read_text() == '{\n  "k": [\n    1,\n    2\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "c.json", "x.npz"]  # no temporaries


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def half_then_fail(path):
        Path(path).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_folder_publishes_whole_or_not_at_all(tmp_path, synced):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")  # written by a library, not fsynced by it
        assert not out.exists()
    assert (out / "sub" / "w.bin").read_bytes() == b"w"
    assert any(p.name == "w.bin" for p in synced) and synced[-1] == tmp_path
    with pytest.raises(FileExistsError), atomic_folder(out) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in out.rglob("*")) == ["sub", "w.bin"]
    with pytest.raises(RuntimeError, match="boom"), atomic_folder(tmp_path / "new") as tmp:
        (tmp / "x").write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "empty").mkdir()  # an empty folder is replaced; a full one only on request
    with atomic_folder(tmp_path / "empty") as tmp:
        (tmp / "y").write_text("y")
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "z").write_text("z")
    assert [p.name for p in out.iterdir()] == ["z"] and (tmp_path / "empty" / "y").is_file()


def test_no_other_module_writes_files_by_itself():
    """Every file the library writes goes through scm.files (checkpoints, snapshots, prepared data's metadata, PNGs,
    JSON, statistics, exports); appending log lines and filling a prepared set's preallocated arrays are the
    exceptions, and rename/replace appear nowhere else."""
    for path in SRC.rglob("*.py"):
        if path.name == "files.py":
            continue
        text = path.read_text()
        renames = r"os\.replace|os\.rename|\.rename\(|\.replace\(path|write_text\(|write_bytes\("
        assert not re.search(renames, text), path
        writers = r"\bsave_file\(|\.savefig\(|\.save_pretrained\(|np\.savez"
        assert not re.search(writers, text) or "atomic_" in text, path
