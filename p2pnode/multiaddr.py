"""Multiaddrs: text and binary codecs for the protocols p2pnode dials and announces.

Supported: ip4, ip6, tcp, dns, dns4, dns6, dnsaddr, ws, wss, p2p (alias ipfs in text).
Anything else — an unknown protocol, a bad address, a missing value — is a DecodeError that
names the component and says what was expected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import attrs

from . import varint
from .errors import DecodeError
from .identity import PeerId


@attrs.frozen
class _Proto:
    name: str
    code: int
    size: int  # bits; 0 = no value, -1 = varint length-prefixed


PROTOCOLS = [
    _Proto("ip4", 4, 32),
    _Proto("tcp", 6, 16),
    _Proto("ip6", 41, 128),
    _Proto("dns", 53, -1),
    _Proto("dns4", 54, -1),
    _Proto("dns6", 55, -1),
    _Proto("dnsaddr", 56, -1),
    _Proto("p2p", 421, -1),
    _Proto("ws", 477, 0),
    _Proto("wss", 478, 0),
]
_BY_NAME = {p.name: p for p in PROTOCOLS}
_BY_NAME["ipfs"] = _BY_NAME["p2p"]
_BY_CODE = {p.code: p for p in PROTOCOLS}
MAX_DNS_NAME = 253


def _value_to_bytes(proto: _Proto, value: str) -> bytes:
    name = proto.name
    try:
        if name == "ip4":
            return ipaddress.IPv4Address(value).packed
        if name == "ip6":
            return ipaddress.IPv6Address(value).packed
        if name == "tcp":
            port = int(value, 10)
            if not 0 <= port <= 65535 or not value.isdigit():
                raise ValueError
            return port.to_bytes(2, "big")
    except ValueError:
        raise DecodeError(f"multiaddr /{name}: invalid value {value!r}") from None
    if name == "p2p":
        try:
            return PeerId.from_string(value).multihash
        except DecodeError as exc:
            raise DecodeError(f"multiaddr /{name}: {exc}") from None
    if name in ("dns", "dns4", "dns6", "dnsaddr"):
        if not value or len(value) > MAX_DNS_NAME or "/" in value:
            raise DecodeError(f"multiaddr /{name}: invalid domain name {value!r}")
        return value.encode("utf-8")
    raise DecodeError(f"multiaddr /{name}: takes no value")


def _value_from_bytes(proto: _Proto, raw: bytes) -> str:
    name = proto.name
    if name == "ip4":
        return str(ipaddress.IPv4Address(raw))
    if name == "ip6":
        return str(ipaddress.IPv6Address(raw))
    if name == "tcp":
        return str(int.from_bytes(raw, "big"))
    if name == "p2p":
        return PeerId.from_bytes(raw).to_base58()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"multiaddr /{name}: value is not UTF-8") from None
    if not text or "/" in text or len(text) > MAX_DNS_NAME:
        raise DecodeError(f"multiaddr /{name}: invalid domain name {text!r}")
    return text


@attrs.frozen
class Multiaddr:
    """An immutable multiaddr: a tuple of (protocol name, value or None)."""

    components: tuple[tuple[str, str | None], ...]

    @classmethod
    def parse(cls, text: str) -> Multiaddr:
        if not isinstance(text, str) or not text.startswith("/"):
            raise DecodeError(f"multiaddr {text!r} must start with '/'")
        parts = text.split("/")[1:]
        if parts and parts[-1] == "":
            parts.pop()  # tolerate one trailing slash
        if not parts:
            raise DecodeError("multiaddr is empty")
        components: list[tuple[str, str | None]] = []
        i = 0
        while i < len(parts):
            name = parts[i]
            proto = _BY_NAME.get(name)
            if proto is None:
                raise DecodeError(f"multiaddr {text!r}: unknown protocol {name!r}")
            i += 1
            if proto.size == 0:
                components.append((proto.name, None))
                continue
            if i >= len(parts) or parts[i] == "":
                raise DecodeError(f"multiaddr {text!r}: /{name} needs a value")
            value = parts[i]
            i += 1
            canonical = _value_from_bytes(proto, _value_to_bytes(proto, value))
            components.append((proto.name, canonical))
        return cls(tuple(components))

    @classmethod
    def from_bytes(cls, data: bytes) -> Multiaddr:
        data = bytes(data)
        if not data:
            raise DecodeError("multiaddr is empty")
        components: list[tuple[str, str | None]] = []
        pos = 0
        while pos < len(data):
            code, pos = varint.decode_complete(data, pos)
            proto = _BY_CODE.get(code)
            if proto is None:
                raise DecodeError(f"multiaddr: unknown protocol code {code}")
            if proto.size == 0:
                components.append((proto.name, None))
                continue
            if proto.size > 0:
                length = proto.size // 8
            else:
                length, pos = varint.decode_complete(data, pos)
            if pos + length > len(data):
                raise DecodeError(f"multiaddr: /{proto.name} value truncated")
            components.append((proto.name, _value_from_bytes(proto, data[pos : pos + length])))
            pos += length
        return cls(tuple(components))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for name, value in self.components:
            proto = _BY_NAME[name]
            out += varint.encode(proto.code)
            if proto.size == 0 or value is None:
                continue
            raw = _value_to_bytes(proto, value)
            if proto.size < 0:
                out += varint.encode(len(raw))
            out += raw
        return bytes(out)

    def __str__(self) -> str:
        return "".join(f"/{n}" if v is None else f"/{n}/{v}" for n, v in self.components)

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        return iter(self.components)

    def value_for(self, name: str) -> str | None:
        for n, v in self.components:
            if n == name:
                return v
        return None

    def protocols(self) -> list[str]:
        return [n for n, _ in self.components]

    @property
    def peer_id(self) -> PeerId | None:
        value = self.value_for("p2p")
        return PeerId.from_string(value) if value else None

    def without_peer_id(self) -> Multiaddr:
        return Multiaddr(tuple(c for c in self.components if c[0] != "p2p"))

    def with_peer_id(self, peer_id: PeerId) -> Multiaddr:
        return Multiaddr(self.without_peer_id().components + (("p2p", peer_id.to_base58()),))



def ensure(value: Multiaddr | str) -> Multiaddr:
    return value if isinstance(value, Multiaddr) else Multiaddr.parse(value)
