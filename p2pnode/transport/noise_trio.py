"""Thin trio driver for the Noise core: runs the handshake over a raw stream and exposes the
encrypted channel as a trio.abc.Stream."""

from __future__ import annotations

import trio

from ..errors import HandshakeError
from ..identity import KeyPair, PeerId
from ..streamio import RECEIVE_SIZE, take
from .noise import DataReceived, HandshakeCompleted, NoiseCore


class NoiseStream(trio.abc.Stream):
    def __init__(self, raw: trio.abc.Stream, core: NoiseCore, remote: HandshakeCompleted, pending: bytes = b""):
        self.raw = raw
        self.remote = remote
        self._core = core
        self._pending = pending

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # send_data and data_to_send run without a checkpoint between them, so concurrent
        # writers (there is only ever one: the muxer's lock) cannot interleave frames.
        self._core.send_data(data)
        await self.raw.send_all(self._core.data_to_send())

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            data = await self.raw.receive_some(RECEIVE_SIZE)
            if not data:
                return b""
            for event in self._core.receive_data(data):
                if isinstance(event, DataReceived):
                    self._pending = event.data
        out, self._pending = take(self._pending, max_bytes)
        return out

    async def aclose(self) -> None:
        await self.raw.aclose()


async def handshake(
    raw: trio.abc.Stream,
    identity: KeyPair,
    *,
    initiator: bool,
    expected_peer: PeerId | None = None,
    initial: bytes = b"",
) -> NoiseStream:
    """Run the XX handshake; `initial` holds bytes already read past multistream negotiation.

    Raises HandshakeError (including PeerIdMismatch) or trio errors from the raw stream; the
    caller bounds the time."""
    core = NoiseCore(identity, initiator=initiator, expected_peer=expected_peer)
    core.send_handshake()
    data: bytes | bytearray = initial
    plaintext = b""
    remote: HandshakeCompleted | None = None
    while True:
        out = core.data_to_send()
        if out:
            await raw.send_all(out)
        if remote is not None:
            break
        if not data:
            data = await raw.receive_some(RECEIVE_SIZE)
            if not data:
                raise HandshakeError("connection closed during the noise handshake")
        for event in core.receive_data(data):
            if isinstance(event, HandshakeCompleted):
                remote = event
            else:
                plaintext = event.data  # transport frames that arrived with the last handshake message
        data = b""
    return NoiseStream(raw, core, remote, plaintext)
