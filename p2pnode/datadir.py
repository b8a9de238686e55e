"""The data dir: created if missing (0700), refused with one plain line when it cannot be used,
and locked so that only one p2pnode process uses it at a time.

The lock is an exclusive `flock` on `<data dir>/lock`, held for as long as the process runs
the node; the kernel releases it when the process exits, however it exits, so a stale lock
file is harmless and is never deleted. The file holds the holder's pid, for the message the
second process prints. Within one process the lock is re-entrant (the CLI holds it around the
node and the node may take it again); two processes cannot both hold it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import P2PNodeError

LOCK_NAME = "lock"


class DataDirError(P2PNodeError):
    """A data dir that cannot be used: not a directory, not writable, on a read-only disk."""


class DataDirInUse(DataDirError):
    """Another process holds the data dir's lock."""

    def __init__(self, path: Path, pid: int | None):
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "a process whose pid is not recorded"
        super().__init__(f"data dir {path} is in use by another p2pnode ({holder}); stop it first, or use another --data-dir")


def prepare(path: str | os.PathLike[str]) -> Path:
    """Create the data dir (mode 0700) if it does not exist and check that it is a directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise DataDirError(f"data dir {path} exists and is not a directory") from None
    except NotADirectoryError:
        raise DataDirError(f"data dir {path} cannot be created: {_file_in_the_way(path)} is a file, not a directory") from None
    except OSError as exc:
        raise DataDirError(f"data dir {path} cannot be created: {_reason(exc, path)}") from None
    return path


@contextlib.contextmanager
def lock(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Prepare the data dir and hold its lock for the block; DataDirInUse if another process holds it."""
    path = prepare(path)
    lock_path = path / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DataDirError(f"data dir {path} is not usable: cannot create {lock_path.name} in it: {_reason(exc, path)}") from None
    try:
        key = _key(fd)
        with _held_lock:
            count = _held.get(key, 0)
            if count == 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise DataDirInUse(path, _read_pid(fd)) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                _fds[key] = fd
                fd = -1  # kept open while held: closing it would release the lock
            _held[key] = count + 1
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        yield path
    finally:
        with _held_lock:
            _held[key] -= 1
            if _held[key] == 0:
                del _held[key]
                os.close(_fds.pop(key))  # releases the flock


# Locks this process holds, by the lock file's (device, inode): re-entrancy without a second fd,
# since a second flock on a new fd of the same file would conflict with the first.
_held: dict[tuple[int, int], int] = {}
_fds: dict[tuple[int, int], int] = {}
_held_lock = threading.Lock()


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _file_in_the_way(path: Path) -> Path:
    """The nearest ancestor of `path` that exists (the regular file mkdir tripped over)."""
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return path


def _reason(exc: OSError, path: Path) -> str:
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno == errno.ENOSPC:
        return "the disk is full"
    if exc.errno in (errno.EACCES, errno.EPERM):
        owner = _owner(path)
        hint = f" (it belongs to {owner}; run as that user)" if owner is not None and owner != _me() else ""
        return f"permission denied{hint}"
    return exc.strerror or str(exc)


def _owner(path: Path) -> str | None:
    for candidate in (path, *path.absolute().parents):
        try:
            uid = candidate.stat().st_uid
        except OSError:
            continue
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"
    return None


def _me() -> str | None:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
