"""DNS bootstrap: `_dnsaddr.<domain>` TXT records (then `<domain>`), and name resolution for dials.

A TXT record is `dnsaddr=/…` or a bare multiaddr. `/dnsaddr/<name>` inside a record is resolved
in turn, up to MAX_DEPTH levels. Results are merged per peer. The resolver uses the configured
nameservers (`host:port`, for a private resolver) or the system's, through dnspython's trio
backend.
"""

from __future__ import annotations

import logging
import socket

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from .errors import DecodeError, P2PNodeError
from .identity import PeerId
from .logfmt import fmt
from .multiaddr import Multiaddr

log = logging.getLogger("p2pnode.bootstrap")
MAX_DEPTH = 4
MAX_RECORDS = 256
LIFETIME = 5.0


class BootstrapError(P2PNodeError):
    pass


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    return dns.nameserver.Do53Nameserver(host, port)


class Resolver:
    def __init__(self, nameservers: tuple[str, ...] | list[str] = ()):
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(n) for n in nameservers]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = ["127.0.0.1"]
        self._backend = dns.asyncbackend.get_backend("trio")

    async def txt(self, name: str) -> list[str]:
        """TXT strings of `name`; [] when the name or the records do not exist."""
        try:
            answer = await self._resolver.resolve(name, "TXT", backend=self._backend, lifetime=LIFETIME)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
            raise BootstrapError(f"DNS lookup of {name} TXT failed: {exc}") from None
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer][:MAX_RECORDS]

    async def ips(self, name: str, family: int = socket.AF_UNSPEC) -> list[str]:
        """A and/or AAAA addresses of `name` (for /dns, /dns4, /dns6 at dial time)."""
        types = {int(socket.AF_INET): ["A"], int(socket.AF_INET6): ["AAAA"]}.get(int(family), ["A", "AAAA"])
        out: list[str] = []
        errors = []
        for rtype in types:
            try:
                answer = await self._resolver.resolve(name, rtype, backend=self._backend, lifetime=LIFETIME)
                out += [r.to_text() for r in answer]
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except (dns.resolver.NoNameservers, dns.exception.Timeout) as exc:
                errors.append(str(exc))
        if not out and errors:
            raise BootstrapError(f"DNS lookup of {name} failed: {'; '.join(errors)}")
        return out


def parse_txt(record: str) -> Multiaddr | None:
    text = record.strip()
    if text.startswith("dnsaddr="):
        text = text[len("dnsaddr="):]
    if not text.startswith("/"):
        return None  # some other TXT record sharing the name
    return Multiaddr.parse(text)


async def resolve_dnsaddr(resolver: Resolver, domain: str, depth: int = 0) -> list[Multiaddr]:
    """Every multiaddr the domain's TXT records lead to, nested /dnsaddr resolved."""
    if depth > MAX_DEPTH:
        raise BootstrapError(f"dnsaddr {domain}: nested deeper than {MAX_DEPTH} levels (a loop?)")
    records = await resolver.txt(f"_dnsaddr.{domain}")
    if not records:
        records = await resolver.txt(domain)
    out: list[Multiaddr] = []
    for record in records:
        try:
            addr = parse_txt(record)
        except DecodeError as exc:
            log.warning(fmt("bootstrap_bad_record", domain=domain, record=record, reason=str(exc)))
            continue
        if addr is None:
            continue
        if addr.protocols()[0] == "dnsaddr":
            nested = await resolve_dnsaddr(resolver, addr.value_for("dnsaddr") or "", depth + 1)
            want = addr.peer_id
            out += [a for a in nested if want is None or a.peer_id == want]
        else:
            out.append(addr)
    return out


def merge_by_peer(addrs: list[Multiaddr]) -> dict[PeerId | None, list[Multiaddr]]:
    """Group addresses by their /p2p/ peer (None for addresses without one), keeping order."""
    merged: dict[PeerId | None, list[Multiaddr]] = {}
    for addr in addrs:
        pid = addr.peer_id
        bucket = merged.setdefault(pid, [])
        plain = addr.without_peer_id() if pid is not None else addr
        if plain not in bucket:
            bucket.append(plain)
    return merged


async def resolve_init_connections(resolver: Resolver, entries) -> dict[PeerId | None, list[Multiaddr]]:
    """`init_connections` from the config → addresses merged per peer. A failing entry is logged and skipped."""
    addrs: list[Multiaddr] = []
    for entry in entries:
        try:
            if entry.type == "dns":
                found = await resolve_dnsaddr(resolver, entry.value)
                log.info(fmt("bootstrap_resolved", domain=entry.value, addrs=len(found)))
                addrs += found
            else:
                addr = Multiaddr.parse(entry.value)
                if addr.protocols()[0] == "dnsaddr":
                    addrs += await resolve_dnsaddr(resolver, addr.value_for("dnsaddr") or "")
                else:
                    addrs.append(addr)
        except (BootstrapError, DecodeError) as exc:
            log.warning(fmt("bootstrap_failed", entry=entry.value, reason=str(exc)))
    return merge_by_peer(addrs)
