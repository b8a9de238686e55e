"""The hostile toolkit's one adapter onto p2pnode's transport internals.

Attacks that must misbehave *after* authentication (raw yamux frames, pings whose pongs are never
read, SYN floods) need a real Noise session but nothing above it. Everything they take from
`p2pnode.transport.*` is imported here and nowhere else in `tests/hostile/` (and the one reach
into a host connection's muxer is here too), so a rename of the transport cores' APIs is fixed in
this file alone. The rest of the toolkit uses the public host (`p2pnode.host.open_host`) or bytes
it builds itself.
"""

from __future__ import annotations

import trio

from p2pnode.host import Connection
from p2pnode.identity import KeyPair, PeerId
from p2pnode.transport import noise, yamux
from p2pnode.transport.multistream_trio import select
from p2pnode.transport.noise_trio import handshake

NOISE_PROTOCOL: str = noise.PROTOCOL_ID
YAMUX_PROTOCOL: str = yamux.PROTOCOL_ID


async def secure_and_select_yamux(
    raw: trio.abc.Stream, identity: KeyPair, expected_peer: PeerId | None
) -> tuple[trio.abc.Stream, bytes]:
    """Dialer side of the upgrade up to, not including, the yamux session: multistream `/noise`,
    Noise XX as `identity`, multistream `/yamux/1.0.0` inside it.

    Returns the encrypted channel (send_all encrypts, receive_some decrypts) and the plaintext
    already read past the muxer negotiation (the start of the peer's yamux frames)."""
    agreed = await select(raw, [NOISE_PROTOCOL])
    secure = await handshake(raw, identity, initiator=True, expected_peer=expected_peer, initial=agreed.trailing)
    muxer = await select(secure, [YAMUX_PROTOCOL])
    return secure, muxer.trailing


async def close_connection(conn: Connection) -> None:
    """Close one of our host's connections now (go-away, then the socket)."""
    await conn.muxer.aclose()
