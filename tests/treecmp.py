"""Compare two directory trees the way a sync must reproduce them: type, content, mode, mtime,
owner, symlink target. Nothing is followed. Used by the sync tests (and later multi-node tests)."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(
    root: str | os.PathLike[str], *, skip: Callable[[str], bool] = lambda name: False
) -> dict[str, dict[str, object]]:
    """name -> {type, mode, mtime_ns, uid, gid, size, sha256 | target} for everything below root."""
    out: dict[str, dict[str, object]] = {}
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for leaf in sorted(dirnames + filenames):
            path = os.path.join(dirpath, leaf)
            name = os.path.relpath(path, base)
            if skip(name):
                if leaf in dirnames:
                    dirnames.remove(leaf)
                continue
            st = os.lstat(path)
            item: dict[str, object] = {"mode": stat.S_IMODE(st.st_mode), "mtime_ns": st.st_mtime_ns, "uid": st.st_uid, "gid": st.st_gid}
            if stat.S_ISLNK(st.st_mode):
                item.update(type="symlink", target=os.readlink(path))
                if leaf in dirnames:  # os.walk lists a symlink to a directory as a directory; never enter it
                    dirnames.remove(leaf)
            elif stat.S_ISDIR(st.st_mode):
                item.update(type="dir")
            elif stat.S_ISREG(st.st_mode):
                item.update(type="file", size=st.st_size, sha256=_digest(path))
            else:
                item.update(type="other")
            out[name] = item
    return out


def differences(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    mode: bool = True,
    mtime: bool = True,
    owner: bool = False,
    skip: Callable[[str], bool] = lambda name: False,
) -> list[str]:
    """Human-readable differences between tree a and tree b (empty when they match)."""
    sa, sb = snapshot(a, skip=skip), snapshot(b, skip=skip)
    out = [f"only in {a}: {n}" for n in sorted(sa.keys() - sb.keys())]
    out += [f"only in {b}: {n}" for n in sorted(sb.keys() - sa.keys())]
    for name in sorted(sa.keys() & sb.keys()):
        x, y = sa[name], sb[name]
        keys = ["type", "size", "sha256", "target"]
        if mode and x["type"] != "symlink":
            keys.append("mode")
        if mtime:
            keys.append("mtime_ns")
        if owner:
            keys += ["uid", "gid"]
        for k in keys:
            if x.get(k) != y.get(k):
                shown = (oct(x.get(k)), oct(y.get(k))) if k == "mode" else (x.get(k), y.get(k))  # type: ignore[arg-type]
                out.append(f"{name}: {k} {shown[0]} != {shown[1]}")
    return out


def assert_same_tree(a: str | os.PathLike[str], b: str | os.PathLike[str], **kw: object) -> None:
    diffs = differences(a, b, **kw)  # type: ignore[arg-type]
    assert not diffs, "trees differ:\n  " + "\n  ".join(diffs[:50])


def tree_names(root: str | os.PathLike[str]) -> set[str]:
    return set(snapshot(Path(root)))
