"""Request/response over one libp2p stream: open, send one message, read one reply, close.

Every `/p2pnode/...` protocol that asks one question and gets one answer uses this pair, so the
framing (uvarint length prefix), the size limits, the deadline and the access check live in one
place. Messages are canonical CBOR maps, or raw bytes (`request_bytes`) for replies that are
signed envelopes or block data.

Access: a server names who may ask (`allow(peer_id, request)`); anyone else gets the smallest
possible answer, `{"error": "forbidden"}`, and nothing about why.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from .. import codec
from ..errors import P2PNodeError, ProtocolError
from ..identity import PeerId
from ..streamio import MessageReader, send_message

FORBIDDEN = {"error": "forbidden"}


class RequestRefused(P2PNodeError):
    """The peer answered with an error instead of a reply (e.g. not allowed to ask)."""

    def __init__(self, protocol: str, error: str):
        super().__init__(f"{protocol}: the peer refused the request ({error})")
        self.error = error


class StreamHost(Protocol):
    async def new_stream(self, peer: Any, protocols: list[str] | str) -> Any: ...
    def set_handler(self, protocol: str, handler: Callable[[Any, Any], Awaitable[None]]) -> None: ...


@attrs.frozen
class Limits:
    max_request: int
    max_reply: int
    timeout: float = 10.0


Reply = dict[str, Any] | bytes
Handler = Callable[[dict[str, Any], Any], Awaitable[Reply]]
Allow = Callable[[PeerId, dict[str, Any]], bool]


async def request_bytes(host: StreamHost, peer: Any, protocol: str, message: dict[str, Any] | bytes, limits: Limits) -> bytes:
    """Send `message` to `peer` (a PeerId or a Connection) on `protocol`; return the reply's bytes."""
    data = message if isinstance(message, bytes) else codec.encode(message)
    if len(data) > limits.max_request:
        raise ValueError(f"{protocol} request of {len(data)} bytes exceeds the maximum of {limits.max_request}")
    stream = await host.new_stream(peer, protocol)
    try:
        with trio.fail_after(limits.timeout):
            await send_message(stream, data, limits.max_request)
            return await MessageReader(stream, limits.max_reply).one()
    except trio.TooSlowError:
        raise ProtocolError(f"{protocol}: no reply within {limits.timeout:g} s") from None
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()


async def request(host: StreamHost, peer: Any, protocol: str, message: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Like request_bytes, for a CBOR map reply; an `{"error": …}` reply raises RequestRefused."""
    reply = codec.decode_map(await request_bytes(host, peer, protocol, message, limits), f"{protocol} reply")
    error = reply.get("error")
    if isinstance(error, str) and len(reply) == 1:
        raise RequestRefused(protocol, error[:200])
    return reply


def serve(host: StreamHost, protocol: str, handler: Handler, limits: Limits, *, allow: Allow | None = None) -> None:
    """Answer `protocol`: read one CBOR map (≤ max_request), call handler(request, conn), send its
    reply (a map, or bytes sent as they are), all within the deadline."""

    async def on_stream(stream: Any, conn: Any) -> None:
        with trio.fail_after(limits.timeout):
            raw = await MessageReader(stream, limits.max_request).one()
            message = codec.decode_map(raw, f"{protocol} request")
            if allow is not None and not allow(conn.peer_id, message):
                reply: Reply = FORBIDDEN
            else:
                reply = await handler(message, conn)
            data = reply if isinstance(reply, bytes) else codec.encode(reply)
            if len(data) > limits.max_reply:
                raise ProtocolError(f"{protocol} reply of {len(data)} bytes exceeds the maximum of {limits.max_reply}")
            await send_message(stream, data, limits.max_reply)

    host.set_handler(protocol, on_stream)


__all__ = ["FORBIDDEN", "Limits", "RequestRefused", "request", "request_bytes", "serve"]
