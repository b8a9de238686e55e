"""A hostile peer that *serves*: whoever pulls documents from it gets a poisoned reply.

The node pulls `/p2pnode/doc-pull/1.0.0` from every peer it connects to, in either direction:
from a peer that dialed it, and from a bootstrap peer it dialed itself. `HostileServer` is a real
host (`p2pnode.host.open_host`) listening on loopback whose pull handler answers with a reply an
attack chose (a shared-reference snapshot, 1,000 bogus revocations). After answering it drops the
connection, so the node reconnects (bootstrap) or the attacker redials (inbound), and pulls again.

A server opened unarmed answers like a harmless peer with nothing newer and keeps its
connections: the node can bootstrap from it before the measurement starts. `arm()` switches it
to the poisoned reply and drops its connections, which makes the node dial again and pull.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from p2pnode import codec
from p2pnode.host import Connection, Host, HostConfig, open_host
from p2pnode.identity import KeyPair, PeerId
from p2pnode.multiaddr import Multiaddr
from p2pnode.platform.bus import PULL, PULL_LIMITS
from p2pnode.streamio import MessageReader, send_message

from .wire import close_connection


HARMLESS_REPLY = codec.encode({"docs": [], "need_have": [], "more": False})


class HostileServer:
    def __init__(self, host: Host, reply: dict[str, Any], armed: bool):
        self.host = host
        self.reply = codec.encode(reply)
        self.armed = armed
        self.served = 0  # poisoned replies sent
        self.failed = 0  # pulls that broke off before the reply was out
        self._served_event = trio.Event()
        host.set_handler(PULL, self._serve_pull)

    async def arm(self) -> None:
        """From now on serve the poisoned reply; drop every connection so the node pulls anew."""
        self.armed = True
        for conn in self.host.connections():
            await close_connection(conn)

    @property
    def addr(self) -> Multiaddr:
        """The full multiaddr (with /p2p/) a node can bootstrap from."""
        return self.host.full_addrs()[0]

    async def wait_served(self) -> None:
        await self._served_event.wait()
        self._served_event = trio.Event()

    def disarm(self) -> None:
        """Back to harmless replies (the node may keep pulling after the attack is over)."""
        self.armed = False

    async def _serve_pull(self, stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
        armed = self.armed
        try:
            with trio.fail_after(30):
                await MessageReader(stream, PULL_LIMITS.max_request).one()
                await send_message(stream, self.reply if armed else HARMLESS_REPLY, PULL_LIMITS.max_reply)
        except Exception:
            self.failed += armed
            raise
        if not armed:
            return
        self.served += 1
        self._served_event.set()
        await stream.send_eof()
        # Hang up only once the node has closed its end, i.e. read the whole reply.
        with trio.move_on_after(30):
            while await stream.receive_some(65536):
                pass
        await close_connection(conn)


def key_sorting_above(peer: PeerId) -> KeyPair:
    """An identity whose peer ID sorts above `peer`'s. A node waits 3–6 s before dialing a peer
    whose ID is smaller than its own (so that of two members the smaller dials first), and it
    waits again before every redial; a bootstrap server with a larger ID is redialed at once."""
    while True:
        key = KeyPair.generate()
        if key.peer_id > peer:
            return key


@asynccontextmanager
async def open_hostile_server(
    reply: dict[str, Any], *, identity: KeyPair | None = None, armed: bool = True
) -> AsyncIterator[HostileServer]:
    """A hostile server listening on 127.0.0.1 (random port) for the duration of the block."""
    config = HostConfig(listen=(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"),))
    async with open_host(identity or KeyPair.generate(), config) as host:
        yield HostileServer(host, reply, armed)
