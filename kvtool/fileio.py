"""Atomic file writes: write a temporary file beside the target, fsync, rename. Nothing half-written is ever seen.

Temporary files are named `.<target name>.kvtool-<pid>-<8 hex>.tmp`. A failed or interrupted write (any exception,
Ctrl-C, SIGTERM: the CLI turns SIGTERM into an exception) removes its own; one left by a killed process (SIGKILL,
power loss) is swept by the next write into the same directory once its process is gone (`sweep_stale`).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable

from kvtool.errors import KvtoolError

_TMP = re.compile(r"^\..+\.kvtool-(\d+)-[0-9a-f]{8}\.tmp$")
_STALE_AGE_S = 6 * 3600     # a temporary file this old is stale even if its pid now belongs to another process


def temp_name(name: str) -> str:
    """`.<name>.kvtool-<pid>-<random>.tmp`: hidden, ours, and naming the process that owns it."""
    return f".{name}.kvtool-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:       # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def is_stale(path: Path, pid: int) -> bool:
    """A temporary file or directory of ours whose writer is gone (dead pid) or that is older than 6 hours."""
    if pid == os.getpid():
        return False
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return not _pid_alive(pid) or age > _STALE_AGE_S


def sweep_stale(directory: str | os.PathLike, pattern: re.Pattern = _TMP) -> list[Path]:
    """Remove temporary files/directories of ours in `directory` left by killed processes; return what was removed.

    Only names matching `pattern` (whose first group is the owning pid) are considered; errors are ignored (a
    read-only directory, a file removed concurrently)."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or not is_stale(entry, int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, else its type name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)`, then move the result to `path`; on any failure remove it and leave `path` untouched.

    Any exception of `write` (an OSError such as ENOSPC, a safetensors or matplotlib error) becomes a one-line
    KvtoolError; KeyboardInterrupt and other BaseExceptions pass through after the temporary file is removed.
    The file gets ordinary permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise KvtoolError(f"cannot write {path}: directory {path.parent} does not exist")
    if path.is_dir():
        raise KvtoolError(f"cannot write {path}: it is a directory")
    sweep_stale(path.parent)
    tmp = str(path.parent / temp_name(path.name))
    umask = os.umask(0)
    os.umask(umask)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask)
    except OSError as exc:
        raise KvtoolError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except KvtoolError:
        raise
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        if exc.errno == errno.ENOSPC:
            reason = "no space left on device"
        raise KvtoolError(f"cannot write {path}: {reason}") from None
    except Exception as exc:      # safetensors' SafetensorError, matplotlib, ...: whatever the writer raised
        raise KvtoolError(f"cannot write {path}: {first_line(exc)}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def write_bytes(data: bytes) -> Callable[[str], None]:
    """A writer for `atomic_write` that writes `data` with plain file I/O (no helper temporary files)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return write


def atomic_write_files(directory: str | os.PathLike, files: dict[str, bytes]) -> list[Path]:
    """Write several files `{name: bytes}` into `directory` so that they appear together or not at all.

    A new directory is built as a temporary directory beside it and renamed into place; in an existing directory
    every file is first written to a temporary file, and only when all are written are they renamed over the old
    ones. Errors are one-line KvtoolErrors; nothing of ours is left behind on failure."""
    directory = Path(directory)
    parent = directory.parent
    if directory.exists() and not directory.is_dir():
        raise KvtoolError(f"cannot write into {directory}: it is a file, not a directory")
    if not parent.is_dir():
        raise KvtoolError(f"cannot write {directory}: {parent} "
                          f"{'is not a directory' if parent.exists() else 'does not exist'}")
    for name in files:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"bad file name {name!r}")
    target = directory if directory.is_dir() else parent
    if not os.access(target, os.W_OK):
        raise KvtoolError(f"cannot write into {directory}: directory {target} is not writable")
    sweep_stale(target)
    made: list[str] = []
    try:
        if directory.is_dir():
            staged = {}
            for name, data in files.items():
                tmp = str(directory / temp_name(name))
                made.append(tmp)
                _write_synced(tmp, data)
                staged[name] = tmp
            for name, tmp in staged.items():
                os.replace(tmp, directory / name)
        else:
            tmpdir = str(parent / temp_name(directory.name))
            os.mkdir(tmpdir)
            made.append(tmpdir)
            for name, data in files.items():
                _write_synced(os.path.join(tmpdir, name), data)
            os.rename(tmpdir, directory)
    except OSError as exc:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or first_line(exc))
        raise KvtoolError(f"cannot write into {directory}: {reason}") from None
    finally:
        for tmp in made:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.lexists(tmp):
                os.unlink(tmp)
    return [directory / name for name in files]


def _write_synced(path: str, data: bytes) -> None:
    umask = os.umask(0)
    os.umask(umask)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
