"""Test helpers for the control plane: a cluster's keys, signed documents, nodes on loopback."""

from __future__ import annotations

import random
import socket
from pathlib import Path

import attrs
import trio

from p2pnode import timefmt
from p2pnode.cluster.documents import AdminProof, Member, Revocation, Snapshot
from p2pnode.config import InitConnection, NodeConfig
from p2pnode.identity import KeyPair, load_key, save_key
from p2pnode.multiaddr import Multiaddr
from p2pnode.node import Node, NodeOptions
from p2pnode.transport.upgrade import UpgradeLimits

HOUR = 3600 * timefmt.NS


_handed_out: set[int] = set()


def free_tcp_port() -> int:
    """A port to listen on later. Taken from below the kernel's ephemeral range, so that an
    outgoing connection made meanwhile cannot be holding it when the node binds."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port in _handed_out:  # bindable, but promised to another node of this process already
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port in 20000-32000")


class ClusterKit:
    def __init__(self, cluster_id: str = "test-cluster"):
        self.cluster_id = cluster_id
        self.system = KeyPair.generate()
        self.admin = KeyPair.generate()

    @property
    def system_pubkey(self) -> str:
        return str(self.system.peer_id)

    def proof(self, admin: KeyPair | None = None, *, valid_from: int | None = None, valid_until: int | None = None,
              cluster_id: str | None = None, role: str = "admin", signer: KeyPair | None = None):
        now = timefmt.now_ns()
        proof = AdminProof(
            role=role, cluster_id=cluster_id or self.cluster_id, admin_peer_id=(admin or self.admin).peer_id,
            valid_from_ns=valid_from if valid_from is not None else now - 24 * HOUR,
            valid_until_ns=valid_until if valid_until is not None else now + 24 * HOUR,
            issued_at_ns=now,
        )
        return proof.sign(signer or self.system)

    def snapshot(self, members: list[Member], *, issued_at: int | None = None, admin: KeyPair | None = None,
                 proof=..., cluster_id: str | None = None):
        admin = admin or self.admin
        snap = Snapshot(
            cluster_id=cluster_id or self.cluster_id,
            issued_at_ns=issued_at if issued_at is not None else timefmt.now_ns(),
            issuer_peer_id=admin.peer_id,
            members=tuple(members),
            admin_proof=self.proof(admin) if proof is ... else proof,
        )
        return snap.sign(admin)

    def revocation(self, admins: list[KeyPair], signer: KeyPair | None = None):
        return Revocation(self.cluster_id, timefmt.now_ns(), tuple(a.peer_id for a in admins), "test").sign(signer or self.system)


class ClusterNode:
    """A node's identity, port and data dir, fixed before it starts so DNS records and snapshots can name it."""

    def __init__(self, kit: ClusterKit, root: Path, name: str, *, interval: float = 0.3, init=(), nameservers=(),
                 cluster_id: str | None = None, system_pubkey: str | None = None):
        self.name = name
        self.port = free_tcp_port()
        self.data_dir = root / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if (self.data_dir / "node.key").exists():  # pre-provisioned (p2pnode-admin new-node)
            self.key = load_key(self.data_dir / "node.key")
        else:
            self.key = KeyPair.generate()
            save_key(self.data_dir / "node.key", self.key)
        self.addr = Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{self.port}")
        self.config = NodeConfig(
            data_dir=self.data_dir, listen=(self.addr,), cluster_id=cluster_id or kit.cluster_id,
            system_pubkey=system_pubkey or kit.system_pubkey,
            heartbeat_interval=interval, init_connections=tuple(InitConnection(*i) for i in init), dns_nameservers=tuple(nameservers),
        )
        self.node: Node | None = None
        self._scope: trio.CancelScope | None = None

    @property
    def peer_id(self):
        return self.key.peer_id

    def set_bootstrap(self, init: list[tuple[str, str]], nameservers: list[str] = ()) -> None:
        self.config = attrs.evolve(
            self.config, init_connections=tuple(InitConnection(*i) for i in init), dns_nameservers=tuple(nameservers)
        )

    @property
    def full_addr(self) -> Multiaddr:
        return self.addr.with_peer_id(self.peer_id)

    def member(self, labels=()) -> Member:
        return Member(self.peer_id, self.name, (self.addr,), tuple(labels))

    async def start(self, nursery: trio.Nursery) -> Node:
        self.node = Node(self.config, NodeOptions(upgrade=UpgradeLimits(keepalive_interval=5), store_flush_interval=0.2))
        await nursery.start(self.node.run)
        return self.node

    async def stop(self) -> None:
        await self.node.stop()
        with trio.fail_after(10):
            while not self.node.db.closed:
                await trio.sleep(0.01)


async def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
