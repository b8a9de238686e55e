"""Release directories: atomic `current`, activation order, previous release, pruning, allowed roots."""

from __future__ import annotations

import os

import pytest

from p2pnode.deploy.errors import ReleaseError, RootNotAllowed
from p2pnode.deploy.releases import ACTIVE, ROLLED_BACK, Releases, check_root
from p2pnode.deploy.spec import Application

APP = Application("shop", "api", "prod")


def test_layout_switch_previous_prune(tmp_path):
    rel = Releases(tmp_path, APP)
    assert rel.current() is None and rel.previous() is None
    for v in ("1", "2", "3"):
        path = rel.create(v, f"d{v}", {"v": v})
        assert path == tmp_path / "releases/shop/api/prod" / v and path.is_dir()
        rel.activate(v)
    assert os.readlink(rel.current_link) == "3" and rel.current() == "3"
    assert not list(rel.dir.glob(".current.tmp-*"))
    assert rel.previous().version == "2" and rel.get("1").command == {"v": "1"}
    with pytest.raises(ReleaseError, match="release 2 of shop/api/prod already exists"):
        rel.create("2", "again", {})
    # a rollback leaves 3 (kept, marked) and makes 2 current; previous skips the rolled-back one
    rel.mark_rolled_back("3")
    rel.activate("2")
    assert rel.current() == "2" and rel.get("3").state == ROLLED_BACK and rel.previous().version == "1"
    rel.activate("3")  # a named rollback back to 3 makes it active again
    assert rel.get("3").state == ACTIVE and rel.previous().version == "2"
    with pytest.raises(ReleaseError, match="is current"):
        rel.discard("3")
    rel.create("4", "d4", {})
    assert rel.prune(3, protect=["4"]) == ["1"]
    assert sorted(p.name for p in rel.dir.iterdir() if not p.name.startswith(".")) == ["2", "3", "4", "current"]
    assert rel.prune(1, protect=["4"]) == ["2"]  # never current (3) nor the protected new one
    rel.discard("4")
    assert not (rel.dir / "4").exists() and rel.get("4") is None
    with pytest.raises(ReleaseError, match="does not exist"):
        rel.activate("9")


def test_current_that_is_not_a_symlink(tmp_path):
    rel = Releases(tmp_path, APP)
    rel.create("1", "d1", {})
    (rel.dir / "current").mkdir()
    with pytest.raises(ReleaseError, match="not a symlink"):
        rel.current()


def test_allowed_roots(tmp_path):
    allowed = tmp_path / "apps"
    allowed.mkdir()
    assert check_root(allowed / "shop", [allowed]) == allowed / "shop"
    assert check_root(allowed, [allowed]) == allowed
    with pytest.raises(RootNotAllowed, match=r"application root /etc is outside this node's deploy.allowed_roots"):
        check_root("/etc", [allowed])
    with pytest.raises(RootNotAllowed, match="outside"):
        check_root(str(allowed) + "2", [allowed])  # a sibling with the same prefix
    with pytest.raises(RootNotAllowed, match="outside"):
        check_root(allowed / ".." / "x", [allowed])
    sneaky = allowed / "link"
    sneaky.symlink_to("/etc")
    with pytest.raises(RootNotAllowed, match="outside"):
        check_root(sneaky, [allowed])  # resolved before the check
    with pytest.raises(RootNotAllowed, match="'deploy.allowed_roots' is empty"):
        check_root(allowed, [])
