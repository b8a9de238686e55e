"""Running deploy scripts and commands: own process group, bounded log, timeout that kills the group.

Every process runs as the node's user in a new session (so its own process group) with stdin from
/dev/null and stdout+stderr merged into one pipe that feeds a BoundedLog (the tail is kept). On
timeout, or if the caller is cancelled, the whole group gets SIGTERM, then SIGKILL after a grace
period — children a script started are killed with it. A script that exits normally may leave
processes behind on purpose (a `start.sh` starting a daemon); those are not touched, and if they
kept the output pipe open we stop reading it `drain` seconds after the script exited (daemons
should redirect their output, as `nohup … > log 2>&1 &` does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs
import trio

DEFAULT_LOG_BYTES = 256 * 1024
MARKER_ENV = "P2PNODE_DEPLOY_ID"  # set in every deploy process; recovery kills only groups carrying it
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER", "LOGNAME", "SHELL", "TMPDIR")


class BoundedLog:
    """Output of one deploy's steps, newest `max_bytes` kept; `dropped` counts what fell off the front."""

    def __init__(self, max_bytes: int = DEFAULT_LOG_BYTES, initial: bytes = b""):
        self.max_bytes = max_bytes
        self._buf = bytearray()
        self.dropped = 0
        self.write(initial)

    def write(self, data: bytes) -> None:
        self._buf += data
        excess = len(self._buf) - self.max_bytes
        if excess > 0:
            del self._buf[:excess]
            self.dropped += excess

    def note(self, text: str) -> None:
        """A line of our own between the scripts' output, e.g. `== install.sh: exit 0 (1.2 s)`."""
        if self._buf and not self._buf.endswith(b"\n"):
            self.write(b"\n")
        self.write(f"== {text}\n".encode())

    def data(self) -> bytes:
        return bytes(self._buf)

    def tail(self, max_bytes: int | None = None) -> str:
        data = self._buf if max_bytes is None else self._buf[-max_bytes:]
        return bytes(data).decode("utf-8", "replace")


@attrs.frozen
class RunResult:
    returncode: int  # negative: killed by that signal
    timed_out: bool
    duration: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def describe(self) -> str:
        if self.timed_out:
            return f"timed out after {self.duration:.1f} s (process group killed)"
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"killed by {name}"
        return f"exit {self.returncode}"


def script_env(extra: Mapping[str, str], deploy_id: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A small, predictable environment: PATH/HOME/locale from the node, then `extra`, then the marker."""
    base = os.environ if base is None else base
    env = {k: base[k] for k in _BASE_ENV if k in base}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update(extra)
    env[MARKER_ENV] = deploy_id
    return env


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return False


def group_members(pgid: int, marker: str | None = None) -> list[int]:
    """PIDs in process group `pgid` (zombies excluded), optionally only those whose environment
    carries `P2PNODE_DEPLOY_ID=<marker>` — so recovery never kills a stranger's reused group ID."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] == b"Z" or int(fields[2]) != pgid:
                continue
            if marker is not None:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if f"{MARKER_ENV}={marker}".encode() not in fh.read().split(b"\0"):
                        continue
        except (OSError, ValueError, IndexError):
            continue
        out.append(int(entry))
    return out


async def _pump(stream: trio.abc.ReceiveStream, log: BoundedLog, done: trio.Event) -> None:
    try:
        while chunk := await stream.receive_some(65536):
            log.write(bytes(chunk))
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    finally:
        done.set()


async def run_argv(argv: Sequence[str], *, cwd: str | os.PathLike[str], env: Mapping[str, str], timeout: float, log: BoundedLog,
                   kill_grace: float = 2.0, drain: float = 0.5,
                   on_start: Callable[[int], Awaitable[None]] | None = None) -> RunResult:
    """Run `argv` in its own process group; `on_start(pgid)` is awaited once it runs."""
    started = trio.current_time()
    proc = await trio.lowlevel.open_process(list(argv), cwd=os.fspath(cwd), env=dict(env), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    timed_out = False
    try:
        async with trio.open_nursery() as nursery:
            pumped = trio.Event()
            nursery.start_soon(_pump, proc.stdout, log, pumped)
            if on_start is not None:
                await on_start(proc.pid)
            with trio.move_on_after(timeout) as scope:
                await proc.wait()
            if scope.cancelled_caught:
                timed_out = True
                kill_group(proc.pid, signal.SIGTERM)
                with trio.move_on_after(kill_grace):
                    await proc.wait()
                kill_group(proc.pid, signal.SIGKILL)  # whatever is left of the group, leader or not
                await proc.wait()
            with trio.move_on_after(drain):
                await pumped.wait()
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:  # we were cancelled: take the group down with us
            kill_group(proc.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await proc.wait()
        with trio.CancelScope(shield=True):
            await proc.stdout.aclose()
    assert proc.returncode is not None
    return RunResult(proc.returncode, timed_out, trio.current_time() - started)


async def run_script(script: str, *, cwd: str | os.PathLike[str], env: Mapping[str, str], timeout: float, log: BoundedLog,
                     shell: str = "/bin/bash", kill_grace: float = 2.0, drain: float = 0.5,
                     on_start: Callable[[int], Awaitable[None]] | None = None) -> RunResult:
    """Run a script text with `shell` (from a private temp file, so it may be up to the 100 KB limit)."""
    fd, path = tempfile.mkstemp(prefix="p2pnode-deploy-", suffix=".sh")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(script.encode())
        return await run_argv([shell, path], cwd=cwd, env=env, timeout=timeout, log=log, kill_grace=kill_grace,
                              drain=drain, on_start=on_start)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
