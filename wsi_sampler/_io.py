"""Atomic, durable file output: write a temporary sibling, fsync it, rename it over the
target, fsync the folder. A crash or power cut leaves the old file or the new one, never
an empty or partial one. New files get the usual permissions (0666 less the umask), like
any file the process would create, so shared folders and non-root containers can read them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidRequestError, StorageFullError

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "disk_full_is_an_error",
           "process_umask", "require_free_space", "require_writable_folder"]

_FULL = (errno.ENOSPC, errno.EDQUOT)


def require_free_space(folder: str | os.PathLike[str], needed_bytes: int, what: str) -> None:
    """Refuse work that would not fit: StorageFullError unless ``folder``'s file system has
    ``needed_bytes`` free."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise StorageFullError(
            f"not enough free disk space for {what}: {needed_bytes / 2**20:,.0f} MiB needed, "
            f"{free / 2**20:,.0f} MiB free; free some space or give the service a larger "
            "volume")


def require_writable_folder(folder: str | os.PathLike[str], what: str) -> None:
    """Create ``folder`` if missing and check this process can write there; otherwise an
    InvalidRequestError naming the folder, the process's user and the usual fixes (a
    container's bind mount of a folder the engine created as root is the common case)."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except PermissionError:
        uid, gid = getattr(os, "getuid", lambda: -1)(), getattr(os, "getgid", lambda: -1)()
        raise InvalidRequestError(
            f"{what} {path} is not writable by this process (uid {uid}, gid {gid}): a bind "
            f"mount needs a host folder that user owns (chown {uid}:{gid} FOLDER), or use a "
            "named volume") from None


@contextlib.contextmanager
def disk_full_is_an_error(what: str) -> Iterator[None]:
    """Turn "no space left on device" (or over quota) while writing ``what`` into a
    StorageFullError that says so."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL or isinstance(exc, StorageFullError):
            raise
        raise StorageFullError(f"the disk filled up while writing {what}; free some space "
                               "or give the service a larger volume") from exc


@functools.cache
def process_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere set+restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not Linux: once, at first use
    os.umask(mask)
    return mask


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # a folder that cannot be opened (some network file systems)
        return
    try:
        os.fsync(fd)
    except OSError:  # fsync unsupported on this file system: nothing more we can do
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` on success.

    On any error the temporary file is removed and ``target`` is left untouched, so a
    reader never sees a half-written file.
    """
    dest = Path(target)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp made it 0600
        _fsync_path(tmp)
        os.replace(tmp, dest)
        _fsync_path(dest.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | os.PathLike[str], text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
