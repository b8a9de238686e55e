"""Safe extraction of a tar.gz into an empty release directory.

Refused, each with the entry's name and the reason: absolute names, `..` components, devices,
fifos and other special files, setuid/setgid bits, hard links whose target is not a regular file
extracted earlier from the same archive, symbolic links whose target (absolute, or resolved
through the archive's other symlinks) leaves the release directory, duplicate entries, and archives
beyond the entry-count and total-size limits. We write every file ourselves (never
`TarFile.extract`): no ownership from the archive, permissions masked to 0o777, files opened
with O_EXCL|O_NOFOLLOW. Symbolic links are created last, after every path has been written, so
nothing is ever written through a link. The caller deletes the directory when this raises.
Blocking: run in a thread.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import attrs

from .errors import UnsafeArchive

CHUNK = 1024 * 1024
MAX_LINK_HOPS = 40


@attrs.frozen
class TarLimits:
    max_entries: int = 100_000
    max_total_bytes: int = 8 * 1024**3
    max_name_len: int = 4096


@attrs.frozen
class ExtractResult:
    entries: int
    files: int
    bytes: int


class _Counting:
    """Wraps the compressed file to report how far through it the reader is."""

    def __init__(self, raw: IO[bytes], total: int, progress: Callable[[int, int], None] | None):
        self.raw, self.total, self.progress, self.done = raw, total, progress, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.done += len(data)
        if self.progress is not None:
            self.progress(self.done, self.total)
        return data


def _clean_name(name: str, limits: TarLimits) -> str:
    if len(name) > limits.max_name_len:
        raise UnsafeArchive(name[:80] + "…", f"name longer than {limits.max_name_len} characters")
    if name.startswith("/"):
        raise UnsafeArchive(name, "absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(name, "path escapes the release directory ('..' component)")
    return "/".join(parts)


def _resolve_link(path: str, target: str, links: dict[str, str]) -> None:
    """Raise unless `target` of the symlink at `path`, followed through the archive's symlinks, stays inside."""
    if target.startswith("/"):
        raise UnsafeArchive(path, f"symbolic link to an absolute path ({target}) leaves the release directory")
    hops = 0

    def walk(base: list[str], rel: str) -> list[str]:
        nonlocal hops
        out = list(base)
        for comp in rel.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not out:
                    raise UnsafeArchive(path, f"symbolic link to {target!r} leaves the release directory")
                out.pop()
                continue
            out.append(comp)
            key = "/".join(out)
            if key in links:
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise UnsafeArchive(path, "symbolic links loop")
                nested = links[key]
                if nested.startswith("/"):
                    raise UnsafeArchive(path, f"symbolic link chain reaches an absolute path ({nested})")
                out = walk(out[:-1], nested)
        return out

    walk(path.split("/")[:-1], target)


def _write_file(dest: Path, name: str, src: IO[bytes], size: int, mode: int) -> int:
    fd = os.open(dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    written = 0
    try:
        while written < size:
            chunk = src.read(min(CHUNK, size - written))
            if not chunk:
                raise UnsafeArchive(name, "archive ends inside this file (truncated)")
            os.write(fd, chunk)
            written += len(chunk)
        os.fchmod(fd, mode & 0o777)
    finally:
        os.close(fd)
    return written


def extract(archive: str | os.PathLike[str], dest: str | os.PathLike[str], limits: TarLimits = TarLimits(),
            progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Extract the gzip-compressed tar `archive` into the empty directory `dest`.

    `progress(compressed_bytes_read, compressed_total)` is called as the archive is read."""
    dest = Path(dest)
    total = os.path.getsize(archive)
    seen: set[str] = set()
    links: dict[str, str] = {}  # symlinks, created once every other entry is in place
    dir_modes: dict[str, int] = {}
    entries = files = written = 0
    with open(archive, "rb") as raw:
        counting = _Counting(raw, total, progress)
        try:
            tf = tarfile.open(fileobj=counting, mode="r|gz")  # type: ignore[call-overload]
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UnsafeArchive("(archive)", f"not a gzip-compressed tar file ({exc})") from None
        try:
            for member in tf:
                entries += 1
                if entries > limits.max_entries:
                    raise UnsafeArchive(member.name, f"more than {limits.max_entries} entries")
                name = _clean_name(member.name, limits)
                if not name:
                    continue  # the archive's root directory itself
                if member.mode & (stat.S_ISUID | stat.S_ISGID):
                    raise UnsafeArchive(member.name, f"setuid/setgid bit set (mode {member.mode:o})")
                if member.ischr() or member.isblk():
                    raise UnsafeArchive(member.name, "device file")
                if member.isfifo():
                    raise UnsafeArchive(member.name, "fifo")
                if member.issparse() or not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                    raise UnsafeArchive(member.name, f"unsupported entry type {member.type!r}")
                if name in seen and not (member.isdir() and name in dir_modes):
                    raise UnsafeArchive(member.name, "duplicate entry")
                seen.add(name)
                parent = name.rpartition("/")[0]
                if parent and any(p in links for p in _prefixes(parent)):
                    raise UnsafeArchive(member.name, "path goes through a symbolic link in the archive")
                if parent:
                    (dest / parent).mkdir(parents=True, exist_ok=True)
                if member.isdir():
                    (dest / name).mkdir(exist_ok=True)
                    dir_modes[name] = member.mode & 0o777
                elif member.issym():
                    _resolve_link(name, member.linkname, links)
                    links[name] = member.linkname
                elif member.islnk():
                    target = _clean_name(member.linkname, limits)
                    if target in links or not (dest / target).is_file() or (dest / target).is_symlink():
                        raise UnsafeArchive(member.name, f"hard link to {member.linkname!r}, which is not a regular file "
                                                         "extracted earlier from this archive")
                    os.link(dest / target, dest / name, follow_symlinks=False)
                    files += 1
                else:
                    if os.path.lexists(dest / name):
                        raise UnsafeArchive(member.name, "file conflicts with a directory of the same name")
                    if written + member.size > limits.max_total_bytes:
                        raise UnsafeArchive(member.name, f"archive expands beyond {limits.max_total_bytes} bytes")
                    src = tf.extractfile(member)
                    assert src is not None
                    written += _write_file(dest, name, src, member.size, member.mode)
                    files += 1
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise UnsafeArchive("(archive)", f"extraction failed ({exc})") from None
        finally:
            tf.close()
    for name, target in links.items():
        _resolve_link(name, target, links)  # again, now that every link in the archive is known
        if name in dir_modes or (dest / name).exists():
            raise UnsafeArchive(name, "symbolic link conflicts with another entry of the same name")
        os.symlink(target, dest / name)
    for name, mode in sorted(dir_modes.items(), reverse=True):
        os.chmod(dest / name, mode | 0o700)  # the node must still be able to clean it up
    return ExtractResult(entries, files, written)


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]
