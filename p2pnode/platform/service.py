"""What a service is, and what it is given.

A service is one job of the node (membership, heartbeats, sync, deploys …). The node builds each
from a `ServiceContext` — the node's identity, config, host, database, clock, document bus and
roster — never from the node itself, and runs them in order in one nursery:

    load()      read persisted state before anything listens or dials
    run()       its tasks, until cancelled (task_status.started() once ready)
    status()    the keys it contributes to the node's status view
    member_status(peer)  per-member columns of the status view
    routes()    control-API routes it serves (local Unix socket, HTTP/JSON)

Adding a service is one line in `p2pnode/services.py`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from ..identity import KeyPair, PeerId
from .clock import Clock
from .db import Database, Migration
from .roster import Roster

if TYPE_CHECKING:
    from ..config import NodeConfig
    from ..host import Host
    from .blocks import BlockExchange
    from .bus import DocumentBus


@attrs.frozen
class ControlRequest:
    method: str
    path: str
    query: Mapping[str, list[str]]
    body: bytes

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["0"])[0] in ("1", "true", "yes")

    def arg(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default

    def json(self) -> Any:
        from ..errors import DecodeError

        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise DecodeError(f"request body is not JSON: {exc}") from None


ControlHandler = Callable[[ControlRequest], Awaitable[tuple[int, Any]]]


@attrs.frozen
class Route:
    method: str
    path: str  # exact path, or a prefix ending in "/" that matches everything below it
    handler: ControlHandler
    help: str = ""
    timeout: float = 10.0  # seconds for the whole request (a rescan may take longer than a status read)

    def matches(self, method: str, path: str) -> bool:
        if method != self.method:
            return False
        return path == self.path or (self.path.endswith("/") and path.startswith(self.path))


class Databases:
    """The node's database files besides node.db (e.g. the sync index): opened by services at
    load time, flushed and closed by the node."""

    def __init__(self, data_dir: Path, flush_interval: float):
        self.data_dir = data_dir
        self.flush_interval = flush_interval
        self.opened: list[Database] = []

    async def open(self, filename: str, migrations: Sequence[Migration]) -> Database:
        db = await Database.open(self.data_dir / filename, migrations, flush_interval=self.flush_interval)
        self.opened.append(db)
        return db


@attrs.frozen
class ServiceContext:
    identity: KeyPair
    config: NodeConfig
    host: Host
    db: Database
    clock: Clock
    bus: DocumentBus
    roster: Roster
    databases: Databases
    blocks: BlockExchange

    @property
    def peer_id(self) -> PeerId:
        return self.identity.peer_id


class Service:
    """Base class; a service overrides what it has."""

    name: str = "service"

    async def load(self) -> None:
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def status(self) -> Mapping[str, Any]:
        return {}

    def member_status(self, peer_id: PeerId) -> Mapping[str, Any]:
        return {}

    def routes(self) -> Sequence[Route]:
        return ()
