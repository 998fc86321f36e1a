"""Files every stage writes or checks: folders replaced atomically, and sha256 of a file.

This module sits below every stage (data, train, checkpoint, export) and imports none of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
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


SWAP_KINDS = ("tmp", "old")  # atomic_dir's folders beside a target: the new one being written, the old one


def _sibling(target: Path, kind: str) -> Path:
    # Hidden and unique, so a reader globbing the parent never mistakes it for a real folder and two
    # writers never share one. is_swap_leftover and swap_leftovers below know these names.
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def is_swap_leftover(name: str, target_name: str) -> bool:
    """Whether ``name`` is one of ``atomic_dir``'s folders for a target called ``target_name``
    (``.<target>.tmp-*`` or ``.<target>.old-*``): what a writer killed mid-swap leaves beside it."""
    return name.startswith(tuple(f".{target_name}.{kind}-" for kind in SWAP_KINDS))


def swap_leftovers(parent: Path) -> list[Path]:
    """``atomic_dir``'s folders in ``parent``, whatever their target (delete them only while no
    writer can be swapping there)."""
    return sorted(p for kind in SWAP_KINDS for p in Path(parent).glob(f".*.{kind}-*"))


_RENAME_EXCHANGE = 2  # renameat2's flag, <linux/fs.h>
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE), so no reader ever
    finds neither; False where the system or the filesystem cannot, and the caller renames twice."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - a libc without renameat2 (glibc < 2.28)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(b))


@contextlib.contextmanager
def atomic_dir(target: Path, *, backup: Path | None = None, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends cleanly it becomes ``target``.

    A reader sees the old ``target`` or the new one, never a half-written one. If the block raises
    (Ctrl-C included) the temporary folder is deleted and ``target`` is left as it was.

    ``backup``: where the folder being replaced is kept (a checkpoint's ``<name>.old``). With no
    ``target`` (killed between the two renames last time) the existing backup is the only good copy,
    so it is kept until the new folder has landed; a kill between the renames leaves the backup for
    the reader to fall back on. Without ``backup`` the two folders are swapped in one step where the
    system can (Linux), so ``target`` never goes missing, and the old one is deleted; elsewhere the
    old folder is renamed aside, the new one renamed in (put back if that fails) and the old deleted.

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
        elif target.exists() and _exchange(tmp, target):
            pass  # tmp now holds the old folder: deleted below
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
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder, the old one after an exchange, or gone


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
