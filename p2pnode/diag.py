"""Diagnostic protocols for measuring a link: echo and sink. Not served unless installed.

`/p2pnode/test/echo/1.0.0` returns every byte; `/p2pnode/test/sink/1.0.0` drains the stream and,
at its end, answers with the byte count (8 bytes, big-endian). The interop tests and the
transport benchmark use them against js-libp2p, which serves the same two protocols.
"""

from __future__ import annotations

import hashlib

import trio

from .errors import ProtocolError
from .streamio import receive_exactly
from .trioutil import open_nursery_unwrapped

ECHO = "/p2pnode/test/echo/1.0.0"
SINK = "/p2pnode/test/sink/1.0.0"
CHUNK = 64 * 1024


def install(host) -> None:
    host.set_handler(ECHO, serve_echo)
    host.set_handler(SINK, serve_sink)


async def serve_echo(stream, conn) -> None:
    while True:
        data = await stream.receive_some()
        if not data:
            break
        await stream.send_all(data)
    await stream.send_eof()


async def serve_sink(stream, conn) -> None:
    total = 0
    while True:
        data = await stream.receive_some()
        if not data:
            break
        total += len(data)
    await stream.send_all(total.to_bytes(8, "big"))
    await stream.send_eof()


def pattern(seed: int) -> bytes:
    """64 KiB of deterministic bytes, the same as tests/interop/peer.mjs makes for `seed`."""
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(0, CHUNK, 32))


async def _one(host, peer, protocol: str, nbytes: int, index: int) -> None:
    stream = await host.new_stream(peer, protocol)
    data = pattern(index)
    view = memoryview(data)

    async def writer() -> None:
        sent = 0
        while sent < nbytes:
            n = min(CHUNK, nbytes - sent)
            await stream.send_all(view[:n])
            sent += n
        await stream.send_eof()

    async with open_nursery_unwrapped() as nursery:
        nursery.start_soon(writer)
        if protocol == ECHO:
            received = 0
            while True:
                chunk = await stream.receive_some()
                if not chunk:
                    break
                offset = received % CHUNK
                expected = (data[offset:] + data * (len(chunk) // CHUNK + 1))[: len(chunk)]
                if chunk != expected:
                    bad = next(i for i in range(len(chunk)) if chunk[i] != expected[i])
                    raise ProtocolError(f"echo mismatch at byte {received + bad} of stream {index}")
                received += len(chunk)
            if received != nbytes:
                raise ProtocolError(f"echo returned {received} of {nbytes} bytes on stream {index}")
        else:
            count = int.from_bytes(await receive_exactly(stream, 8), "big")
            if count != nbytes:
                raise ProtocolError(f"sink counted {count} of {nbytes} bytes on stream {index}")
    await stream.aclose()


async def transfer(host, peer, protocol: str, total_bytes: int, streams: int = 1) -> float:
    """Send `total_bytes` split over `streams` concurrent streams; returns seconds taken.
    Raises ProtocolError if a single byte comes back wrong (echo) or is missing (sink)."""
    per = total_bytes // streams
    start = trio.current_time()
    async with open_nursery_unwrapped() as nursery:
        for i in range(streams):
            nursery.start_soon(_one, host, peer, protocol, per, i)
    return trio.current_time() - start
