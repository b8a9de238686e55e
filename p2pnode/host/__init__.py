"""The host: listeners, connections (one per peer), dialing, the protocol handler registry."""

from .host import Connection, Host, HostConfig, open_client, open_host

__all__ = ["Connection", "Host", "HostConfig", "open_client", "open_host"]
