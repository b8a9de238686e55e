"""A node: config → database, host, document bus and the services of `services.py`, all in one
nursery; cancellation stops it cleanly (go-away to every peer, databases flushed last)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from . import __version__, bootstrap, control, datadir, services
from .cluster.health import HealthService
from .cluster.heartbeat import HeartbeatService
from .cluster.membership import MembershipService
from .cluster.status import StatusService
from .config import NodeConfig
from .host import Host, HostConfig
from .identity import KeyPair, load_or_create_key
from .logfmt import fmt, limited
from .multiaddr import Multiaddr
from .platform import nodedb
from .platform.blocks import BlockExchange
from .platform.bus import DocumentBus
from .platform.clock import Clock
from .platform.db import Database
from .platform.docstore import DocumentStore
from .platform.roster import Roster
from .platform.service import Databases, Service, ServiceContext
from .transport.upgrade import UpgradeLimits

log = logging.getLogger("p2pnode.node")
S = TypeVar("S", bound=Service)


@attrs.frozen
class NodeOptions:
    """Knobs tests and benchmarks turn; operators use config.json."""

    upgrade: UpgradeLimits = UpgradeLimits()
    store_flush_interval: float = 1.0
    control_socket: bool = True
    clock: Clock = attrs.Factory(Clock)


class Node:
    def __init__(self, config: NodeConfig, options: NodeOptions = NodeOptions()):
        self.config = config
        self.options = options
        self.identity: KeyPair | None = None
        self.host: Host | None = None
        self.db: Database | None = None
        self.bus: DocumentBus | None = None
        self.services: list[Service] = []
        self.ready = trio.Event()
        self._nursery: trio.Nursery | None = None

    def service(self, kind: type[S]) -> S:
        for s in self.services:
            if isinstance(s, kind):
                return s
        raise LookupError(f"this node runs no {kind.__name__}")

    # The core services (tests, benchmarks and the CLI read them).
    @property
    def membership(self) -> MembershipService:
        return self.service(MembershipService)

    @property
    def health(self) -> HealthService:
        return self.service(HealthService)

    @property
    def heartbeat(self) -> HeartbeatService:
        return self.service(HeartbeatService)

    @property
    def status(self) -> StatusService:
        return self.service(StatusService)

    async def stop(self) -> None:
        """Graceful stop: go-away to every peer, then cancel the services (the databases flush last)."""
        if self.host is not None:
            await self.host.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def control_path(self) -> Path:
        return self.config.data_dir / control.SOCKET_NAME

    async def run(self, *, task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED) -> None:
        with datadir.lock(self.config.data_dir):  # one process per data dir (re-entrant for the CLI's own hold)
            await self._run(task_status)

    async def _run(self, task_status: trio.TaskStatus[Node]) -> None:
        config = self.config
        self.identity, created = load_or_create_key(config.key_path)
        if created:
            log.info(fmt("key_created", path=config.key_path, peer=self.identity.peer_id))
        flush = self.options.store_flush_interval
        db = self.db = await Database.open(config.data_dir / "node.db", nodedb.MIGRATIONS, flush_interval=flush)
        databases = Databases(config.data_dir, flush)
        try:
            host = self.host = Host(self.identity, HostConfig(listen=config.listen, upgrade=self.options.upgrade, limits=config.limits))
            resolver = bootstrap.Resolver(config.dns_nameservers)
            host.name_resolver = resolver.ips if config.dns_nameservers else None
            roster = Roster(self.identity.peer_id)
            bootstrap_peers = {a.peer_id for c in config.init_connections if c.type == "multiaddr"
                               for a in [Multiaddr.parse(c.value)] if a.peer_id is not None}
            # Members (and configured bootstrap peers) are exempt from the caps and idle close that
            # the resource manager applies to strangers.
            host.set_protected(lambda peer: roster.is_member(peer) or peer in bootstrap_peers)
            roster.on_change(host.protection_changed)
            bus = self.bus = DocumentBus(host, DocumentStore(db), roster, self.options.clock)
            blocks = BlockExchange(host, roster)
            ctx = ServiceContext(self.identity, config, host, db, self.options.clock, bus, roster, databases, blocks)
            self.services = services.build(ctx, resolver)
            for service in self.services:
                await service.load()
            log.info(fmt("starting", version=__version__, peer=self.identity.peer_id, data_dir=config.data_dir,
                         cluster=config.cluster_id or None))
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(db.run)
                for extra in databases.opened:
                    await nursery.start(extra.run)
                await nursery.start(host.run)
                for service in self.services:
                    await nursery.start(service.run)
                if self.options.control_socket:
                    routes = [r for s in self.services for r in s.routes()]
                    await nursery.start(control.serve, routes, self.control_path)
                nursery.start_soon(_flush_log_summaries)
                self.ready.set()
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                if self.host is not None:
                    await self.host.aclose()  # no-op after stop(); on plain cancellation, still say go-away
                for d in [*databases.opened, db]:
                    await d.close()  # each run() closed it already unless it never started
                limited.flush(everything=True)
                log.info(fmt("stopped", peer=self.identity.peer_id))


async def _flush_log_summaries() -> None:
    """Write the rate limiter's `log_suppressed` summaries even when nothing else logs."""
    while True:
        await trio.sleep(10)
        limited.flush()
