"""A real DNS server for the bootstrap tests: dnsmasq on a loopback port, with only our records."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path


def find_dnsmasq() -> str:
    path = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
    if path is None:
        raise RuntimeError("dnsmasq is not installed (./test.sh installs dnsmasq-base as root)")
    return path


# A DNS query for ". NS": header (id abcd, RD, one question) + root name + type NS + class IN.
_PROBE = bytes.fromhex("abcd" "0100" "0001" "0000" "0000" "0000") + b"\x00" + bytes.fromhex("0002" "0001")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def dnsmasq(txt: list[tuple[str, str]], a: list[tuple[str, str]] = (), *, listen: str = "127.0.0.1", port: int | None = None,
            netns: str | None = None):
    """Serve the given TXT (name, text) and A (name, ip) records; yields "host:port".

    By default on 127.0.0.1 and a free port; with `netns`, inside that network namespace on
    `listen`:`port`. dnsmasq binds UDP and TCP on its port; a port free for UDP may be taken for
    TCP, so a start that fails with "Address already in use" is retried on another port."""
    for _attempt in range(5):
        use_port = port or free_udp_port()
        args = [
            find_dnsmasq(), "--keep-in-foreground", "--conf-file=/dev/null", f"--port={use_port}",
            f"--listen-address={listen}", "--bind-interfaces", "--no-resolv", "--no-hosts", "--pid-file=",
            "--local=/test/",  # authoritative for .test: unknown names get NXDOMAIN, as from a real zone
        ]
        args += [f"--txt-record={name},{text}" for name, text in txt]
        args += [f"--host-record={name},{ip}" for name, ip in a]
        if netns:
            args = ["ip", "netns", "exec", netns] + args
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            if _wait_ready(proc, listen, use_port, netns):
                yield f"{listen}:{use_port}"
                return
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if port:
            break
    raise RuntimeError("dnsmasq could not bind its port")


def _probe(listen: str, port: int, netns: str | None) -> bool:
    if netns is None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(_PROBE, (listen, port))
            try:
                s.recvfrom(512)
                return True
            except OSError:
                return False
    code = (
        "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.2); "
        f"s.sendto(bytes.fromhex('{_PROBE.hex()}'), ('{listen}', {port})); s.recvfrom(512)"
    )
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code], capture_output=True).returncode == 0


def _wait_ready(proc: subprocess.Popen, listen: str, port: int, netns: str | None) -> bool:
    """True once dnsmasq answers; False if it exited because the port was taken."""
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()
            if "Address already in use" in err:
                return False
            raise RuntimeError(f"dnsmasq exited: {err}")
        if _probe(listen, port, netns):
            return True
        if time.monotonic() > deadline:
            raise RuntimeError("dnsmasq did not answer within 10 s")
        time.sleep(0.05)
