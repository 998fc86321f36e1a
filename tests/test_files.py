"""slmkit.files: the atomic folder swap every writer uses, and sha256."""

import hashlib
import os

import pytest

from slmkit.files import atomic_dir, atomic_file, sha256_file


def test_sha256_file_matches_hashlib_across_blocks(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom((1 << 20) + 123)  # more than one read block
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_replaces_the_old_folder_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        assert (target / "old.txt").exists()  # untouched while the new one is written
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_write_keeps_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def refuse_new(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename refused")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_new)
    with pytest.raises(OSError, match="rename refused"):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_backup_keeps_the_replaced_folder(tmp_path):
    target, backup = tmp_path / "last", tmp_path / "last.old"
    for step in ("1", "2", "3"):
        with atomic_dir(target, backup=backup, durable=True) as tmp:
            (tmp / "step").write_text(step)
    assert (target / "step").read_text() == "3"
    assert (backup / "step").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last.old"]


def test_backup_is_kept_when_the_target_is_missing(tmp_path):
    """Killed between the renames last time: the backup is the only good copy and must survive."""
    target, backup = tmp_path / "last", tmp_path / "last.old"
    backup.mkdir()
    (backup / "step").write_text("1")
    with atomic_dir(target, backup=backup) as tmp:
        (tmp / "step").write_text("2")
    assert (target / "step").read_text() == "2"
    assert (backup / "step").read_text() == "1"


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.tmp-")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # untouched while the new one is written
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
