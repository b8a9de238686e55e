"""`/ipfs/ping/1.0.0` (ping/ping.md of libp2p/specs): 32 random bytes, echoed back, repeatedly."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import trio

from ..errors import ProtocolError
from ..identity import PeerId
from ..streamio import receive_exactly
from ..transport.yamux_trio import YamuxStream

if TYPE_CHECKING:
    from ..host.host import Connection, Host

PROTOCOL_ID = "/ipfs/ping/1.0.0"
PING_SIZE = 32
MAX_PINGS_PER_STREAM = 10_000


def install(host: Host) -> None:
    host.set_handler(PROTOCOL_ID, handle_ping)


async def handle_ping(stream: YamuxStream, conn: Connection) -> None:
    for _ in range(MAX_PINGS_PER_STREAM):
        payload = bytearray()
        while len(payload) < PING_SIZE:
            chunk = await stream.receive_some(PING_SIZE - len(payload))
            if not chunk:
                return
            payload += chunk
        await stream.send_all(bytes(payload))


async def ping(host: Host, peer: PeerId | Connection, count: int = 1, interval: float = 0.0) -> list[float]:
    """Ping `peer` (PeerId or Connection) `count` times on one stream; returns RTTs in seconds."""
    stream = await host.new_stream(peer, PROTOCOL_ID)
    rtts = []
    try:
        for i in range(count):
            payload = os.urandom(PING_SIZE)
            start = trio.current_time()
            await stream.send_all(payload)
            echo = await receive_exactly(stream, PING_SIZE)
            if echo != payload:
                raise ProtocolError("ping echo does not match what was sent")
            rtts.append(trio.current_time() - start)
            if interval and i + 1 < count:
                await trio.sleep(interval)
    finally:
        await stream.aclose()
    return rtts
