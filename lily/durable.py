"""Durable files: written in full and synced before they count, put in place by one atomic rename, their
directory synced after. Adapter saves (`lily.io`) and run folders (`lily.train.outputs`) write through these."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Make the content of file `path` durable (Windows needs a writable handle to flush it)."""
    fd = os.open(path, os.O_RDONLY if os.name == "posix" else os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (new files, renames) durable; a no-op where directories cannot be opened."""
    if os.name == "posix":
        fsync_file(directory)


def write_new(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with the default mode (0o666 minus the umask), write `data`, fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, prefix: str = ".") -> Path:
    """A fresh name beside `path` for its temporary file: `<prefix><name>.<random>.tmp`."""
    return path.with_name(f"{prefix}{path.name}.{secrets.token_hex(8)}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by a file holding `data`, all or nothing: a synced temporary file renamed over it (removed
    if anything fails), then the directory synced."""
    temp = temp_name(path)
    try:
        write_new(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
