"""The host: listeners, connections (one per peer), dialing, the protocol handler registry,
and the resource manager that bounds what peers can make it hold."""

from .host import Connection, HandlerExists, Host, HostConfig, open_client, open_host
from .resources import Limits, LimitsError, ResourceManager, parse_limits

__all__ = [
    "Connection", "HandlerExists", "Host", "HostConfig", "Limits", "LimitsError", "ResourceManager",
    "open_client", "open_host", "parse_limits",
]
