"""Status (`/p2pnode/status/1.0.0`): a node's signed view of itself and, on request, of every member.

The view is assembled from what every service contributes (`status()` keys, `member_status()`
columns), so a new service shows up in status by implementing those two methods. Request:
{members: bool, auth?: admin proof}. Reply: a `status` envelope signed by the node. Only members
and holders of a valid admin proof for the key they connected with are answered, unless the
operator set `public_status`. The same view is what the local control API returns; its
`/peer-status` route asks another node through this node's own (member) connection. Spec: protocols/status.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from .. import __version__, codec, timefmt
from ..envelope import Envelope
from ..errors import P2PNodeError, ProtocolError
from ..identity import PeerId
from ..multiaddr import Multiaddr
from ..platform import rpc
from ..platform.service import ControlRequest, Route, Service, ServiceContext
from .health import HealthService
from .membership import MembershipService

PROTOCOL = "/p2pnode/status/1.0.0"
LIMITS = rpc.Limits(max_request=8 << 10, max_reply=4 << 20, timeout=10.0)
ONLINE_MEMBER_KEYS = ("peer_id", "last_heartbeat", "rtt_ms")


class StatusService(Service):
    name = "status"

    def __init__(self, ctx: ServiceContext, membership: MembershipService, health: HealthService,
                 services: Callable[[], Sequence[Service]]):
        self.ctx = ctx
        self.membership = membership
        self.health = health
        self.services = services
        self.started_at = time.time()
        allow = None if ctx.config.public_status else (lambda peer, request: not ctx.bus.is_stranger(peer, request))
        rpc.serve(ctx.host, PROTOCOL, self._serve, LIMITS, allow=allow)

    def view(self, members: bool = False) -> dict[str, Any]:
        host = self.ctx.host
        out: dict[str, Any] = {
            "peer_id": str(self.ctx.peer_id),
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "addrs": [str(a) for a in host.full_addrs()],
        }
        services = self.services()
        for service in services:
            for key, value in service.status().items():
                if key in out:
                    raise RuntimeError(f"status key {key!r} is contributed twice (by {service.name})")
                out[key] = value
        rows = {row["peer_id"]: row for row in self.membership.member_rows()}
        for peer_id, row in rows.items():
            pid = PeerId.from_string(peer_id)
            for service in services:
                row.update(service.member_status(pid))
        online = [rows[str(p)] for p in self.health.online if p != self.ctx.peer_id and str(p) in rows]
        out["online_members"] = [{k: r.get(k) for k in ONLINE_MEMBER_KEYS} for r in online]
        out["problems"] = [f"{db.path.name}: {db.problem}" for db in [self.ctx.db, *self.ctx.databases.opened] if db.problem]
        out["reported_at"] = timefmt.now()
        if members and rows:
            out["members"] = list(rows.values())
        return out

    async def _serve(self, request: dict[str, Any], conn: Any) -> bytes:
        members = codec.Fields(request, "status request").boolean("members", optional=True, default=False)
        return Envelope.seal("status", self.view(bool(members)), self.ctx.identity).to_bytes()

    def routes(self) -> Sequence[Route]:
        async def status(request: ControlRequest) -> tuple[int, Any]:
            return 200, self.view(request.flag("members"))

        async def peer_status(request: ControlRequest) -> tuple[int, Any]:
            target = request.arg("peer") or ""
            try:
                peer: Any = Multiaddr.parse(target) if target.startswith("/") else PeerId.from_string(target)
                if isinstance(peer, Multiaddr):
                    peer = await self.ctx.host.connect(peer)
                with trio.fail_after(LIMITS.timeout):
                    return 200, await fetch_status(self.ctx.host, peer, members=request.flag("members"))
            except (P2PNodeError, trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return 502, {"error": f"status of {target}: {exc or type(exc).__name__}"}

        return [Route("GET", "/status", status, "the node's status view; ?members=1 adds every member"),
                Route("GET", "/peer-status", peer_status, "?peer=<multiaddr or peer id>: another node's signed status, asked as this node")]


async def fetch_status(host: Any, peer: Any, members: bool = False, auth: Envelope | None = None) -> dict[str, Any]:
    """Ask `peer` for its status; the reply's signature must be the peer's own."""
    request: dict[str, Any] = {"members": members}
    if auth is not None:
        request["auth"] = auth.to_dict()
    raw = await rpc.request_bytes(host, peer, PROTOCOL, request, LIMITS)
    reply = codec.decode_map(raw, "status reply")
    if "error" in reply and len(reply) == 1:
        raise rpc.RequestRefused(PROTOCOL, str(reply["error"])[:200])
    env = Envelope.from_dict(reply, "status")
    view: Mapping[str, Any] = env.verify()  # a map, or DecodeError
    expected = peer.peer_id if hasattr(peer, "peer_id") else peer
    if env.signer_id != expected or view.get("peer_id") != str(expected):
        raise ProtocolError(f"status reply is signed by {env.signer_id}, not by {expected}")
    return dict(view)
