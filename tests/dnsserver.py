"""A real DNS server for the bootstrap tests: dnsmasq on a loopback port, with only our records."""

from __future__ import annotations

import shutil
import socket
import subprocess
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
def dnsmasq(txt: list[tuple[str, str]], a: list[tuple[str, str]] = (), tmp_path: Path | None = None):
    """Serve the given TXT (name, text) and A (name, ip) records on 127.0.0.1; yields "127.0.0.1:port"."""
    port = free_udp_port()
    args = [
        find_dnsmasq(), "--keep-in-foreground", "--conf-file=/dev/null", f"--port={port}",
        "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts", "--pid-file=",
        "--local=/test/",  # authoritative for .test: unknown names get NXDOMAIN, as from a real zone
    ]
    args += [f"--txt-record={name},{text}" for name, text in txt]
    args += [f"--host-record={name},{ip}" for name, ip in a]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:  # ready once it answers on the port
            if proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited: {proc.stderr.read().decode()}")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                s.sendto(_PROBE, ("127.0.0.1", port))
                try:
                    s.recvfrom(512)
                    break
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError("dnsmasq did not answer within 10 s")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
