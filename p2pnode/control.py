"""Local control API: HTTP/1.1 + JSON on a Unix socket in the data dir (mode 0600, owner only).

h11 (the sans-IO HTTP library trio-websocket already brings) parses the requests; one request
per connection. The routes are what the services contribute (`Service.routes()`), e.g.
    GET  /status            the node's status view (as /p2pnode/status/1.0.0 returns it)
    GET  /status?members=1  with every member
    POST /push              body: a signed document (CBOR, hex or base64 in JSON
                            {"envelope": "..."}) → the node's verdict
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from collections.abc import Sequence
from typing import Any

from .errors import DecodeError, P2PNodeError
from .logfmt import fmt
from .platform.service import ControlRequest, Route

SOCKET_NAME = "control.sock"
MAX_BODY = 4 << 20
TIMEOUT = 10.0

log = logging.getLogger("p2pnode.control")


class ControlError(P2PNodeError):
    pass


async def serve(routes: Sequence[Route], path: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    path = Path(path)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    log.info(fmt("control_listening", path=path))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, lambda stream: _handle(routes, stream), [listener])
            task_status.started()
    finally:
        path.unlink(missing_ok=True)


async def _handle(routes: Sequence[Route], stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    try:
        with trio.fail_after(TIMEOUT):
            request, body = await _read_request(conn, stream)
        status, payload = await _route(routes, request, body)
    except (h11.RemoteProtocolError, ControlError, DecodeError) as exc:
        status, payload = 400, {"error": str(exc)}
    except trio.TooSlowError:
        status, payload = 408, {"error": "request timed out"}
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    except Exception as exc:  # a route's bug answers 500 and is logged; it never takes the node down
        log.error(fmt("control_route_failed", error=f"{type(exc).__name__}: {exc}"), exc_info=True)
        status, payload = 500, {"error": f"internal error: {type(exc).__name__}: {exc}"}
    data = json.dumps(payload, indent=2).encode() + b"\n"
    try:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=[
                ("content-type", "application/json"), ("content-length", str(len(data))), ("connection", "close")])))
            await stream.send_all(conn.send(h11.Data(data=data)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        pass
    finally:
        await stream.aclose()


async def _read_request(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> tuple[h11.Request, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise ControlError(f"request body larger than {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage):
            if request is None:
                raise ControlError("no request line")
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("client went away")


async def _route(routes: Sequence[Route], request: h11.Request, body: bytes) -> tuple[int, Any]:
    url = urlsplit(request.target.decode())
    method = request.method.decode()
    for route in routes:
        if route.matches(method, url.path):
            with trio.fail_after(route.timeout):
                return await route.handler(ControlRequest(method, url.path, parse_qs(url.query), body))
    known = ", ".join(f"{r.method} {r.path}" for r in routes)
    return 404, {"error": f"no route {method} {url.path}; try {known}"}


async def request(path: Path, method: str, target: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """Client side, for the CLI: one request to the node's control socket."""
    try:
        stream = await trio.open_unix_socket(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ControlError(
            f"cannot reach the node's control socket {path} ({exc.strerror or exc}); is `p2pnode run` running with this data dir?"
        ) from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: only the user running the node may use it") from None
    conn = h11.Connection(h11.CLIENT)
    data = json.dumps(body).encode() if body is not None else b""
    headers = [("host", "p2pnode"), ("content-length", str(len(data))), ("content-type", "application/json")]
    async with stream:
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
        if data:
            await stream.send_all(conn.send(h11.Data(data=data)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, out = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    return status, json.loads(out or b"{}")
