"""`/ipfs/id/1.0.0` and `/ipfs/id/push/1.0.0` (identify/README.md of libp2p/specs).

The responder writes one length-prefixed protobuf Identify message and closes the stream.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from .. import AGENT_VERSION, protobuf
from ..errors import DecodeError
from ..identity import PeerId, PublicKey
from ..logfmt import fmt
from ..multiaddr import Multiaddr
from ..streamio import MessageReader, send_message
from ..transport.yamux_trio import YamuxStream

if TYPE_CHECKING:
    from ..host.host import Connection, Host

PROTOCOL_ID = "/ipfs/id/1.0.0"
PUSH_PROTOCOL_ID = "/ipfs/id/push/1.0.0"
PROTOCOL_VERSION = "ipfs/0.1.0"
MAX_IDENTIFY_SIZE = 64 * 1024

log = logging.getLogger("p2pnode.identify")


@attrs.frozen
class IdentifyRecord:
    protocol_version: str | None = None
    agent_version: str | None = None
    public_key: bytes | None = None
    listen_addrs: tuple[bytes, ...] = ()
    observed_addr: bytes | None = None
    protocols: tuple[str, ...] = ()

    def encode(self) -> bytes:
        fields: list[tuple[int, bytes | str]] = []
        if self.public_key is not None:
            fields.append((1, self.public_key))
        fields += [(2, a) for a in self.listen_addrs]
        fields += [(3, p) for p in self.protocols]
        if self.observed_addr is not None:
            fields.append((4, self.observed_addr))
        if self.protocol_version is not None:
            fields.append((5, self.protocol_version))
        if self.agent_version is not None:
            fields.append((6, self.agent_version))
        return protobuf.encode_fields(fields)

    @classmethod
    def decode(cls, data: bytes) -> IdentifyRecord:
        fields = protobuf.decode_fields(data)

        def text(value: bytes, name: str) -> str:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"identify {name} is not UTF-8") from None

        def first(number: int) -> bytes | None:
            value = protobuf.first(fields, number, bytes)
            return value if isinstance(value, bytes) else None

        pv, av = first(5), first(6)
        return cls(
            protocol_version=text(pv, "protocolVersion") if pv is not None else None,
            agent_version=text(av, "agentVersion") if av is not None else None,
            public_key=first(1),
            listen_addrs=tuple(protobuf.repeated(fields, 2)),
            observed_addr=first(4),
            protocols=tuple(text(p, "protocol") for p in protobuf.repeated(fields, 3)),
        )

    def listen_multiaddrs(self) -> list[Multiaddr]:
        """The listen addresses we can parse; others (quic, webrtc, …) are skipped, not fatal."""
        out = []
        for raw in self.listen_addrs:
            try:
                out.append(Multiaddr.from_bytes(raw))
            except DecodeError:
                continue
        return out

    def observed_multiaddr(self) -> Multiaddr | None:
        if self.observed_addr is None:
            return None
        try:
            return Multiaddr.from_bytes(self.observed_addr)
        except DecodeError:
            return None


def local_record(host: Host, conn: Connection) -> IdentifyRecord:
    return IdentifyRecord(
        protocol_version=PROTOCOL_VERSION,
        agent_version=AGENT_VERSION,
        public_key=host.identity.public_key.to_protobuf(),
        listen_addrs=tuple(a.to_bytes() for a in host.announce_addrs()),
        observed_addr=conn.remote_addr.to_bytes(),
        protocols=tuple(host.protocols),
    )


def _apply(host: Host, conn: Connection, record: IdentifyRecord) -> None:
    if record.public_key is not None:
        key = PublicKey.from_protobuf(record.public_key)
        if key.peer_id != conn.peer_id:
            raise DecodeError("identify public key does not match the connection's peer ID")
    info = host.peerstore.get(conn.peer_id)
    info.protocols = record.protocols
    info.agent_version = record.agent_version
    info.protocol_version = record.protocol_version
    info.observed_addr = record.observed_multiaddr()
    if record.public_key is not None:
        info.public_key = PublicKey.from_protobuf(record.public_key)
    host.peerstore.add_addrs(conn.peer_id, record.listen_multiaddrs())


def install(host: Host) -> None:
    """Serve identify and identify-push, and identify every new connection in the background."""

    async def serve(stream: YamuxStream, conn: Connection) -> None:
        await send_message(stream, local_record(host, conn).encode(), MAX_IDENTIFY_SIZE)

    async def serve_push(stream: YamuxStream, conn: Connection) -> None:
        _apply(host, conn, IdentifyRecord.decode(await MessageReader(stream, MAX_IDENTIFY_SIZE).one()))

    async def identify_quietly(conn: Connection) -> None:
        try:
            await identify(host, conn)
        except Exception as exc:  # identify is best effort: the connection stays usable without it
            log.debug(fmt("identify_failed", peer=conn.peer_id, reason=f"{type(exc).__name__}: {exc}"))

    def on_connected(conn: Connection) -> None:
        if conn.nursery is not None:
            conn.nursery.start_soon(identify_quietly, conn)

    host.set_handler(PROTOCOL_ID, serve)
    host.set_handler(PUSH_PROTOCOL_ID, serve_push)
    host.on_connected(on_connected)


async def identify(host: Host, peer: PeerId | Connection) -> IdentifyRecord:
    """Ask `peer` (PeerId or Connection) for its identify record and store what it says."""
    stream = await host.new_stream(peer, PROTOCOL_ID)
    try:
        record = IdentifyRecord.decode(await MessageReader(stream, MAX_IDENTIFY_SIZE).one())
    finally:
        await stream.aclose()
    conn = host.connection_to(peer) if isinstance(peer, PeerId) else peer
    if conn is not None:
        _apply(host, conn, record)
    log.debug(fmt("identified", peer=conn.peer_id if conn else peer, agent=record.agent_version))
    return record
