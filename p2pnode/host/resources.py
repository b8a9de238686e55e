"""Resource manager: limits on connections, handshakes, streams and buffered bytes, and the
back-off of peers that keep hitting them. Also the `limits` section of config.json.

Modelled on go-libp2p's resource manager and connection manager:
- Buffered bytes are reserved in a chain of accounts — stream → connection → peer →
  (all non-member peers) → the whole node — and a reservation that would pass any limit fails
  without taking anything. A stream reserves its yamux receive window when it opens (so data
  the peer may send unasked is paid for in advance), its window growth, and each message a
  MessageReader buffers (at the length its prefix announces).
- Connections are counted before a byte is read (handshakes in flight, per IP) and again once
  the peer is known. Peers the node protects (members; the host asks a predicate the node sets)
  are never pruned; other peers' connections are capped, closed when idle, and share one
  memory pool, and their inbound streams per protocol are capped together.
- Every limit hit, rule violation or failed handshake is a strike against the peer (and its IP,
  for strangers); `strikes` within `strike_window` close its connections and refuse it for
  `backoff` seconds, doubling per repeat offence up to `max_backoff`. Nothing is logged per
  event beyond a few lines a minute per kind (lograte); refusals are counted and summarised.

Time comes from the clock the host passes in (trio's), so the logic is testable on its own.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

import attrs

from ..errors import P2PNodeError
from ..identity import PeerId
from ..logfmt import fmt
from ..streamio import ResourceLimitExceeded
from .lograte import RateLimitedLog

log = logging.getLogger("p2pnode.resources")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MIN_STREAM_MEMORY = 256 * KiB  # one yamux receive window: a stream cannot open with less
MAX_TRACKED_OFFENDERS = 4096  # strike and back-off entries kept (oldest forgotten first)


class LimitsError(P2PNodeError, ValueError):
    """A bad `limits` section; the message names the field, the value and what is allowed."""


@attrs.frozen
class Limits:
    """Every limit of the resource manager (protocols/README.md documents each default)."""

    # connections
    max_connections: int = 1024
    max_handshakes: int = 64
    max_connections_per_ip: int = 16
    ip_limit_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    max_unprotected_connections: int = 128
    unprotected_idle_timeout: float = 60.0
    unprotected_grace_period: float = 10.0
    # before authentication
    preauth_message_size: int = 64 * KiB
    # inbound streams
    max_streams_per_connection: int = 128
    max_streams_per_peer: int = 256
    max_streams_per_protocol: int = 2048
    max_unprotected_streams_per_protocol: int = 64
    # buffered bytes
    stream_memory: int = 16 * MiB
    connection_memory: int = 32 * MiB
    peer_memory: int = 64 * MiB
    unprotected_memory: int = 64 * MiB
    total_memory: int = 1 * GiB
    control_backlog: int = 64 * KiB
    # misbehaving peers
    strikes: int = 8
    strike_window: float = 60.0
    backoff: float = 60.0
    max_backoff: float = 3600.0
    # bookkeeping
    peerstore_ttl: float = 600.0
    max_peerstore_peers: int = 1024
    log_interval: float = 60.0

    def to_json(self) -> dict[str, Any]:
        """The fields that differ from the defaults (config.json keeps only those)."""
        default = Limits()
        out: dict[str, Any] = {}
        for field in attrs.fields(Limits):
            value = getattr(self, field.name)
            if value != getattr(default, field.name):
                out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def is_exempt(self, ip: str) -> bool:
        return _exempt(self.ip_limit_exempt, ip)


# (field → (kind, minimum, maximum)); kind "int" counts, "bytes" sizes, "seconds" durations
_BOUNDS: dict[str, tuple[str, float, float]] = {
    "max_connections": ("int", 1, 1_000_000),
    "max_handshakes": ("int", 1, 100_000),
    "max_connections_per_ip": ("int", 1, 1_000_000),
    "max_unprotected_connections": ("int", 0, 1_000_000),
    "unprotected_idle_timeout": ("seconds", 1, 86_400),
    "unprotected_grace_period": ("seconds", 0, 3600),
    "preauth_message_size": ("bytes", 1024, 4 * MiB),
    "max_streams_per_connection": ("int", 1, 65_536),
    "max_streams_per_peer": ("int", 1, 1_000_000),
    "max_streams_per_protocol": ("int", 1, 1_000_000),
    "max_unprotected_streams_per_protocol": ("int", 0, 1_000_000),
    "stream_memory": ("bytes", MIN_STREAM_MEMORY, 1 << 40),
    "connection_memory": ("bytes", MIN_STREAM_MEMORY, 1 << 40),
    "peer_memory": ("bytes", MIN_STREAM_MEMORY, 1 << 40),
    "unprotected_memory": ("bytes", 0, 1 << 40),
    "total_memory": ("bytes", MIN_STREAM_MEMORY, 1 << 40),
    "control_backlog": ("bytes", 1024, 64 * MiB),
    "strikes": ("int", 1, 1_000_000),
    "strike_window": ("seconds", 1, 86_400),
    "backoff": ("seconds", 0, 86_400),
    "max_backoff": ("seconds", 0, 7 * 86_400),
    "peerstore_ttl": ("seconds", 0, 7 * 86_400),
    "max_peerstore_peers": ("int", 0, 10_000_000),
    "log_interval": ("seconds", 1, 86_400),
}


def _fail(field: str, value: Any, allowed: str) -> LimitsError:
    return LimitsError(f"config field {field!r}: invalid value {value!r}; {allowed}")


def parse_limits(raw: Any, field: str = "limits") -> Limits:
    """Read the `limits` section of config.json (any subset of Limits' fields)."""
    if not isinstance(raw, dict):
        raise _fail(field, raw, 'expected an object such as {"max_connections": 512}')
    known = attrs.fields_dict(Limits)
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{field}.{key}"
        if key not in known:
            raise LimitsError(f"config field {name!r} is unknown; allowed fields: {', '.join(sorted(known))}")
        if key == "ip_limit_exempt":
            kw[key] = _parse_prefixes(name, value)
            continue
        kind, low, high = _BOUNDS[key]
        unit = {"int": "an integer", "bytes": "a size in bytes", "seconds": "seconds"}[kind]
        number_ok = isinstance(value, int) or (kind == "seconds" and isinstance(value, float))
        if isinstance(value, bool) or not number_ok or not low <= value <= high:
            raise _fail(name, value, f"expected {unit} from {_num(low)} to {_num(high)}")
        kw[key] = float(value) if kind == "seconds" else value
    return Limits(**kw)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _parse_prefixes(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, 'expected a list of IP prefixes such as ["127.0.0.0/8", "::1/128"]')
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError as exc:
            raise _fail(name, item, f"expected an IP prefix such as 10.0.0.0/8 ({exc})") from None
    return tuple(value)


@functools.lru_cache(maxsize=16)
def _networks(prefixes: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in prefixes)


@functools.lru_cache(maxsize=4096)
def _exempt(prefixes: tuple[str, ...], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in _networks(prefixes))


# -- accounts -------------------------------------------------------------------------------------
class Account:
    """Bytes reserved in one scope, and its limit."""

    __slots__ = ("name", "limit", "used")

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self.used = 0


def _reserve(chain: list[Account], n: int) -> Account | None:
    """Reserve `n` in every account of `chain`; returns the account that refused (nothing reserved)."""
    for account in chain:
        if account.used + n > account.limit:
            return account
    for account in chain:
        account.used += n
    return None


def _release(chain: list[Account], n: int) -> None:
    for account in chain:
        account.used -= n


class StreamAccount:
    """What one stream holds: its buffered bytes and its slot (transport's StreamScope)."""

    def __init__(self, conn: ConnectionAccount, inbound: bool):
        self._conn = conn
        self.inbound = inbound
        self.account = Account("stream", conn.manager.limits.stream_memory)
        self.protocol: str | None = None
        self._protocol_unprotected = False
        self._done = False

    def _chain(self) -> list[Account]:
        return [self.account, *self._conn.chain()]

    def reserve(self, n: int) -> None:
        refused = _reserve(self._chain(), n)
        if refused is not None:
            raise ResourceLimitExceeded(
                f"{refused.name} memory limit of {refused.limit} bytes reached ({refused.used} in use, {n} more asked)"
            )

    def release(self, n: int) -> None:
        _release(self._chain(), min(n, self.account.used))

    def available(self) -> int:
        return min(a.limit - a.used for a in self._chain())

    def set_protocol(self, protocol: str) -> bool:
        """Count this inbound stream against `protocol`'s limits; False refuses it."""
        manager, peer = self._conn.manager, self._conn.peer
        limits = manager.limits
        if manager.protocol_streams[protocol] >= limits.max_streams_per_protocol:
            return False
        unprotected = not peer.protected
        if unprotected and manager.unprotected_protocol_streams[protocol] >= limits.max_unprotected_streams_per_protocol:
            return False
        self.protocol = protocol
        self._protocol_unprotected = unprotected
        manager.protocol_streams[protocol] += 1
        if unprotected:
            manager.unprotected_protocol_streams[protocol] += 1
        return True

    def done(self) -> None:
        if self._done:
            return
        self._done = True
        if self.account.used:
            _release(self._chain(), self.account.used)
        manager = self._conn.manager
        if self.protocol is not None:
            _decrement(manager.protocol_streams, self.protocol)
            if self._protocol_unprotected:
                _decrement(manager.unprotected_protocol_streams, self.protocol)
        self._conn.stream_done(self)


def _decrement(counter: collections.Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class PeerAccount:
    def __init__(self, manager: ResourceManager, peer_id: PeerId, protected: bool):
        self.peer_id = peer_id
        self.protected = protected
        self.account = Account("peer", manager.limits.peer_memory)
        self.connections: list[ConnectionAccount] = []
        self.inbound_streams = 0


class ConnectionAccount:
    """One authenticated connection (transport's ConnectionScope)."""

    def __init__(self, manager: ResourceManager, peer: PeerAccount, ip: str | None, inbound: bool, now: float):
        self.manager = manager
        self.peer = peer
        self.ip = ip
        self.inbound = inbound
        self.opened_at = now
        self.idle_since: float | None = now
        self.account = Account("connection", manager.limits.connection_memory)
        self.streams = 0
        self.inbound_streams = 0
        self.evicting = False
        self.closed = False
        # set by the host: close this connection (reason, graceful)
        self.on_close: Callable[[str, bool], None] = lambda reason, graceful: None

    def chain(self) -> list[Account]:
        m = self.manager
        if self.peer.protected:
            return [self.account, self.peer.account, m.total]
        return [self.account, self.peer.account, m.unprotected, m.total]

    # transport.yamux_trio.ConnectionScope
    def open_stream(self, inbound: bool, window: int) -> StreamAccount | None:
        limits = self.manager.limits
        if self.closed:
            return None
        if inbound and (self.inbound_streams >= limits.max_streams_per_connection
                        or self.peer.inbound_streams >= limits.max_streams_per_peer):
            return None
        stream = StreamAccount(self, inbound)
        if _reserve(stream._chain(), window) is not None:
            return None
        self.streams += 1
        self.idle_since = None
        if inbound:
            self.inbound_streams += 1
            self.peer.inbound_streams += 1
        return stream

    def stream_done(self, stream: StreamAccount) -> None:
        self.streams -= 1
        if stream.inbound:
            self.inbound_streams -= 1
            self.peer.inbound_streams -= 1
        if not self.streams:
            self.idle_since = self.manager.clock()

    def report(self, event: str, detail: str) -> None:
        self.manager.report(self, event, detail)

    def close(self) -> None:
        """The connection ended: forget it (its streams have released what they held)."""
        self.manager._connection_closed(self)


class Handshake:
    """A connection being set up (accepted, or being dialed): holds its slot until it is
    authenticated or fails."""

    def __init__(self, manager: ResourceManager, ip: str | None, inbound: bool, exempt: bool):
        self.manager = manager
        self.ip = ip
        self.inbound = inbound
        self.exempt = exempt  # from per-IP limits and IP back-off
        self._open = True

    def release(self) -> None:
        if self._open:
            self._open = False
            self.manager._handshake_done(self)

    def failed(self, reason: str) -> None:
        """The handshake failed (a stranger's junk, a timeout): a strike against its IP."""
        self.release()
        self.manager._handshake_failed(self, reason)

    def authenticate(self, peer_id: PeerId) -> ConnectionAccount | str:
        """The peer proved `peer_id`: its connection account, or why it is refused."""
        self.release()
        return self.manager._authenticate(self, peer_id)


class _Offender:
    __slots__ = ("strikes", "banned_until", "offences")

    def __init__(self) -> None:
        self.strikes: collections.deque[float] = collections.deque()
        self.banned_until = 0.0
        self.offences = 0


# events a peer can cause: (counts as a strike, log level)
EVENTS: dict[str, tuple[bool, int]] = {
    "stream_refused": (True, logging.INFO),
    "protocol_refused": (True, logging.INFO),
    "memory_refused": (True, logging.INFO),
    "yamux_protocol_error": (True, logging.INFO),
    "secure_channel_error": (True, logging.INFO),
    "keepalive_timeout": (False, logging.INFO),
}


class ResourceManager:
    def __init__(self, limits: Limits, *, clock: Callable[[], float], is_protected: Callable[[PeerId], bool]):
        self.limits = limits
        self.clock = clock
        self.is_protected = is_protected
        self.total = Account("node", limits.total_memory)
        self.unprotected = Account("non-member", limits.unprotected_memory)
        self.handshakes = 0  # inbound, not yet authenticated
        self.dials = 0  # outbound, not yet authenticated
        self.handshakes_per_ip: collections.Counter[str] = collections.Counter()
        self.unprotected_per_ip: collections.Counter[str] = collections.Counter()
        self.peers: dict[PeerId, PeerAccount] = {}
        self.connections = 0
        self.protocol_streams: collections.Counter[str] = collections.Counter()
        self.unprotected_protocol_streams: collections.Counter[str] = collections.Counter()
        self._offenders: collections.OrderedDict[PeerId | str, _Offender] = collections.OrderedDict()
        self.counts: collections.Counter[str] = collections.Counter()  # since the last summary
        self.totals: collections.Counter[str] = collections.Counter()  # since start
        self._last_summary: float | None = None
        self.logs = RateLimitedLog(log, clock, interval=limits.log_interval)

    # -- reading ---------------------------------------------------------------------------------
    @property
    def memory_used(self) -> int:
        return self.total.used

    @property
    def unprotected_connections(self) -> int:
        return sum(1 for p in self.peers.values() if not p.protected for c in p.connections if not c.evicting)

    def stats(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "handshakes": self.handshakes,
            "unprotected_connections": self.unprotected_connections,
            "peers": len(self.peers),
            "memory": self.total.used,
            "unprotected_memory": self.unprotected.used,
            "inbound_streams": sum(p.inbound_streams for p in self.peers.values()),
            "backed_off": sum(1 for o in self._offenders.values() if o.banned_until > self.clock()),
            "refused": dict(self.totals),
        }

    def count(self, reason: str) -> None:
        if self._last_summary is None:
            self._last_summary = self.clock()
        self.counts[reason] += 1
        self.totals[reason] += 1

    # -- connections -------------------------------------------------------------------------------
    def admit_inbound(self, ip: str) -> Handshake | None:
        """An accepted socket from `ip`, nothing read yet: its handshake slot, or None (close it)."""
        limits = self.limits
        now = self.clock()
        exempt = limits.is_exempt(ip)
        if not exempt and self._banned(ip, now):
            self.count("backed_off_ip")
            return None
        if self.handshakes >= limits.max_handshakes:
            self.count("handshake_limit")
            return None
        if self.connections + self.handshakes + self.dials >= limits.max_connections:
            self.count("connection_limit")
            return None
        if not exempt and self.handshakes_per_ip[ip] + self.unprotected_per_ip[ip] >= limits.max_connections_per_ip:
            self.count("ip_limit")
            return None
        self.handshakes += 1
        if not exempt:
            self.handshakes_per_ip[ip] += 1
        return Handshake(self, ip, inbound=True, exempt=exempt)

    def admit_outbound(self) -> Handshake | None:
        if self.connections + self.handshakes + self.dials >= self.limits.max_connections:
            self.count("connection_limit")
            return None
        self.dials += 1
        return Handshake(self, None, inbound=False, exempt=True)

    def _handshake_done(self, hs: Handshake) -> None:
        if not hs.inbound:
            self.dials -= 1
            return
        self.handshakes -= 1
        if hs.ip is not None and not hs.exempt:
            _decrement(self.handshakes_per_ip, hs.ip)

    def _handshake_failed(self, hs: Handshake, reason: str) -> None:
        self.count("handshake_failed")
        if hs.inbound and hs.ip is not None:
            self.logs.log(logging.INFO, "handshake_failed", direction="inbound", remote=hs.ip, reason=reason)
            if not hs.exempt:
                self._strike(hs.ip, f"failed handshakes: {reason}", None)

    def _authenticate(self, hs: Handshake, peer_id: PeerId) -> ConnectionAccount | str:
        limits = self.limits
        now = self.clock()
        if hs.inbound and self._banned(peer_id, now):
            self.count("backed_off_peer")
            return "backed off after repeated limit hits"
        peer = self.peers.get(peer_id)
        protected = peer.protected if peer is not None else bool(self.is_protected(peer_id))
        if not protected and hs.inbound:
            if not self._make_room(now):
                self.count("unprotected_limit")
                return f"non-member connection limit {limits.max_unprotected_connections} reached"
        if peer is None:
            peer = self.peers[peer_id] = PeerAccount(self, peer_id, protected)
        ip = hs.ip if not hs.exempt else None
        conn = ConnectionAccount(self, peer, ip, hs.inbound, now)
        peer.connections.append(conn)
        self.connections += 1
        if not protected and ip is not None:
            self.unprotected_per_ip[ip] += 1
        return conn

    def _make_room(self, now: float) -> bool:
        """Room for one more non-member connection, closing the longest-idle one past its
        grace period if needed."""
        limits = self.limits
        if self.unprotected_connections < limits.max_unprotected_connections:
            return True
        victim: ConnectionAccount | None = None
        for peer in self.peers.values():
            if peer.protected:
                continue
            for c in peer.connections:
                if c.evicting or c.idle_since is None or now - c.opened_at < limits.unprotected_grace_period:
                    continue
                if victim is None or c.idle_since < (victim.idle_since or now):
                    victim = c
        if victim is None:
            return False
        victim.evicting = True
        self.count("unprotected_evicted")
        victim.on_close("non-member connection limit: closing the longest idle", True)
        return True

    def _connection_closed(self, conn: ConnectionAccount) -> None:
        if conn.closed:
            return
        conn.closed = True
        peer = conn.peer
        if conn.account.used:  # normally zero: every stream released its share
            _release(conn.chain(), conn.account.used)
        peer.connections.remove(conn)
        self.connections -= 1
        if not peer.protected and conn.ip is not None:
            _decrement(self.unprotected_per_ip, conn.ip)
        if not peer.connections:
            if peer.account.used:
                _release([peer.account] + ([] if peer.protected else [self.unprotected]) + [self.total], peer.account.used)
            del self.peers[peer.peer_id]

    # -- misbehaviour --------------------------------------------------------------------------------
    def report(self, conn: ConnectionAccount, event: str, detail: str) -> None:
        strike, level = EVENTS.get(event, (False, logging.DEBUG))
        self.count(event)
        self.logs.log(level, event, peer=conn.peer.peer_id, reason=detail)
        if strike:
            self._strike(conn.peer.peer_id, f"{event}: {detail}", conn)

    def _strike(self, key: PeerId | str, reason: str, conn: ConnectionAccount | None) -> None:
        now = self.clock()
        limits = self.limits
        offender = self._offenders.get(key)
        if offender is None:
            offender = self._offenders[key] = _Offender()
            while len(self._offenders) > MAX_TRACKED_OFFENDERS:
                self._offenders.popitem(last=False)
        else:
            self._offenders.move_to_end(key)
        strikes = offender.strikes
        strikes.append(now)
        while strikes and now - strikes[0] > limits.strike_window:
            strikes.popleft()
        if len(strikes) < limits.strikes or offender.banned_until > now:
            return
        strikes.clear()
        offender.offences += 1
        duration = min(limits.backoff * 2 ** (offender.offences - 1), limits.max_backoff)
        offender.banned_until = now + duration
        self.count("backed_off")
        self.logs.log(logging.INFO, "peer_backed_off", peer=key, seconds=f"{duration:g}", reason=reason)
        if isinstance(key, PeerId):
            peer = self.peers.get(key)
            if peer is not None:
                for c in list(peer.connections):
                    c.on_close(f"backed off for {duration:g}s after {limits.strikes} limit hits", False)
                if not peer.protected and conn is not None and conn.ip is not None:
                    self._strike(conn.ip, reason, None)

    def _forgettable(self, o: _Offender, now: float) -> bool:
        """Not backed off, no recent strike, and no offence recent enough to double the next back-off."""
        if o.banned_until > now or (o.strikes and now - o.strikes[-1] <= self.limits.strike_window):
            return False
        return not o.offences or now - o.banned_until > self.limits.max_backoff

    def _banned(self, key: PeerId | str, now: float) -> bool:
        offender = self._offenders.get(key)
        return offender is not None and offender.banned_until > now

    # -- housekeeping ----------------------------------------------------------------------------------
    def sweep(self) -> None:
        """Re-check who is protected, close idle non-member connections, forget old strikes, log
        a summary of what was refused. The host calls it every few seconds."""
        now = self.clock()
        limits = self.limits
        for peer in list(self.peers.values()):
            protected = bool(self.is_protected(peer.peer_id))
            if protected != peer.protected:
                self._set_protected(peer, protected)
            if protected:
                continue
            for c in list(peer.connections):
                if not c.evicting and c.idle_since is not None and now - c.idle_since >= limits.unprotected_idle_timeout:
                    c.evicting = True
                    self.count("unprotected_idle_closed")
                    c.on_close(f"idle non-member connection ({limits.unprotected_idle_timeout:g}s)", True)
        for key in [k for k, o in self._offenders.items() if self._forgettable(o, now)]:
            del self._offenders[key]
        self.logs.flush()
        if self.counts and self._last_summary is not None and now - self._last_summary >= limits.log_interval:
            self._last_summary = now
            log.info(fmt("resource_summary", seconds=f"{limits.log_interval:g}", **dict(sorted(self.counts.items())),
                         memory=self.total.used, connections=self.connections))
            self.counts.clear()

    def recheck_protection(self) -> None:
        """Apply a membership change now rather than at the next sweep: peers that became members
        leave the stranger limits at once, and strikes they collected as strangers are forgiven
        (a node joining a cluster pushes and pulls a lot before the snapshot that lists it arrives)."""
        for peer in list(self.peers.values()):
            protected = bool(self.is_protected(peer.peer_id))
            if protected != peer.protected:
                self._set_protected(peer, protected)
                if protected:
                    self._offenders.pop(peer.peer_id, None)

    def _set_protected(self, peer: PeerAccount, protected: bool) -> None:
        peer.protected = protected
        sign = -1 if protected else 1
        self.unprotected.used += sign * peer.account.used
        for c in peer.connections:
            if c.ip is not None:
                if protected:
                    _decrement(self.unprotected_per_ip, c.ip)
                else:
                    self.unprotected_per_ip[c.ip] += 1
