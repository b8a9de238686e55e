"""One node's deploy executor: runs each accepted deploy as a state machine, one at a time per application.

`submit` checks the command's validity window and application root, journals it as `pending` and
returns; a worker per application (the seed's per-client lock) runs that application's deploys in
order, so later ones wait visibly as `pending`. Every status change is written to the journal
(fsynced) and then handed to `on_report`, which the network half signs and spreads.

Stages per type (status, progress):
  shell   executing 0 → script_running 10 → starting 70 → health_check 80–100 → success
  tar     executing 0 → uploading 0–30 → extracting 30–60 → installing 60–90 → health_check 90–100 → success
  docker  executing 0 → pulling 10 → stopping 40 → starting 50 → health_check 70–100 → success
  rollback rolling_back 10 → health_check 80–100 → rolled_back
A failure is reported as `failed` (or `timeout`) and, if anything running was touched, followed by
`rolling_back` → `rolled_back` / `rollback_failed`. Rules:
- before anything running is touched (artifact verification, extraction, install script, pulling),
  a failure discards the new release and ends `failed`: the running release was never stopped;
- once a script ran, or the old service was stopped, `current` switched or the new one started,
  a failure (script exit or timeout, stop/start failure, failed health check) rolls back: the
  shell command's rollback script if it has one, else stop the new release, switch `current` back
  to the release that was current before, start it, and health-check it with its own check;
- a first deploy has nothing to go back to: the new release is stopped and removed, `failed`.
Recovery after a restart (the seed's lost-callback recovery) works from the journal's phase:
a deploy interrupted while preparing starts over; one interrupted while live is rolled back (the
process group of the step that was running is killed first, identified by pgid and by the
deploy ID in its environment); one interrupted in its health check is checked again (success, or
roll back); an interrupted rollback is run again.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from .. import timefmt
from ..logfmt import fmt
from ..trioutil import open_nursery_unwrapped
from . import journal as J
from . import report as R
from .artifacts import ArtifactSource, LocalArtifacts
from .config import DeployConfig
from .docker import Docker, container_name
from .errors import DeployError
from .healthcheck import HealthResult, wait_healthy
from .journal import Entry, Journal
from .releases import Releases, check_root
from .report import DeployReport
from .runner import BoundedLog, RunResult, group_members, kill_group, run_argv, run_script, script_env
from .services import Run, ScriptsService, ServiceManager, SystemdService
from .spec import DOCKER, ROLLBACK, SHELL, TAR, DeployCommand, DockerAction, HealthCheck, ShellAction, TarAction, Vars
from .tarsafe import extract

log = logging.getLogger("p2pnode.deploy")

T = TypeVar("T")
ReportCallback = Callable[[DeployReport], Awaitable[None]]
PROGRESS_STEP = 5  # report extraction/verification progress in steps of this many points


class StepFailed(DeployError):
    """A live step failed; `status` is `failed` or `timeout`."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class Executor:
    def __init__(self, config: DeployConfig, journal: Journal, nursery: trio.Nursery, *, on_report: ReportCallback | None,
                 artifacts: ArtifactSource, now_ns: Callable[[], int]):
        self.config = config
        self.journal = journal
        self.artifacts = artifacts
        self.now_ns = now_ns
        self._nursery = nursery
        self._on_report = on_report
        self._workers: set[str] = set()
        self._kicked: set[str] = set()
        self._finished: dict[str, trio.Event] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, config: DeployConfig, journal: Journal, *, on_report: ReportCallback | None = None,
                   artifacts: ArtifactSource | None = None, now_ns: Callable[[], int] = timefmt.now_ns) -> AsyncIterator[Executor]:
        """Run the executor for the block's lifetime; unfinished deploys in the journal resume at once.
        Leaving the block cancels running deploys: their scripts' groups are killed and the journal
        keeps their phase, so the next `open` recovers them."""
        if artifacts is None:
            if config.artifact_dir is None:
                raise DeployError("the node's deploy settings name no artifact_dir")
            artifacts = LocalArtifacts(config.artifact_dir)
        async with open_nursery_unwrapped() as nursery:
            ex = cls(config, journal, nursery, on_report=on_report, artifacts=artifacts, now_ns=now_ns)
            for app in await journal.unfinished_apps():
                ex._kick(app)
            try:
                yield ex
            finally:
                nursery.cancel_scope.cancel()

    async def submit(self, command: DeployCommand) -> DeployReport:
        """Accept a verified command: check its window and root, journal it as `pending`, queue it."""
        command.check_window(self.now_ns())
        check_root(command.root, self.config.allowed_roots)
        report = DeployReport(command.deploy_id, command.kind, command.app.key, command.version, R.PENDING, 0, "queued",
                              "waiting for earlier deploys of this application" if command.app.key in self._workers else "accepted",
                              1, self.now_ns())
        await self.journal.accept(command, report, self.config.max_pending_per_app)
        log.info(fmt("deploy_accepted", deploy=command.deploy_id, type=command.kind, app=command.app.key, version=command.version))
        await self._emit(report)
        self._kick(command.app.key)
        return report

    async def wait(self, deploy_id: str) -> DeployReport:
        """The deploy's final report, once it has one."""
        event = self._finished.setdefault(deploy_id, trio.Event())
        entry = await self.journal.get(deploy_id)
        if entry is None:
            self._finished.pop(deploy_id, None)
            raise DeployError(f"no deploy {deploy_id} on this node")
        if entry.report.final:
            self._done(deploy_id)  # also wakes a concurrent waiter that created the same event
            return entry.report
        await event.wait()
        entry = await self.journal.get(deploy_id)
        assert entry is not None
        return entry.report

    async def status(self, deploy_id: str) -> DeployReport | None:
        entry = await self.journal.get(deploy_id)
        return None if entry is None else entry.report

    async def log_of(self, deploy_id: str) -> bytes | None:
        entry = await self.journal.get(deploy_id)
        return None if entry is None else entry.log

    async def _emit(self, report: DeployReport) -> None:
        if self._on_report is None:
            return
        try:
            await self._on_report(report)
        except Exception as exc:  # the report is journaled; the network half can resend it from there
            log.warning(fmt("deploy_report_callback_failed", deploy=report.deploy_id, status=report.status, error=repr(exc)))

    def _kick(self, app: str) -> None:
        self._kicked.add(app)
        if app not in self._workers:
            self._workers.add(app)
            self._nursery.start_soon(self._worker, app)

    async def _worker(self, app: str) -> None:
        try:
            while True:
                self._kicked.discard(app)
                entry = await self.journal.next_for(app)
                if entry is None:
                    if app in self._kicked:
                        continue
                    return
                await _Deploy(self, entry).run()
        except Exception:
            log.exception(fmt("deploy_worker_failed", app=app))  # the deploy stays unfinished; recovered on restart
        finally:
            self._workers.discard(app)

    def _done(self, deploy_id: str) -> None:
        event = self._finished.pop(deploy_id, None)
        if event is not None:
            event.set()


class _Deploy:
    """One deploy's run (or recovery) on this node."""

    def __init__(self, ex: Executor, entry: Entry):
        self.ex, self.config = ex, ex.config
        self.cmd = entry.command
        self.id = self.cmd.deploy_id
        self.app = self.cmd.app
        self.releases = Releases(Path(os.path.realpath(self.cmd.root)), self.app)
        self.log = BoundedLog(self.config.max_log_bytes, entry.log)
        self.entry = entry
        self.seq = entry.report.seq
        self.status, self.progress = entry.report.status, entry.report.progress
        self.phase = entry.phase
        self.prev, self.target = entry.prev_version, entry.target_version
        self.created = False  # this run created the new release directory
        self.started = trio.current_time()
        self._shown = -PROGRESS_STEP

    # ---- reporting ----------------------------------------------------------------------------------

    async def set(self, status: str, progress: int, stage: str, message: str = "", *, phase: str | None = None,
                  final: bool = False, success: bool | None = None) -> None:
        self.seq += 1
        self.status, self.progress = status, max(0, min(100, progress))
        self.phase = J.DONE if final else (phase or self.phase)
        if final:
            message = f"{message} ({trio.current_time() - self.started:.1f} s)".strip()
        report = DeployReport(self.id, self.cmd.kind, self.app.key, self.target or self.cmd.version, status, self.progress,
                              stage, message[: R.MAX_MESSAGE], self.seq, self.ex.now_ns(), final, success,
                              self.log.tail(R.MAX_LOG_TAIL))
        await self.ex.journal.record(report, self.phase, self.log.data(), self.prev, self.target)
        level = logging.WARNING if status in (R.ROLLBACK_FAILED,) else logging.INFO
        log.log(level, fmt("deploy_status", deploy=self.id, app=self.app.key, status=status, progress=self.progress, stage=stage,
                           message=message or None))
        await self.ex._emit(report)
        if final:
            self.ex._done(self.id)

    async def fail(self, message: str) -> None:
        await self.set(R.FAILED, self.progress, "failed", message, final=True, success=False)

    def ranged(self, status: str, fraction: float) -> int:
        lo, hi = R.RANGES[self.cmd.kind].get(status, (self.progress, self.progress))
        return int(lo + (hi - lo) * max(0.0, min(1.0, fraction)))

    async def progress_of(self, status: str, stage: str, done: int, total: int) -> None:
        value = self.ranged(status, done / total if total else 1.0)
        if value - self._shown >= PROGRESS_STEP:
            self._shown = value
            await self.set(status, value, stage)

    # ---- helpers ------------------------------------------------------------------------------------

    def vars(self, version: str) -> Vars:
        return Vars(str(self.releases.path(version)), self.app.env, version, self.config.host)

    def env(self, cmd: DeployCommand, version: str) -> dict[str, str]:
        extra = dict(self.config.env)
        if isinstance(cmd.action, (ShellAction, TarAction)):
            extra.update(cmd.action.env)
        extra.update(P2PNODE_APP=self.app.key, P2PNODE_VERSION=version, P2PNODE_RELEASE_DIR=str(self.releases.path(version)),
                     P2PNODE_APP_DIR=str(self.releases.dir))
        return script_env(extra, self.id)

    async def _run(self, label: str, start: Callable[[Callable[[int], Awaitable[None]]], Awaitable[RunResult]]) -> RunResult:
        self.log.note(label)

        async def started(pgid: int) -> None:
            await self.ex.journal.set_pgid(self.id, pgid)

        try:
            result = await start(started)
        except OSError as exc:
            raise DeployError(f"{label}: cannot start ({exc})") from None
        await self.ex.journal.set_pgid(self.id, None)
        self.log.note(f"{label}: {result.describe()} in {result.duration:.1f} s")
        return result

    async def run_step(self, argv: Sequence[str], cwd: Path, timeout: float, label: str, env: dict[str, str]) -> RunResult:
        return await self._run(label, lambda started: run_argv(argv, cwd=cwd, env=env, timeout=timeout, log=self.log,
                                                                kill_grace=self.config.kill_grace, on_start=started))

    async def run_text(self, script: str, cwd: Path, timeout: float, label: str, env: dict[str, str]) -> RunResult:
        return await self._run(label, lambda started: run_script(script, cwd=cwd, env=env, timeout=timeout, log=self.log,
                                                                  shell=self.config.shell, kill_grace=self.config.kill_grace,
                                                                  on_start=started))

    def runner_for(self, env: dict[str, str]) -> Run:
        async def run(argv: Sequence[str], cwd: Path, timeout: float, label: str) -> RunResult:
            return await self.run_step(argv, cwd, timeout, label, env)
        return run

    def docker(self) -> Docker:
        env = script_env(dict(self.config.docker_env), self.id)
        return Docker(self.config.docker_command, self.runner_for(env), env)

    def service(self, cmd: DeployCommand, version: str) -> ServiceManager | None:
        if cmd.service is None:
            return None
        run = self.runner_for(self.env(cmd, version))
        if cmd.service.type == "systemd":
            return SystemdService(self.app, cmd.service, run, unit_dir=self.config.systemd_unit_dir, systemctl=self.config.systemctl,
                                  user=self.config.service_user)
        return ScriptsService(cmd.service, run, self.config.shell)

    async def thread(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args)

    async def command_of(self, version: str) -> DeployCommand | None:
        """The command that made release `version`, resolved for it; None for a release we did not make."""
        entry = await self.thread(self.releases.get, version)
        if entry is None:
            return None
        return DeployCommand.from_dict(entry.command).resolve(self.vars(version))

    async def must_command_of(self, version: str) -> DeployCommand:
        cmd = await self.command_of(version)
        if cmd is None:
            raise DeployError(f"release {version} of {self.app.key} is not in the release index")
        return cmd

    async def stop_release(self, version: str, cmd: DeployCommand) -> None:
        if isinstance(cmd.action, DockerAction):
            await self.docker().remove(container_name(self.app, cmd.action), cmd.action.timeout)
            return
        service = self.service(cmd, version)
        if service is not None:
            await service.stop(self.releases.path(version), version)

    async def start_release(self, version: str, cmd: DeployCommand) -> None:
        if isinstance(cmd.action, DockerAction):
            docker = self.docker()
            if not await docker.image_present(cmd.action.image):
                archive = None if cmd.action.archive is None else await self.ex.artifacts.get(cmd.action.archive, _no_progress)
                self.log.note(await docker.obtain(cmd.action, archive))
            name = container_name(self.app, cmd.action)
            await docker.remove(name, cmd.action.timeout)
            await docker.start(cmd.action, name, self.labels(version))
            return
        service = self.service(cmd, version)
        if service is not None:
            await service.start(self.releases.path(version), version)

    def labels(self, version: str) -> list[tuple[str, str]]:
        return [("p2pnode.app", self.app.key), ("p2pnode.version", version), ("p2pnode.deploy_id", self.id)]

    async def stop_quietly(self, version: str, cmd: DeployCommand) -> None:
        """Stopping the release we are leaving during a rollback: a failure is logged, not fatal."""
        try:
            await self.stop_release(version, cmd)
        except DeployError as exc:
            self.log.note(f"stopping {version} failed, continuing the rollback: {exc}")

    async def health(self, cmd: DeployCommand, version: str, status: str, report_attempts: bool = True) -> HealthResult | None:
        """Run `cmd`'s health check (and, for docker, that the container runs); None if there is none."""
        if isinstance(cmd.action, DockerAction):
            name = container_name(self.app, cmd.action)
            if not await self.docker().running(name):
                return HealthResult(False, "container", 1, 0, 0.0, f"container {name} is not running")
        check: HealthCheck | None = cmd.health
        if check is None:
            return None
        env = self.env(cmd, version)
        cwd = self.releases.path(version)
        cwd = cwd if await trio.Path(cwd).is_dir() else self.releases.dir

        async def script(text: str, timeout: float) -> RunResult:
            return await self.run_text(text, cwd, timeout, "health script", env)

        attempts_max = check.retries + 1

        async def attempt(n: int, ok: bool, message: str) -> None:
            self.log.note(f"health check attempt {n}: {'ok' if ok else 'failed'}: {message}")
            if not ok and report_attempts:
                await self.set(status, self.ranged(status, n / attempts_max), f"health check attempt {n}", message)

        return await wait_healthy(check, run_script=script, on_attempt=attempt)

    # ---- the run ------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            check_root(self.cmd.root, self.config.allowed_roots)
            if self.phase == J.QUEUED:
                await self.begin()
            else:
                await self.recover()
        except DeployError as exc:  # refused before it started (the root is no longer allowed)
            await self.fail(str(exc))
        except Exception as exc:  # a bug must not leave the deploy to be retried on every restart
            log.exception(fmt("deploy_internal_error", deploy=self.id))
            await self.fail(f"internal error during {self.status}: {exc!r}; check the node's log")

    async def begin(self) -> None:
        self.prev = await self.thread(self.releases.current)
        if self.cmd.kind == ROLLBACK:
            await self.rollback_command()
            return
        self.target = self.cmd.version
        await self.set(R.EXECUTING, 0, "starting", f"current release: {self.prev or 'none'}", phase=J.PREPARE)
        await self.install()

    async def install(self) -> None:
        assert self.target is not None
        cmd = self.cmd.resolve(self.vars(self.target))
        prepare = {SHELL: self.prepare_shell, TAR: self.prepare_tar, DOCKER: self.prepare_docker}[self.cmd.kind]
        go_live = {SHELL: self.live_shell, TAR: self.live_tar, DOCKER: self.live_docker}[self.cmd.kind]
        try:
            await prepare(cmd)
        except DeployError as exc:
            await self.discard_new()
            untouched = f"; the running release {self.prev} was not touched" if self.prev else ""
            await self.fail(f"{exc}{untouched}")
            return
        try:
            await go_live(cmd)
        except DeployError as exc:
            await self.set(exc.status if isinstance(exc, StepFailed) else R.FAILED, self.progress, "failed", str(exc))
            await self.roll_back(str(exc))
            return
        await self.check_new(cmd)

    async def create_release(self) -> None:
        assert self.target is not None
        await self.thread(self.releases.create, self.target, self.id, self.cmd.to_dict())
        self.created = True

    async def discard_new(self) -> None:
        if self.created and self.target is not None:
            await self.thread(self.releases.discard, self.target)

    async def prepare_shell(self, cmd: DeployCommand) -> None:
        assert isinstance(cmd.action, ShellAction)
        await self.create_release()
        if not await trio.Path(cmd.action.working_dir).is_dir():
            raise DeployError(f"working_dir {cmd.action.working_dir} does not exist")

    async def prepare_tar(self, cmd: DeployCommand) -> None:
        assert isinstance(cmd.action, TarAction) and self.target is not None
        action = cmd.action
        total = sum(a.size for a in action.artifacts) or 1
        await self.set(R.UPLOADING, 0, "verifying artifacts")
        self._shown = 0
        paths, base = [], 0
        for ref in action.artifacts:
            async def verified(done: int, _total: int, base: int = base) -> None:
                await self.progress_of(R.UPLOADING, "verifying artifacts", base + done, total)
            paths.append(await self.ex.artifacts.get(ref, verified))
            base += ref.size
        await self.create_release()
        release = self.releases.path(self.target)
        await self.set(R.EXTRACTING, 30, "extracting")
        self._shown = 30

        def progress(done: int, of: int) -> None:
            trio.from_thread.run(self.progress_of, R.EXTRACTING, "extracting", done, of)

        result = await trio.to_thread.run_sync(extract, paths[0], release, self.config.tar, progress)
        self.log.note(f"extracted {result.entries} entries, {result.files} files, {result.bytes} bytes")
        for item, path in zip(action.files, paths[1:]):
            await self.thread(_place_file, path, release, item.path, item.mode)
            self.log.note(f"placed {item.path} ({item.artifact.size} bytes, mode {item.mode:o})")
        if action.install_script is not None:
            await self.set(R.INSTALLING, 60, "install script")
            ran = await self.run_text(action.install_script, release, action.install_timeout, "install script", self.env(cmd, self.target))
            if not ran.ok:
                raise DeployError(f"install script {ran.describe()}")

    async def prepare_docker(self, cmd: DeployCommand) -> None:
        assert isinstance(cmd.action, DockerAction)
        await self.create_release()
        await self.set(R.PULLING, 10, "getting the image")
        self._shown = 10
        archive = None
        if cmd.action.archive is not None:
            async def verified(done: int, total: int) -> None:
                await self.progress_of(R.PULLING, "verifying the image archive", done, total)
            archive = await self.ex.artifacts.get(cmd.action.archive, verified)
        self.log.note(await self.docker().obtain(cmd.action, archive))

    async def live_shell(self, cmd: DeployCommand) -> None:
        assert isinstance(cmd.action, ShellAction) and self.target is not None
        await self.set(R.SCRIPT_RUNNING, 10, "deploy script", phase=J.LIVE)
        ran = await self.run_text(cmd.action.script, Path(cmd.action.working_dir), cmd.action.timeout, "deploy script",
                                  self.env(cmd, self.target))
        if ran.timed_out:
            raise StepFailed(R.TIMEOUT, f"deploy script {ran.describe()}")
        if not ran.ok:
            raise StepFailed(R.FAILED, f"deploy script {ran.describe()}")
        await self.switch(cmd, R.STARTING, 70)

    async def live_tar(self, cmd: DeployCommand) -> None:
        await self.switch(cmd, R.INSTALLING, 75)

    async def switch(self, cmd: DeployCommand, status: str, progress: int) -> None:
        """Stop the previous release's service, point `current` at the new release, start it."""
        assert self.target is not None
        await self.set(status, progress, f"switching to {self.target}", phase=J.LIVE)
        prev_cmd = None if self.prev is None else await self.command_of(self.prev)
        if self.prev is not None and prev_cmd is not None:
            await self.stop_release(self.prev, prev_cmd)
        await self.thread(self.releases.activate, self.target)
        await self.start_release(self.target, cmd)

    async def live_docker(self, cmd: DeployCommand) -> None:
        assert isinstance(cmd.action, DockerAction) and self.target is not None
        await self.set(R.STOPPING, 40, "stopping the old container", phase=J.LIVE)
        prev_cmd = None if self.prev is None else await self.command_of(self.prev)
        if self.prev is not None and prev_cmd is not None:
            await self.stop_release(self.prev, prev_cmd)
        name = container_name(self.app, cmd.action)
        await self.set(R.STARTING, 50, f"starting container {name}")
        await self.start_release(self.target, cmd)
        await self.thread(self.releases.activate, self.target)

    async def check_new(self, cmd: DeployCommand) -> None:
        assert self.target is not None
        await self.set(R.HEALTH_CHECK, self.ranged(R.HEALTH_CHECK, 0), "health check", phase=J.HEALTH)
        try:
            result = await self.health(cmd, self.target, R.HEALTH_CHECK)
        except DeployError as exc:
            result = HealthResult(False, "error", 1, 0, 0.0, str(exc))
        if result is not None and not result.ok:
            await self.set(R.FAILED, self.progress, "health check", f"health check failed: {result.message}")
            await self.roll_back(f"health check failed: {result.message}")
            return
        removed = await self.thread(self.releases.prune, self.cmd.keep_releases, [self.target])
        if removed:
            self.log.note(f"removed old releases: {', '.join(removed)}")
        detail = f"; {result.message}" if result is not None else "; no health check configured"
        await self.set(R.SUCCESS, 100, "done", f"release {self.target} is current{detail}", final=True, success=True)

    async def roll_back(self, reason: str) -> None:
        """Undo a deploy that touched what runs (see the module docstring for the rules)."""
        assert self.target is not None
        await self.set(R.ROLLING_BACK, self.progress, "rolling back", reason, phase=J.ROLLING_BACK)
        new_cmd = self.cmd.resolve(self.vars(self.target))
        try:
            if isinstance(new_cmd.action, ShellAction) and new_cmd.action.rollback_script is not None:
                await self.rollback_script(reason, new_cmd)
                return
            await self.stop_quietly(self.target, new_cmd)
            if self.prev is None:
                await self.thread(self.releases.deactivate)
                await self.thread(self.releases.discard, self.target)
                await self.fail(f"{reason}; this was the first release, nothing to roll back to: {self.target} was stopped and removed")
                return
            prev_cmd = await self.must_command_of(self.prev)
            await self.thread(self.releases.activate, self.prev)
            await self.start_release(self.prev, prev_cmd)
            await self.thread(self.releases.discard, self.target)
            result = await self.health(prev_cmd, self.prev, R.ROLLING_BACK, report_attempts=False)
        except DeployError as exc:
            await self.set(R.ROLLBACK_FAILED, self.progress, "rolling back", f"{reason}; rollback failed: {exc}", final=True,
                           success=False)
            return
        await self.after_rollback(reason, self.prev, result)

    async def rollback_script(self, reason: str, cmd: DeployCommand) -> None:
        """The shell command's own rollback script, then `current` and the service back to the previous release."""
        assert isinstance(cmd.action, ShellAction) and cmd.action.rollback_script is not None and self.target is not None
        ran = await self.run_text(cmd.action.rollback_script, Path(cmd.action.working_dir), cmd.action.timeout, "rollback script",
                                  self.env(cmd, self.target))
        if not ran.ok:
            raise DeployError(f"rollback script {ran.describe()}")
        if await self.thread(self.releases.current) == self.target:
            await self.stop_quietly(self.target, cmd)
            if self.prev is not None:
                await self.thread(self.releases.activate, self.prev)
                await self.start_release(self.prev, await self.must_command_of(self.prev))
            else:
                await self.thread(self.releases.deactivate)
        result = await self.health(cmd, self.target, R.ROLLING_BACK, report_attempts=False)
        await self.thread(self.releases.discard, self.target)
        await self.after_rollback(reason, self.prev or "the state before the deploy", result, "rollback script ran")

    async def after_rollback(self, reason: str, to: str, result: HealthResult | None, how: str = "") -> None:
        said = "; ".join(x for x in (reason, how) if x)
        said = f"{said}; " if said else ""
        if result is not None and not result.ok:
            await self.set(R.ROLLBACK_FAILED, self.progress, "health check after rollback",
                           f"{said}rolled back to {to} but it is unhealthy: {result.message}", final=True, success=False)
            return
        checked = f"; {result.message}" if result is not None else ""
        await self.set(R.ROLLED_BACK, 100, "rolled back", f"{said}rolled back to {to}{checked}", final=True,
                       success=self.cmd.kind == ROLLBACK)

    async def rollback_command(self) -> None:
        """deploy.rollback: to the named release, or to the previous one."""
        if self.cmd.version is not None:
            if await self.thread(self.releases.get, self.cmd.version) is None:
                kept = ", ".join(e.version for e in await self.thread(self.releases.entries)) or "none"
                await self.set(R.ROLLBACK_FAILED, 0, "rolling back", f"release {self.cmd.version} of {self.app.key} is not kept "
                               f"on this node (kept: {kept})", final=True, success=False)
                return
            self.target = self.cmd.version
        else:
            previous = await self.thread(self.releases.previous, self.prev)
            if previous is None:
                await self.set(R.ROLLBACK_FAILED, 0, "rolling back", f"no previous release of {self.app.key} to roll back to",
                               final=True, success=False)
                return
            self.target = previous.version
        if self.target == self.prev:
            await self.set(R.ROLLED_BACK, 100, "done", f"release {self.target} is already current", final=True, success=True)
            return
        await self.set(R.ROLLING_BACK, 10, f"rolling back from {self.prev or 'none'} to {self.target}", phase=J.ROLLING_BACK)
        await self.do_rollback_command()

    async def do_rollback_command(self) -> None:
        assert self.target is not None
        try:
            target_cmd = await self.must_command_of(self.target)
            prev_cmd = None if self.prev is None else await self.command_of(self.prev)
            if self.prev is not None and prev_cmd is not None:
                await self.stop_quietly(self.prev, prev_cmd)
            await self.thread(self.releases.activate, self.target)
            await self.start_release(self.target, target_cmd)
            if self.prev is not None:
                await self.thread(self.releases.mark_rolled_back, self.prev)
            if self.cmd.health is not None:  # the rollback command's own check overrides the release's
                target_cmd = attrs.evolve(target_cmd, health=self.cmd.resolve(self.vars(self.target)).health)
            await self.set(R.HEALTH_CHECK, 80, "health check")
            result = await self.health(target_cmd, self.target, R.HEALTH_CHECK)
        except DeployError as exc:
            await self.set(R.ROLLBACK_FAILED, self.progress, "rolling back", f"rollback to {self.target} failed: {exc}",
                           final=True, success=False)
            return
        await self.after_rollback("", self.target, result)

    # ---- recovery -----------------------------------------------------------------------------------

    async def recover(self) -> None:
        await self.kill_leftovers()
        interrupted = self.status
        self.log.note(f"node restarted during {interrupted} (phase {self.phase}); recovering")
        if self.cmd.kind == ROLLBACK:
            await self.set(R.ROLLING_BACK, self.progress, "recovering", f"node restarted during {interrupted}; running the rollback again")
            await self.do_rollback_command()
        elif self.phase == J.PREPARE:
            if self.target is not None:
                release = await self.thread(self.releases.get, self.target)
                path = self.releases.path(self.target)
                if (release is not None and release.deploy_id == self.id) or (release is None and path.is_dir() and not any(path.iterdir())):
                    await self.thread(self.releases.discard, self.target)
            await self.set(R.EXECUTING, 0, "starting over", f"node restarted during {interrupted}; nothing running was touched, "
                           "starting over", phase=J.PREPARE)
            await self.install()
        elif self.phase == J.HEALTH:
            assert self.target is not None
            await self.check_new(self.cmd.resolve(self.vars(self.target)))
        else:
            await self.roll_back(f"node restarted during {interrupted}")

    async def kill_leftovers(self) -> None:
        pgid = self.entry.pgid
        if pgid is None:
            return
        members = await self.thread(group_members, pgid, self.id)
        if members:
            kill_group(pgid)
            self.log.note(f"killed {len(members)} leftover process(es) of the interrupted step (process group {pgid})")


async def _no_progress(done: int, total: int) -> None:
    return None


def _place_file(src: Path, release: Path, rel: str, mode: int) -> None:
    """Copy an artifact to `release/rel` (parents created; never through a symbolic link)."""
    target = release
    for part in rel.split("/")[:-1]:
        target = target / part
        if target.is_symlink():
            raise DeployError(f"file {rel}: {target.relative_to(release)} is a symbolic link")
        target.mkdir(exist_ok=True)
    dest = target / rel.split("/")[-1]
    if dest.is_symlink() or dest.is_dir():
        raise DeployError(f"file {rel}: a symbolic link or directory of that name is in the release")
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1024 * 1024)
        os.fchmod(out.fileno(), mode)
