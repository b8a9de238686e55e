"""Health checks after a deploy: HTTP (status and optional body match), TCP connect, script exit code.

The seed's defaults (`HealthCheck`): the whole check must pass within `timeout` = 60 s; a failed
attempt is retried `retries` = 3 times, `interval` = 10 s apart; each attempt gets at most
`attempt_timeout`. With `min_healthy_time` (Nomad's), the first passing attempt starts a window
that must stay healthy: the target is probed again every `interval` (or sooner, at the window's
end) and any failure counts as a failed attempt and restarts the window. `clock` and `sleep` are
injectable. HTTP is h11 over a trio TCP (or TLS) stream; the body read for matching is bounded.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio

from .runner import RunResult
from .spec import HealthCheck

MAX_BODY = 64 * 1024
ScriptRunner = Callable[[str, float], Awaitable[RunResult]]  # (script, timeout) -> result


@attrs.frozen
class HealthResult:
    ok: bool
    type: str
    attempts: int
    retry_count: int  # attempts - 1
    response_time: float  # seconds, of the last attempt
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "type": self.type, "attempts": self.attempts, "retry_count": self.retry_count,
                "response_time": round(self.response_time, 6), "message": self.message}


async def http_probe(url: str, expect_status: int = 200, body_contains: str | None = None) -> tuple[bool, str]:
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False, f"bad port in {url}"
    host = parts.hostname or ""
    try:
        if parts.scheme == "https":
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl.create_default_context())
        else:
            stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        return False, f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    conn = h11.Connection(h11.CLIENT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    status, body = 0, bytearray()
    async with stream:
        try:
            await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=[
                ("Host", parts.netloc), ("User-Agent", "p2pnode-deploy"), ("Connection", "close")])) +
                (conn.send(h11.EndOfMessage()) or b""))
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    if body_contains is None:
                        break
                elif isinstance(event, h11.Data):
                    body += event.data[: MAX_BODY - len(body)]
                    if len(body) >= MAX_BODY:
                        break
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        except (OSError, trio.BrokenResourceError, h11.ProtocolError, ssl.SSLError) as exc:
            return False, f"GET {url}: {exc}"
    if status != expect_status:
        return False, f"GET {url}: status {status}, expected {expect_status}"
    if body_contains is not None and body_contains.encode() not in body:
        return False, f"GET {url}: status {status} but the body does not contain {body_contains!r}"
    return True, f"GET {url}: status {status}"


async def tcp_probe(host: str, port: int) -> tuple[bool, str]:
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        return False, f"cannot connect to {host}:{port} ({exc.strerror or exc})"
    await stream.aclose()
    return True, f"connected to {host}:{port}"


async def probe(check: HealthCheck, run_script: ScriptRunner | None, attempt_timeout: float) -> tuple[bool, str]:
    if check.type == "http":
        assert check.url is not None
        return await http_probe(check.url, check.expect_status, check.body_contains)
    if check.type == "tcp":
        assert check.host is not None and check.port is not None
        return await tcp_probe(check.host, check.port)
    if run_script is None or check.script is None:
        return False, "script health check without a script runner"
    result = await run_script(check.script, attempt_timeout)
    return result.ok, f"health script: {result.describe()}"


async def wait_healthy(check: HealthCheck, *, run_script: ScriptRunner | None = None,
                       on_attempt: Callable[[int, bool, str], Awaitable[None]] | None = None,
                       clock: Callable[[], float] = trio.current_time,
                       sleep: Callable[[float], Awaitable[None]] = trio.sleep) -> HealthResult:
    start = clock()
    deadline = start + check.timeout
    attempts = failures = 0
    healthy_since: float | None = None
    message = "no attempt made"
    while True:
        attempts += 1
        t0 = clock()
        budget = min(check.attempt_timeout, deadline - t0)
        ok, message = False, f"no answer within {budget:.1f} s"
        with trio.move_on_after(max(budget, 0.0)):
            ok, message = await probe(check, run_script, budget)
        elapsed = clock() - t0
        if on_attempt is not None:
            await on_attempt(attempts, ok, message)
        if ok:
            healthy_since = t0 if healthy_since is None else healthy_since
            window_left = healthy_since + check.min_healthy_time - clock()
            if window_left <= 0:
                return HealthResult(True, check.type, attempts, attempts - 1, elapsed, message)
            wait = min(window_left, check.interval) if check.interval > 0 else window_left
        else:
            healthy_since = None
            failures += 1
            if failures > check.retries:
                return HealthResult(False, check.type, attempts, attempts - 1, elapsed,
                                    f"unhealthy after {attempts} attempts: {message}")
            wait = check.interval
        if clock() + wait >= deadline:
            return HealthResult(False, check.type, attempts, attempts - 1, elapsed,
                                f"not healthy within {check.timeout:g} s ({attempts} attempts): {message}")
        await sleep(wait)
