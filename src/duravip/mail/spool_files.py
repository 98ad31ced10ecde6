"""Private, durable files of the spool: modes, fsync of files and directories (no trio).

Queued mail is private: directories 0700 and files 0600 whatever the umask.
A name and its content must survive a crash together, so every new file is
written under a temporary name, fsynced, renamed, and its directory fsynced.
Log lines keep the ``duravip.mail.spool`` logger, as before the split.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "SEGMENT_SUFFIX",
    "TMP_SUFFIX",
    "create_segment_file",
    "fsync_dir",
    "prepare_dirs",
    "private_dir",
    "pwrite_all",
    "seg_path",
    "seg_tmp_path",
    "write_all",
    "write_private_file",
]

log = logging.getLogger("duravip.mail.spool")

SEGMENT_SUFFIX = ".seg"
#: A segment being created or repaired; renamed into place once durable.
TMP_SUFFIX = ".seg.tmp"
DIR_MODE = 0o700
FILE_MODE = 0o600


def seg_path(log_dir: Path, seg: int) -> Path:
    return log_dir / f"{seg:08d}{SEGMENT_SUFFIX}"


def seg_tmp_path(path: Path) -> Path:
    """The temporary name of segment ``path`` while it is created or repaired."""
    return path.with_name(path.name.removesuffix(SEGMENT_SUFFIX) + TMP_SUFFIX)


def private_dir(path: Path) -> bool:
    """Create ``path`` 0700, or tighten it (with a warning) if it is wider; ``True`` if created."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        created = False
    else:
        created = True
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode == DIR_MODE:
        return created
    if not created and mode & 0o077:
        log.warning(
            "spool: %s has mode %04o (queued mail readable by others); tightening to %04o",
            path,
            mode,
            DIR_MODE,
        )
    if created or mode & 0o077:
        try:
            os.chmod(path, DIR_MODE)
        except OSError as exc:
            log.warning("spool: cannot set mode %04o on %s: %s", DIR_MODE, path, exc)
    return created


def prepare_dirs(root: Path, subdirs: Iterable[Path]) -> None:
    """``root`` and its ``subdirs`` private; each new entry made durable in its parent."""
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
    if private_dir(root):
        fsync_dir(root.parent)
    created = [private_dir(d) for d in subdirs]
    if any(created):
        fsync_dir(root)


def create_segment_file(path: Path, head: bytes, preallocate: int = 0) -> int:
    """Make segment ``path`` holding ``head`` durable under its temporary name, rename it
    into place, and return a fd to write it with (``pwrite`` after ``head``): a segment
    file is never half made. ``preallocate``: the file is made that long (zeros after
    ``head``, by ``posix_fallocate``) before it is flushed.

    On error nothing is left behind (a rotation retries the same number).
    """
    if path.exists():
        raise FileExistsError(f"segment {path} already exists")
    tmp = seg_tmp_path(path)
    wfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(wfd, FILE_MODE)
        write_all(wfd, head)
        if preallocate > len(head):
            os.posix_fallocate(wfd, len(head), preallocate - len(head))
        os.fdatasync(wfd)
        os.rename(tmp, path)
        fsync_dir(path.parent)
    except OSError:
        os.close(wfd)
        tmp.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise
    return wfd


def write_private_file(final: Path, content: bytes) -> None:
    """Durably create ``final`` (mode 0600 whatever the umask) via a temporary file.

    The file is fsynced before the rename and the directory after it, so the
    name and the content survive a crash together.
    """
    tmp = final.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            write_all(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` until all of ``data`` is written at ``offset`` (a write may be short)."""
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (a write may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
