"""resnet_jax.runtime.files: all or nothing, ordinary permissions, one line for every refusal."""

import errno
import os

import pytest

from resnet_jax.runtime.errors import UserError
from resnet_jax.runtime.files import atomic_write, make_folder, remove_stale_temporaries


def test_atomic_write_replaces_or_keeps_the_old_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["weights.bin"]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["weights.bin"]


def test_atomic_write_uses_the_umask_like_open(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_refusals_of_the_file_system_are_one_line_user_errors(tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    folder = pytest.raises(UserError, match=r"folder: it is a folder; give a file name\.$")
    with folder, atomic_write(tmp_path / "folder") as f:
        f.write(b"x")
    (tmp_path / "file").write_bytes(b"")
    parent_is_a_file = pytest.raises(UserError, match="part of its folder path is a file")
    with parent_is_a_file, atomic_write(tmp_path / "file" / "out.json", "w") as f:
        f.write("{}")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    target = tmp_path / "best.msgpack"
    target.write_bytes(b"old")
    full = pytest.raises(UserError, match=r"Cannot write .*best.msgpack: the disk is full")
    with full, atomic_write(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["best.msgpack", "file", "folder"]


def test_the_callers_own_errors_pass_through(tmp_path):
    with pytest.raises(ConnectionResetError), atomic_write(tmp_path / "download.pth"):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    stale = tmp_path / ".best.msgpack.k2j4_x9a.tmp"
    stale.write_bytes(b"half")
    mine = tmp_path / ".notes.tmp"  # not written by atomic_write: kept
    mine.write_text("keep")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp"]


def test_make_folder_creates_parents_and_refuses_in_one_line(tmp_path):
    make_folder(tmp_path / "a" / "b")
    make_folder(tmp_path / "a" / "b")  # already there: nothing to do
    assert (tmp_path / "a" / "b").is_dir()
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(UserError, match="part of its folder path is a file") as error:
        make_folder(tmp_path / "plain" / "sub")
    assert "\n" not in str(error.value)
