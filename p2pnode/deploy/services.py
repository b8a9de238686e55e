"""Starting and stopping the deployed application.

Two ways, chosen by the command's `service`:
- `scripts`: the release's own `start.sh` / `stop.sh` (paths relative to the release, the lightnode
  way), run with bash in the script's directory. A release without its stop script is logged and
  skipped (there may be nothing to stop); a missing start script fails the deploy.
- `systemd`: a generated unit `<project>-<name>-<env>.service` (ExecStart is the command with
  `${installPath}` resolved to the release) written to `unit_dir`, then `systemctl daemon-reload`
  and `restart`/`stop`. The unit text is verified with `systemd-analyze verify` in the tests;
  starting units needs a running systemd, which the test machines do not have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import trio

from ..fsutil import atomic_write
from .errors import DeployError
from .runner import RunResult
from .spec import Application, Service

# (argv, cwd, timeout, label) -> result; the executor's runner logs, journals and bounds it
Run = Callable[[Sequence[str], Path, float, str], Awaitable[RunResult]]


class ServiceManager(Protocol):
    async def start(self, release: Path, version: str) -> None: ...

    async def stop(self, release: Path, version: str) -> None: ...


def _check(result: RunResult, what: str) -> None:
    if not result.ok:
        raise DeployError(f"{what}: {result.describe()}")


class ScriptsService:
    def __init__(self, spec: Service, run: Run, shell: str = "/bin/bash"):
        self.spec, self.run, self.shell = spec, run, shell

    async def start(self, release: Path, version: str) -> None:
        script = release / self.spec.start
        if not script.is_file():
            raise DeployError(f"release {version} has no {self.spec.start}")
        _check(await self.run([self.shell, str(script)], script.parent, self.spec.timeout, f"{self.spec.start} ({version})"),
               f"{self.spec.start} of release {version}")

    async def stop(self, release: Path, version: str) -> None:
        script = release / self.spec.stop
        if not script.is_file():
            return
        _check(await self.run([self.shell, str(script)], script.parent, self.spec.timeout, f"{self.spec.stop} ({version})"),
               f"{self.spec.stop} of release {version}")


def _systemd_escape(value: str) -> str:
    return value.replace("%", "%%")


def render_unit(app: Application, spec: Service, release: Path, version: str, user: str | None = None) -> str:
    """The unit file text for `spec` (already resolved for `release`)."""
    assert spec.command is not None
    lines = [
        "[Unit]",
        f"Description=p2pnode deploy {app.key} {version}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={release}",
        f"ExecStart={_systemd_escape(spec.command)}",
    ]
    for name, value in spec.env:
        quoted = _systemd_escape(f"{name}={value}").replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'Environment="{quoted}"')
    if user:
        lines.append(f"User={user}")
    lines += ["Restart=on-failure", "RestartSec=2", "", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


class SystemdService:
    def __init__(self, app: Application, spec: Service, run: Run, *, unit_dir: Path = Path("/etc/systemd/system"),
                 systemctl: Sequence[str] = ("systemctl",), user: str | None = None):
        self.app, self.spec, self.run = app, spec, run
        self.unit_dir, self.systemctl, self.user = unit_dir, tuple(systemctl), user

    @property
    def unit_path(self) -> Path:
        return self.unit_dir / self.app.unit_name

    async def _systemctl(self, *args: str) -> None:
        _check(await self.run([*self.systemctl, *args], Path("/"), self.spec.timeout, f"systemctl {' '.join(args)}"),
               f"systemctl {' '.join(args)}")

    async def start(self, release: Path, version: str) -> None:
        text = render_unit(self.app, self.spec, release, version, self.user).encode()
        await trio.to_thread.run_sync(lambda: atomic_write(self.unit_path, text, mode=0o644))
        await self._systemctl("daemon-reload")
        await self._systemctl("enable", self.app.unit_name)
        await self._systemctl("restart", self.app.unit_name)

    async def stop(self, release: Path, version: str) -> None:
        if self.unit_path.exists():
            await self._systemctl("stop", self.app.unit_name)
