"""Filesystem access under a receiver's target directory that no name or race can escape.

Every path is resolved from an open descriptor of the target root, one component at a time, with
O_NOFOLLOW and O_DIRECTORY: a symlink (or a file) where a directory should be is refused, never
followed. Writes happen through `dir_fd` of the directory found that way. After a write,
`still_there` walks the path again from a freshly opened root and compares device and inode: a
directory swapped for a symlink (or moved away) while we wrote is detected, and the caller
removes what it wrote through the descriptor it still holds.

Also here: the local walk a receiver plans from (lstat only, no following), the temporary file
names, and the case-folding probe.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from ..errors import P2PNodeError
from . import names
from .ignore import IgnoreRules
from .model import DIR, FILE, SYMLINK, file_type
from .planner import LocalState

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(P2PNodeError):
    """A path under the target is not what it must be (a symlink or file in the way, or swapped)."""


def temp_name(leaf: str) -> str:
    """`.p2psync.<leaf>.tmp` in the same directory; a hash of the leaf when that would be too long."""
    name = f"{names.TEMP_PREFIX}{leaf}{names.TEMP_SUFFIX}"
    if len(name.encode("utf-8")) > names.MAX_COMPONENT_BYTES:
        name = f"{names.TEMP_PREFIX}{hashlib.sha256(leaf.encode('utf-8')).hexdigest()[:32]}{names.TEMP_SUFFIX}"
    return name


def local_state(st: os.stat_result, kind: str, target: str = "") -> LocalState:
    size = st.st_size if kind == FILE else 0
    return LocalState(kind, size, stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_uid, st.st_gid, target)


class SafeRoot:
    """An open target directory. Not thread-safe by itself; callers use it from one worker at a time
    or open their own descriptors with `open_dir`."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(self.fd)
        self.dev_ino = (st.st_dev, st.st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_dir(self, dir_name: str, *, root_fd: int | None = None) -> int:
        """A new descriptor of directory `dir_name` ("" = the root), every component O_NOFOLLOW."""
        fd = os.dup(self.fd if root_fd is None else root_fd)
        if not dir_name:
            return fd
        for part in dir_name.split("/"):
            try:
                nfd = os.open(part, O_DIR, dir_fd=fd)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePath(f"{dir_name}: {part!r} is a symlink or a file, not a directory; not followed") from None
                raise
            os.close(fd)
            fd = nfd
        return fd

    def still_there(self, dir_name: str, fd: int) -> bool:
        """Whether `dir_name`, walked again from the root path, is still the directory `fd` holds."""
        try:
            root = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(root)
            if (st.st_dev, st.st_ino) != self.dev_ino:
                return False
            try:
                again = self.open_dir(dir_name, root_fd=root)
            except (UnsafePath, OSError):
                return False
            try:
                a, b = os.fstat(again), os.fstat(fd)
                return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
            finally:
                os.close(again)
        finally:
            os.close(root)

    def open_file(self, name: str, *, temp: bool = False) -> int:
        """A read-only descriptor of regular file `name`, no symlink followed anywhere on the way.
        `temp=True`: `name` is one of our temporary files (a download in progress, whose blocks
        written so far are served to other receivers)."""
        if temp:
            dir_part, _, leaf = name.rpartition("/")
            if not names.is_temp_name(leaf) or "/" in leaf:
                raise UnsafePath(f"{name} is not a sync temporary file")
            dir_name = names.validate(dir_part) if dir_part else ""
        else:
            dir_name, _, leaf = names.validate(name).rpartition("/")
        dfd = self.open_dir(dir_name)
        try:
            fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{name} is a symlink; not followed") from None
            raise
        finally:
            os.close(dfd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath(f"{name} is not a regular file")
        return fd

    # -- reading the local state ----------------------------------------------------------------------
    def walk(self, rules: IgnoreRules) -> tuple[dict[str, LocalState], list[str], list[str]]:
        """(name -> state, temp file names, names we skipped because they cannot be synced names)."""
        states: dict[str, LocalState] = {}
        temps: list[str] = []
        odd: list[str] = []
        stack = [("", os.dup(self.fd))]
        while stack:
            dir_name, fd = stack.pop()
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
                for de in entries:
                    comp = de.name
                    raw = f"{dir_name}/{comp}" if dir_name else comp
                    if names.is_temp_name(comp):
                        temps.append(raw)
                        continue
                    try:
                        name = names.child(dir_name, comp)
                    except names.BadName:
                        odd.append(raw)
                        continue
                    if name != raw:
                        odd.append(raw)  # not NFC here: no source name can mean it
                        continue
                    try:
                        st = de.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    kind = file_type(st.st_mode)
                    if kind is None or rules.ignored(name, kind == DIR):
                        continue
                    target = ""
                    if kind == SYMLINK:
                        try:
                            target = os.readlink(comp, dir_fd=fd)
                        except OSError:
                            continue
                    states[name] = local_state(st, kind, target)
                    if kind == DIR:
                        try:
                            stack.append((name, os.open(comp, O_DIR, dir_fd=fd)))
                        except OSError:
                            continue  # replaced since listed
            finally:
                os.close(fd)
        return states, temps, odd

    def case_insensitive(self) -> bool:
        """Probe the target filesystem: does it find a name by another case?"""
        probe = f"{names.TEMP_PREFIX}CaseProbe{os.getpid()}{names.TEMP_SUFFIX}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self.fd)
        os.close(fd)
        try:
            try:
                os.stat(probe.swapcase(), dir_fd=self.fd, follow_symlinks=False)
                return True
            except FileNotFoundError:
                return False
        finally:
            os.unlink(probe, dir_fd=self.fd)


def read_exact(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, fewer only at the end of the file."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def remove_at(dir_fd: int, leaf: str) -> None:
    """Remove `leaf` inside `dir_fd`, a directory with everything in it; nothing is followed."""
    try:
        st = os.stat(leaf, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(leaf, dir_fd=dir_fd)
        return
    fd = os.open(leaf, O_DIR, dir_fd=dir_fd)
    try:
        for child in os.listdir(fd):
            remove_at(fd, child)
    finally:
        os.close(fd)
    os.rmdir(leaf, dir_fd=dir_fd)
