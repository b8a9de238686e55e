"""`deploy.docker` through a container CLI (`docker` or `podman`, configurable, with extra arguments).

Steps, as the seed names them: pulling → stopping → starting (then the health check). Getting the
image: with an `archive` artifact (a `docker save` tarball that travelled like any other artifact)
the image is `load`ed — no registry needed, which is how a mesh without registry access deploys;
otherwise the `pull` policy decides: `always` pulls, `if_not_present` (the default) pulls only when
the image is not already on the node, `never` requires it to be there. The old container of the
same name is stopped and removed; the new one runs detached with labels naming the deploy. A
rollback re-runs the previous release's container spec (kept in the release index).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from .errors import DeployError
from .runner import RunResult
from .services import Run
from .spec import Application, DockerAction

STOP_GRACE = 10  # seconds `docker stop` waits before SIGKILL (use --init so PID 1 handles SIGTERM)


def container_name(app: Application, action: DockerAction) -> str:
    return action.name or f"{app.project}-{app.name}-{app.env}"


def run_argv(action: DockerAction, name: str, labels: Sequence[tuple[str, str]] = ()) -> list[str]:
    """The arguments after the CLI for `run -d` of `action` (already resolved)."""
    argv = ["run", "-d", "--name", name]
    for key, value in labels:
        argv += ["--label", f"{key}={value}"]
    for port in action.ports:
        argv += ["-p", port]
    for key, value in action.env:
        argv += ["-e", f"{key}={value}"]
    for volume in action.volumes:
        argv += ["-v", volume]
    return [*argv, *action.run_args, action.image, *action.command]


class Docker:
    def __init__(self, command: Sequence[str], run: Run, env: dict[str, str], query_timeout: float = 30.0):
        self.command, self.run, self.env, self.query_timeout = tuple(command), run, env, query_timeout

    async def _query(self, *args: str) -> tuple[int, str]:
        """A quick read-only CLI call whose output we need (not logged, bounded in time)."""
        with trio.move_on_after(self.query_timeout):
            result = await trio.run_process([*self.command, *args], capture_stdout=True, capture_stderr=True, check=False,
                                            env=self.env)
            return result.returncode, result.stdout.decode(errors="replace")[:4096].strip()
        raise DeployError(f"{self.command[0]} {args[0]} did not answer within {self.query_timeout:g} s")

    async def _step(self, args: Sequence[str], timeout: float, what: str) -> RunResult:
        result = await self.run([*self.command, *args], Path("/"), timeout, f"{self.command[0]} {' '.join(args)}")
        if not result.ok:
            raise DeployError(f"{what}: {self.command[0]} {args[0]} {result.describe()} (see the log)")
        return result

    async def image_present(self, image: str) -> bool:
        code, _ = await self._query("image", "inspect", image)
        return code == 0

    async def obtain(self, action: DockerAction, archive: Path | None) -> str:
        """Make the image available; returns what was done, for the report."""
        if archive is not None:
            await self._step(["load", "-i", str(archive)], action.timeout, "loading the image archive")
            if not await self.image_present(action.image):
                raise DeployError(f"the image archive does not contain {action.image}")
            return f"loaded {action.image} from the image archive"
        if action.pull == "always" or (action.pull == "if_not_present" and not await self.image_present(action.image)):
            await self._step(["pull", action.image], action.timeout, f"pulling {action.image}")
            return f"pulled {action.image}"
        if not await self.image_present(action.image):
            raise DeployError(f"image {action.image} is not on this node and the pull policy is 'never'")
        return f"{action.image} is present; not pulled (policy {action.pull})"

    async def remove(self, name: str, timeout: float) -> bool:
        """Stop and remove container `name`; False if there was none."""
        code, _ = await self._query("container", "inspect", name)
        if code != 0:
            return False
        await self._step(["stop", "-t", str(STOP_GRACE), name], timeout, f"stopping container {name}")
        await self._step(["rm", "-f", name], timeout, f"removing container {name}")
        return True

    async def start(self, action: DockerAction, name: str, labels: Sequence[tuple[str, str]]) -> None:
        await self._step(run_argv(action, name, labels), action.timeout, f"starting container {name}")

    async def running(self, name: str) -> bool:
        code, out = await self._query("container", "inspect", "--format", "{{.State.Running}}", name)
        return code == 0 and out == "true"
