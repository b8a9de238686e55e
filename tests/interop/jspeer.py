"""Start and drive the js-libp2p peer (tests/interop/peer.mjs) from trio code."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from contextlib import asynccontextmanager
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent


class JsPeerUnavailable(RuntimeError):
    pass


def check_available() -> None:
    if shutil.which("node") is None:
        raise JsPeerUnavailable("node is not installed (CI installs it; locally: apt-get install nodejs npm)")
    if not (HERE / "node_modules" / "libp2p").is_dir():
        raise JsPeerUnavailable(f"js-libp2p is not installed: run `npm ci --prefix {HERE}`")


class JsPeer:
    def __init__(self, process: trio.Process):
        self._process = process
        self.peer_id: str = ""
        self.addrs: list[str] = []
        self._ids = itertools.count(1)
        self._buffer = b""
        self._lock = trio.Lock()

    def addr(self, kind: str) -> str:
        """The listen address of `kind` ("tcp" or "ws"), with /p2p/."""
        for a in self.addrs:
            if (kind == "ws") == ("/ws" in a):
                return a
        raise LookupError(kind)

    async def _readline(self) -> dict:
        while b"\n" not in self._buffer:
            chunk = await self._process.stdout.receive_some(65536)
            if not chunk:
                raise JsPeerUnavailable("js peer exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    async def call(self, op: str, timeout: float = 120, **args) -> dict:
        async with self._lock:
            cmd = {"id": next(self._ids), "op": op, **args}
            await self._process.stdin.send_all((json.dumps(cmd) + "\n").encode())
            with trio.fail_after(timeout):
                reply = await self._readline()
        if "error" in reply:
            raise RuntimeError(f"js peer {op} failed: {reply['error']}")
        return reply


@asynccontextmanager
async def start_js_peer(host: str = "127.0.0.1"):
    check_available()
    env = dict(os.environ, PEER_HOST=host)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda task_status: trio.run_process(
                ["node", str(HERE / "peer.mjs")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                env=env, check=False, task_status=task_status,
            )
        )
        try:
            peer = JsPeer(process)
            with trio.fail_after(30):
                hello = await peer._readline()
            peer.peer_id, peer.addrs = hello["peerId"], hello["addrs"]
            yield peer
        finally:
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()
                with trio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            nursery.cancel_scope.cancel()
