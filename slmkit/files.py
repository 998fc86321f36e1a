"""Files every stage writes or checks: folders replaced atomically, and sha256 of a file.

This module sits below every stage (data, train, checkpoint, export) and imports none of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename is durable only once its folder is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse to open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sibling(target: Path, kind: str) -> Path:
    # Hidden and unique, so a reader globbing the parent never mistakes it for a real folder and two
    # writers never share one; ``.<name>.tmp-*`` is also what checkpoint.remove_stale_temps deletes.
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_dir(target: Path, *, backup: Path | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends cleanly it becomes ``target``.

    A reader sees the old ``target`` or the new one, never a half-written one. If the block raises
    (Ctrl-C included) the temporary folder is deleted and ``target`` is left as it was.

    ``backup``: where the folder being replaced is kept (a checkpoint's ``<name>.old``). With no
    ``target`` (killed between the two renames last time) the existing backup is the only good copy,
    so it is kept until the new folder has landed; a kill between the renames leaves the backup for
    the reader to fall back on. Without ``backup`` the old folder is deleted once the new one is in
    place, and put back if that rename fails.

    ``durable``: fsync the files, the folder and its parent, so the swap survives a power cut.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if durable:
            for path in sorted(tmp.iterdir()):
                if path.is_file():
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            fsync_dir(tmp)
        if backup is not None:
            if target.exists():
                if backup.exists():
                    shutil.rmtree(backup)
                os.replace(target, backup)
            os.replace(tmp, target)
        else:
            old = None
            if target.exists():
                old = _sibling(target, "old")
                os.replace(target, old)
            try:
                os.replace(tmp, target)
            except OSError:
                if old is not None:
                    os.replace(old, target)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        if durable:
            fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` to write one file to; when the block ends cleanly
    it replaces ``target`` (a reader sees the old file or the new one), else it is deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
