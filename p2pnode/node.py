"""A node: config → store, host and services, all in one nursery; cancellation stops it cleanly."""

from __future__ import annotations

import logging

import attrs
import trio

from . import __version__, bootstrap, control
from .cluster.connectivity import Connectivity
from .cluster.health import Health
from .cluster.heartbeat import HeartbeatService
from .cluster.membership import MembershipService
from .cluster.status import StatusService
from .config import NodeConfig
from .host import Host, HostConfig
from .identity import PublicKey, load_or_create_key
from .logfmt import fmt
from .store import Store
from .transport.upgrade import UpgradeLimits

log = logging.getLogger("p2pnode.node")


@attrs.frozen
class NodeOptions:
    """Knobs tests and benchmarks turn; operators use config.json."""

    upgrade: UpgradeLimits = UpgradeLimits()
    store_flush_interval: float = 1.0
    control_socket: bool = True


class Node:
    def __init__(self, config: NodeConfig, options: NodeOptions = NodeOptions()):
        self.config = config
        self.options = options
        self.identity = None
        self.host: Host | None = None
        self.store: Store | None = None
        self.ready = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def stop(self) -> None:
        """Graceful stop: go-away to every peer, then cancel the services (the store flushes last)."""
        if self.host is not None:
            await self.host.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def control_path(self):
        return self.config.data_dir / control.SOCKET_NAME

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.identity, created = load_or_create_key(config.key_path)
        if created:
            log.info(fmt("key_created", path=config.key_path, peer=self.identity.peer_id))
        system_key = PublicKey.from_id_text(config.system_pubkey) if config.system_pubkey else None
        if system_key is None:
            log.warning(fmt("no_system_pubkey", note="any validly self-signed snapshot will be accepted; set system_pubkey"))
        self.store = await Store.open(config.data_dir / "node.db", flush_interval=self.options.store_flush_interval)
        host = self.host = Host(self.identity, HostConfig(listen=config.listen, upgrade=self.options.upgrade))
        resolver = bootstrap.Resolver(config.dns_nameservers)

        host.name_resolver = resolver.ips if config.dns_nameservers else None
        self.membership = MembershipService(host, self.store, cluster_id=config.cluster_id, system_key=system_key)
        self.health = Health(host, self.store, self.membership, interval=config.heartbeat_interval)
        self.heartbeat = HeartbeatService(
            host, self.store, self.membership, self.health,
            identity=self.identity, cluster_id=config.cluster_id, interval=config.heartbeat_interval,
        )
        self.status = StatusService(self)
        self.connectivity = Connectivity(host, self.store, self.membership, resolver, config.init_connections)
        await self.membership.load()
        await self.heartbeat.load()
        await self.connectivity.load()
        log.info(fmt("starting", version=__version__, peer=self.identity.peer_id, data_dir=config.data_dir,
                     cluster=config.cluster_id or None))
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.store.run)
                await nursery.start(host.run)
                await nursery.start(self.membership.run)
                await nursery.start(self.health.run)
                await nursery.start(self.heartbeat.run)
                await nursery.start(self.connectivity.run)
                if self.options.control_socket:
                    await nursery.start(control.serve, self, self.control_path)
                self.ready.set()
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await host.aclose()  # no-op after stop(); on plain cancellation, still say go-away
                await self.store.close()  # store.run closed it already unless it never started
                log.info(fmt("stopped", peer=self.identity.peer_id))
