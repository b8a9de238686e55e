"""Shared fixtures: hosts on loopback, the js-libp2p peer, log capture helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "interop"))

from p2pnode.host import HostConfig, open_host
from p2pnode.logfmt import limited
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.transport.upgrade import UpgradeLimits

LOOPBACK_TCP = Multiaddr.parse("/ip4/127.0.0.1/tcp/0")
LOOPBACK_WS = Multiaddr.parse("/ip4/127.0.0.1/tcp/0/ws")


def host_config(*listen: str | Multiaddr, **upgrade_limits) -> HostConfig:
    addrs = tuple(a if isinstance(a, Multiaddr) else Multiaddr.parse(a) for a in listen)
    return HostConfig(listen=addrs, upgrade=UpgradeLimits(**upgrade_limits))


@pytest.fixture
def make_host():
    """`async with make_host(listen...) as host` — a host whose lifetime is the block."""

    def factory(*listen, identity: KeyPair | None = None, config: HostConfig | None = None, **limits):
        cfg = config if config is not None else host_config(*(listen or (LOOPBACK_TCP,)), **limits)
        return open_host(identity or KeyPair.generate(), cfg)

    return factory


@pytest.fixture(autouse=True)
def fresh_log_limits():
    """The process-wide log rate limiter starts empty for every test (tests assert on log lines)."""
    limited.reset()
    yield
    limited.reset()
