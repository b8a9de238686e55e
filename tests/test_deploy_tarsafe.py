"""Safe extraction: good archives land intact; every kind of escape is refused with its reason."""

from __future__ import annotations

import os
import stat

import pytest
from deploykit import make_tar

from p2pnode.deploy.errors import UnsafeArchive
from p2pnode.deploy.tarsafe import TarLimits, extract


@pytest.fixture
def place(tmp_path):
    def run(entries, limits=TarLimits(), raw: bytes | None = None):
        archive = tmp_path / "a.tar.gz"
        archive.write_bytes(raw if raw is not None else make_tar(entries))
        dest = tmp_path / "outer" / "release"
        dest.mkdir(parents=True, exist_ok=True)
        seen: list[tuple[int, int]] = []
        result = extract(archive, dest, limits, lambda done, total: seen.append((done, total)))
        return dest, result, seen
    return run


def test_good_archive(place):
    dest, result, seen = place([
        ("./", ("dir",)), ("bin/", ("dir",)), ("bin/app", ("exec", b"#!/bin/sh\necho hi\n")), ("conf/app.ini", b"a=1\n"),
        ("lib", ("sym", "bin")), ("conf/up", ("sym", "../bin/app")), ("conf/copy.ini", ("hard", "conf/app.ini")),
        ("data/ro/", ("dir",)), ("data/ro/file", ("mode", b"x", 0o1644)),
    ])
    assert (dest / "bin/app").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((dest / "bin/app").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "data/ro/file").stat().st_mode) == 0o644  # sticky bit dropped
    assert os.readlink(dest / "lib") == "bin" and (dest / "lib/app").is_file()
    assert (dest / "conf/up").read_bytes().startswith(b"#!/bin/sh")
    assert (dest / "conf/copy.ini").stat().st_ino == (dest / "conf/app.ini").stat().st_ino
    assert result.files == 4 and result.bytes == len(b"#!/bin/sh\necho hi\n") + 4 + 1
    assert seen and seen[-1][0] == seen[-1][1]  # progress reaches the whole compressed size


@pytest.mark.parametrize("entries, entry, reason", [
    ([("../evil", b"x")], "../evil", "'..' component"),
    ([("ok/../../evil", b"x")], "ok/../../evil", "'..' component"),
    ([("/etc/evil", b"x")], "/etc/evil", "absolute path"),
    ([("link", ("sym", "../../etc"))], "link", "leaves the release directory"),
    ([("link", ("sym", "/etc/passwd"))], "link", "absolute path (/etc/passwd)"),
    # each link stays inside on its own; followed through the first, the second leaves
    ([("a/b/", ("dir",)), ("a/p", ("sym", "..")), ("a/b/e", ("sym", "../p/../.."))], "a/b/e", "leaves the release directory"),
    # the same, with the link that makes it escape arriving after the one that uses it
    ([("a/b/", ("dir",)), ("a/b/e", ("sym", "q/../../..")), ("a/b/q", ("sym", "../.."))], "a/b/e", "leaves the release directory"),
    ([("d", ("sym", "sub")), ("d/x", b"x")], "d/x", "goes through a symbolic link"),
    ([("h", ("hard", "/etc/passwd"))], "/etc/passwd", "absolute path"),
    ([("h", ("hard", "../outside"))], "../outside", "'..' component"),
    ([("h", ("hard", "missing"))], "h", "not a regular file extracted earlier"),
    ([("s", ("sym", "f")), ("h", ("hard", "s"))], "h", "not a regular file extracted earlier"),
    ([("dev/null", ("chr",))], "dev/null", "device file"),
    ([("pipe", ("fifo",))], "pipe", "fifo"),
    ([("bin/su", ("mode", b"x", 0o4755))], "bin/su", "setuid/setgid bit"),
    ([("bin/sg", ("mode", b"x", 0o2755))], "bin/sg", "setuid/setgid bit"),
    ([("f", b"1"), ("f", b"2")], "f", "duplicate entry"),
    ([("x/y", b"1"), ("x", b"2")], "x", "conflicts with a directory"),
    ([("x/y", b"1"), ("x", ("sym", "z"))], "x", "conflicts with another entry"),
])
def test_refused(place, tmp_path, entries, entry, reason):
    with pytest.raises(UnsafeArchive) as info:
        place(entries)
    assert info.value.entry == entry and reason in info.value.reason, str(info.value)
    assert str(info.value).startswith(f"archive entry {entry!r}: ")
    outside = sorted(p.name for p in (tmp_path / "outer").iterdir())
    assert outside == ["release"]  # nothing was written beside the release
    assert not (tmp_path / "evil").exists()


def test_limits(place):
    with pytest.raises(UnsafeArchive, match="more than 3 entries"):
        place([(f"f{i}", b"x") for i in range(5)], TarLimits(max_entries=3))
    with pytest.raises(UnsafeArchive, match="expands beyond 10 bytes"):
        place([("a", b"12345"), ("b", b"1234567")], TarLimits(max_total_bytes=10))
    with pytest.raises(UnsafeArchive, match="longer than 20 characters"):
        place([("d" * 30, b"x")], TarLimits(max_name_len=20))


def test_not_a_tarball_and_truncated(place):
    with pytest.raises(UnsafeArchive, match="not a gzip-compressed tar file"):
        place([], raw=b"plain text, not gzip")
    whole = make_tar([("big", os.urandom(200_000))])
    with pytest.raises(UnsafeArchive, match="archive"):
        place([], raw=whole[: len(whole) // 2])
