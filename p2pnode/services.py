"""The node's services, in start order: the one place a new service is added.

Each line builds a service from the context (and the services it depends on); the node loads them
in this order, starts them in this order, and assembles status and the control API from all of them.
"""

from __future__ import annotations

from . import bootstrap
from .cluster.connectivity import ConnectivityService
from .cluster.health import HealthService
from .cluster.heartbeat import HeartbeatService
from .cluster.membership import MembershipService
from .cluster.status import StatusService
from .deploy.service import DeployService
from .platform.blocks import BlockService
from .platform.documents_service import DocumentService
from .platform.service import Service, ServiceContext
from .sync.service import SyncService


def build(ctx: ServiceContext, resolver: bootstrap.Resolver) -> list[Service]:
    services: list[Service] = []
    membership = MembershipService(ctx)
    health = HealthService(ctx)
    services += [
        DocumentService(ctx.bus),  # first: restores every document type before the others load
        membership,
        health,
        HeartbeatService(ctx, membership, health),
        ConnectivityService(ctx, membership, resolver),
        BlockService(ctx.blocks),
        SyncService(ctx, membership),
        DeployService(ctx, membership),
        StatusService(ctx, membership, health, lambda: services),
    ]
    return services
