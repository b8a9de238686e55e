"""Test hosts in network namespaces: a hub namespace with a bridge, one namespace per host.

Everything lives in namespaces this module creates (names carry a per-run token), so the
tests never touch the machine's own interfaces or routes; `Lab.close()` removes them all, and
kills every process started in them, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.213.0"


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


class NamespaceUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def lab_or_fail(hosts: int):
    """A Lab for a test: the test fails with the reason when namespaces cannot be made; always closed."""
    import pytest

    try:
        lab = Lab(hosts)
    except NamespaceUnavailable as exc:
        pytest.fail(str(exc))
    try:
        yield lab
    finally:
        lab.close()


class Lab:
    def __init__(self, hosts: int):
        self.token = f"{os.getpid() % 100000:05d}"
        self.hub = f"p2pt{self.token}hub"
        self.hosts = [f"p2pt{self.token}h{i}" for i in range(1, hosts + 1)]
        self.procs: list[subprocess.Popen] = []
        try:
            run("ip", "netns", "add", self.hub)
        except (subprocess.CalledProcessError, FileNotFoundError) as exc:
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
            raise NamespaceUnavailable(f"cannot create network namespaces ({detail}); run the tests as root with iproute2") from None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        hub = ["ip", "netns", "exec", self.hub]
        run(*hub, "ip", "link", "set", "lo", "up")
        run(*hub, "ip", "link", "add", "br0", "type", "bridge")
        run(*hub, "ip", "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        run(*hub, "ip", "link", "set", "br0", "up")
        for i, ns in enumerate(self.hosts, start=1):
            run("ip", "netns", "add", ns)
            outside, inside = f"pt{self.token}{i}h", f"pt{self.token}{i}n"
            run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            run("ip", "link", "set", outside, "netns", self.hub)
            run("ip", "link", "set", inside, "netns", ns)
            run(*hub, "ip", "link", "set", outside, "master", "br0")
            run(*hub, "ip", "link", "set", outside, "up")
            inns = ["ip", "netns", "exec", ns]
            run(*inns, "ip", "link", "set", "lo", "up")
            run(*inns, "ip", "link", "set", inside, "name", "eth0")
            run(*inns, "ip", "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            run(*inns, "ip", "link", "set", "eth0", "up")

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{10 + i}"

    @property
    def hub_ip(self) -> str:
        return f"{SUBNET}.1"

    def exec_args(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def spawn(self, ns: str, args: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "ab")
        proc = subprocess.Popen(self.exec_args(ns, *args), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    def link(self, i: int, up: bool) -> None:
        run(*self.exec_args(self.hosts[i - 1], "ip", "link", "set", "eth0", "up" if up else "down"))

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        for ns in self.hosts + [self.hub]:
            run("ip", "netns", "del", ns, check=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(ns in run("ip", "netns", "list").stdout for ns in self.hosts + [self.hub]):
            time.sleep(0.1)
