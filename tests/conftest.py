"""Shared fixtures: hosts on loopback, the js-libp2p peer, log capture helpers; hypothesis profiles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent / "interop"))

from p2pnode.host import HostConfig, open_host
from p2pnode.logfmt import limited
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.transport.upgrade import UpgradeLimits

# "ci", the default: how long an example takes on 2 cores shared with other jobs says nothing about
# correctness, so no per-example deadline and no too_slow health check ("Input generation is slow").
# What is fuzzed is unchanged: max_examples stays hypothesis's default or what a test sets. Tests
# that bound time or memory assert it themselves. "dev" (HYPOTHESIS_PROFILE=dev) is hypothesis's
# stock settings, deadline and all, for finding slow paths on a quiet machine.
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("dev", settings.get_profile("default"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture
def tmpfs():
    """mount(path, size) -> grow(new_size): a small tmpfs a test can fill (needs root); unmounted after."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounts = []

    def mount(path, size):
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounts.append(path)
        return lambda new_size: subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)
