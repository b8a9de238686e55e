"""The host's interface addresses, to turn a wildcard listen address into ones peers can dial."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

SIOCGIFADDR = 0x8915


def ipv4_addresses() -> list[str]:
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address on this interface
            out.append(socket.inet_ntoa(raw[20:24]))
    return out


def ipv6_addresses() -> list[str]:
    path = Path("/proc/net/if_inet6")
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        addr = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        if not addr.is_link_local:  # link-local needs a zone; not dialable from a multiaddr
            out.append(str(addr))
    return out


def expand(host: str) -> list[str]:
    """`0.0.0.0` / `::` → this host's addresses of that family (loopback last); others unchanged."""
    if host not in ("0.0.0.0", "::"):
        return [host]
    try:
        found = ipv4_addresses() if host == "0.0.0.0" else ipv6_addresses()
    except OSError:
        return [host]
    found.sort(key=lambda a: ipaddress.ip_address(a).is_loopback)
    return found or [host]
