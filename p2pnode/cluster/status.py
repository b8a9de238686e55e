"""Status (`/p2pnode/status/1.0.0`): a node's signed view of itself and, on request, of every member.

Request: {members: bool}. Reply: a `status` envelope signed by the node. The same view is what
the local control API returns. Spec: protocols/status.md.
"""

from __future__ import annotations

import time

import trio

from .. import __version__, codec, timefmt
from ..envelope import Envelope
from ..errors import ProtocolError
from ..identity import PeerId
from ..streamio import MessageReader, send_message

PROTOCOL = "/p2pnode/status/1.0.0"
MAX_REQUEST = 1024
MAX_REPLY = 4 << 20
TIMEOUT = 10.0


def _rtt_ms(conn) -> float | None:
    rtt = conn.muxer.last_rtt if conn is not None else None
    return round(rtt * 1000, 3) if rtt is not None else None


class StatusService:
    def __init__(self, node):
        self.node = node
        self.started_at = time.time()
        node.host.set_handler(PROTOCOL, self._serve)

    def view(self, members: bool = False) -> dict:
        node = self.node
        host, membership, health, hb = node.host, node.membership, node.health, node.heartbeat
        snap = membership.current

        def peer_entry(peer_id: PeerId) -> dict:
            record = hb.peers.get(peer_id)
            conn = host.connection_to(peer_id)
            return {
                "peer_id": str(peer_id),
                "last_heartbeat": record.last_at if record and record.received else None,
                "rtt_ms": _rtt_ms(conn),
            }

        out = {
            "peer_id": str(host.peer_id),
            "cluster_id": node.config.cluster_id,
            "state": health.state,
            "member_count": len(snap.members) if snap else 0,
            "online_count": len(health.online),
            "online_members": [peer_entry(p) for p in health.online if p != host.peer_id],
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "addrs": [str(a) for a in host.full_addrs()],
            "snapshot_issued_at": snap.issued_at if snap else None,
            "heartbeats": {"sent": hb.sent, "rejected": dict(hb.rejections)},
            "snapshot_rejections": dict(membership.rejections),
            "reported_at": timefmt.now(),
        }
        if members and snap is not None:
            entries = []
            for m in snap.members:
                entry = {"peer_id": str(m.peer_id), "name": m.name, "labels": list(m.labels)}
                if m.peer_id == host.peer_id:
                    entry.update(online=True, self=True, last_heartbeat=None, rtt_ms=None, state=health.state)
                else:
                    record = hb.peers.get(m.peer_id)
                    entry.update(peer_entry(m.peer_id))
                    entry.update(online=m.peer_id in health.online, self=False, state=record.state if record else None)
                entries.append(entry)
            out["members"] = entries
        return out

    async def _serve(self, stream, conn) -> None:
        with trio.fail_after(TIMEOUT):
            f = codec.Fields(codec.decode_map(await MessageReader(stream, MAX_REQUEST).one(), "status request"), "status request")
            members = f.boolean("members", optional=True, default=False)
            env = Envelope.seal("status", self.view(members), self.node.identity)
            await send_message(stream, env.to_bytes(), MAX_REPLY)


async def fetch_status(host, peer, members: bool = False) -> dict:
    """Ask `peer` for its status; the reply's signature must be the peer's own."""
    stream = await host.new_stream(peer, PROTOCOL)
    try:
        with trio.fail_after(TIMEOUT):
            await send_message(stream, codec.encode({"members": members}), MAX_REQUEST)
            env = Envelope.from_bytes(await MessageReader(stream, MAX_REPLY).one(), "status")
    finally:
        await stream.aclose()
    view = env.verify()  # a map, or DecodeError
    expected = peer.peer_id if hasattr(peer, "peer_id") else peer
    if env.signer_id != expected or view.get("peer_id") != str(expected):
        raise ProtocolError(f"status reply is signed by {env.signer_id}, not by {expected}")
    return view
