"""Atomic file writes: write a temporary file beside the target, fsync, rename. Nothing half-written is ever seen."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from kvtool.errors import KvtoolError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then move the result to `path`; on any failure remove it and leave `path` untouched.

    The file gets ordinary permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise KvtoolError(f"cannot write {path}: directory {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise KvtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise KvtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
