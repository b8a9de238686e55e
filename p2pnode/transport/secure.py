"""Thin trio driver for the Noise core: runs the handshake over a raw stream and exposes the
encrypted channel as a trio.abc.Stream."""

from __future__ import annotations

import trio

from ..errors import HandshakeError
from ..identity import KeyPair, PeerId
from .noise import HandshakeComplete, NoiseConnection
from .raw import RECEIVE_SIZE, take


class NoiseStream(trio.abc.Stream):
    def __init__(self, raw: trio.abc.Stream, noise: NoiseConnection, pending: bytes = b""):
        self.raw = raw
        self._noise = noise
        self._pending = pending
        self.remote: HandshakeComplete = noise.remote

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.raw.send_all(self._noise.encrypt(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            data = await self.raw.receive_some(RECEIVE_SIZE)
            if not data:
                return b""
            _, self._pending = self._noise.receive_data(data)
        out, self._pending = take(self._pending, max_bytes)
        return out

    async def aclose(self) -> None:
        await self.raw.aclose()


async def noise_handshake(
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
    noise = NoiseConnection(identity, initiator=initiator, expected_peer=expected_peer)
    noise.start()
    data = initial
    plaintext = b""
    while True:
        out = noise.data_to_send()
        if out:
            await raw.send_all(out)
        if noise.handshake_done:
            break
        if not data:
            data = await raw.receive_some(RECEIVE_SIZE)
            if not data:
                raise HandshakeError("connection closed during the noise handshake")
        _, plaintext = noise.receive_data(data)
        data = b""
    # Transport frames that arrived in the same read as the last handshake message.
    return NoiseStream(raw, noise, plaintext)
