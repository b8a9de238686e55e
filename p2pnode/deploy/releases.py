"""Release directories (Capistrano's layout): `<root>/releases/<project>/<name>/<env>/<version>`.

`current` beside the versions is a relative symlink to the running release, switched atomically
(a symlink under a temporary name renamed over it). `.releases.json` lists the releases in
activation order, each with the command that made it (so a rollback knows how to stop and start
it) and a state: `new` (created, never active), `active`, or `rolled_back` (left by a rollback;
kept for a named rollback, skipped when looking for the previous release). Activating a release
moves it to the end; the previous release is the last `active` one before `current`. Pruning keeps
the last `keep_releases`, never `current`. All calls block (file I/O): run them in a thread.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from ..fsutil import atomic_write
from .errors import ReleaseError, RootNotAllowed
from .spec import Application

INDEX = ".releases.json"
CURRENT = "current"
NEW, ACTIVE, ROLLED_BACK = "new", "active", "rolled_back"


def check_root(root: str | os.PathLike[str], allowed_roots: Sequence[str | os.PathLike[str]]) -> Path:
    """The application root, resolved, if it lies inside one of `allowed_roots`; else RootNotAllowed."""
    if not allowed_roots:
        raise RootNotAllowed("deploys are not enabled on this node: its config 'deploy.allowed_roots' is empty")
    real = os.path.realpath(root)
    for allowed in allowed_roots:
        base = os.path.realpath(allowed)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return Path(real)
    names = ", ".join(str(a) for a in allowed_roots)
    raise RootNotAllowed(f"application root {os.fspath(root)} is outside this node's deploy.allowed_roots ({names}); "
                         "add it to the node config's 'deploy.allowed_roots' to allow deploys there")


@attrs.frozen
class Release:
    version: str
    deploy_id: str
    state: str
    command: dict[str, Any]  # the command (to_dict form, unresolved) that created this release

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "deploy_id": self.deploy_id, "state": self.state, "command": self.command}


class Releases:
    def __init__(self, root: Path, app: Application):
        self.app = app
        self.dir = Path(root) / "releases" / app.project / app.name / app.env
        self.current_link = self.dir / CURRENT

    def path(self, version: str) -> Path:
        return self.dir / version

    def entries(self) -> list[Release]:
        try:
            raw = json.loads((self.dir / INDEX).read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ReleaseError(f"{self.dir / INDEX}: unreadable release index ({exc})") from None
        return [Release(r["version"], r["deploy_id"], r["state"], r["command"]) for r in raw]

    def _save(self, entries: list[Release]) -> None:
        data = json.dumps([e.to_json() for e in entries], separators=(",", ":")).encode()
        atomic_write(self.dir / INDEX, data, mode=0o644)

    def get(self, version: str) -> Release | None:
        return next((e for e in self.entries() if e.version == version), None)

    def current(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ReleaseError(f"{self.current_link} is not a symlink ({exc.strerror}); move it away") from None
        return Path(target).name

    def previous(self, before: str | None = None) -> Release | None:
        """The last `active` release before `before` (default: current) whose directory exists."""
        entries = self.entries()
        before = before if before is not None else self.current()
        idx = next((i for i, e in enumerate(entries) if e.version == before), len(entries))
        for entry in reversed(entries[:idx]):
            if entry.state == ACTIVE and self.path(entry.version).is_dir():
                return entry
        return None

    def create(self, version: str, deploy_id: str, command: dict[str, Any]) -> Path:
        """A fresh, empty release directory, recorded as `new`; an existing version is refused."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(version)
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            raise ReleaseError(f"release {version} of {self.app.key} already exists; deploy a new version "
                               "or roll back to it with deploy.rollback") from None
        entries = [e for e in self.entries() if e.version != version]
        self._save([*entries, Release(version, deploy_id, NEW, command)])
        return path

    def activate(self, version: str) -> None:
        """Point `current` at `version` atomically and move it to the end of the activation order."""
        entries = self.entries()
        entry = next((e for e in entries if e.version == version), None)
        if entry is None or not self.path(version).is_dir():
            raise ReleaseError(f"release {version} of {self.app.key} does not exist")
        self._save([*(e for e in entries if e.version != version), attrs.evolve(entry, state=ACTIVE)])
        tmp = self.dir / f".{CURRENT}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(version, tmp)
        try:
            os.replace(tmp, self.current_link)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ReleaseError(f"cannot switch {self.current_link}: {exc.strerror}") from None
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def deactivate(self) -> None:
        """Remove `current` (after a failed first deploy there is nothing to point at)."""
        self.current_link.unlink(missing_ok=True)

    def mark_rolled_back(self, version: str) -> None:
        self._save([attrs.evolve(e, state=ROLLED_BACK) if e.version == version else e for e in self.entries()])

    def discard(self, version: str) -> None:
        """Delete a release that failed before it ran (or a half-made one); never the current one."""
        if self.current() == version:
            raise ReleaseError(f"release {version} of {self.app.key} is current; it cannot be discarded")
        shutil.rmtree(self.path(version), ignore_errors=True)
        if self.dir.is_dir():
            self._save([e for e in self.entries() if e.version != version])

    def prune(self, keep: int, protect: Sequence[str] = ()) -> list[str]:
        """Delete all but the last `keep` releases (never current or `protect`); returns the removed versions."""
        entries = self.entries()
        spared = {self.current(), *protect}
        removed = [e.version for e in entries[: max(0, len(entries) - keep)] if e.version not in spared]
        for version in removed:
            shutil.rmtree(self.path(version), ignore_errors=True)
        if removed:
            self._save([e for e in entries if e.version not in removed])
        return removed
