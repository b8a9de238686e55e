"""Connection upgrade: raw stream → multistream(/noise) → Noise XX → multistream(/yamux/1.0.0) → yamux.

Every stage runs under its own deadline so a stalled peer costs at most one timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from ..errors import DecodeError, HandshakeError, ProtocolError
from ..identity import KeyPair, PeerId
from . import noise, yamux
from .multistream_trio import answer, select
from .noise_trio import handshake
from .yamux_trio import YamuxConnection

T = TypeVar("T")


@attrs.frozen
class UpgradeLimits:
    handshake_timeout: float = 10.0
    initial_window: int = yamux.INITIAL_WINDOW
    max_window: int = yamux.DEFAULT_MAX_WINDOW
    max_inbound_streams: int = yamux.DEFAULT_MAX_INBOUND_STREAMS
    control_backlog: int = yamux.DEFAULT_CONTROL_BACKLOG
    keepalive_interval: float = 30.0
    keepalive_timeout: float = 20.0


async def _stage(name: str, timeout: float, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        with trio.fail_after(timeout):
            return await fn()
    except trio.TooSlowError:
        raise HandshakeError(f"{name} timed out after {timeout:g}s") from None
    except HandshakeError:
        raise
    except (ProtocolError, DecodeError) as exc:
        raise HandshakeError(f"{name}: {exc}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise HandshakeError(f"{name}: connection failed ({exc or type(exc).__name__})") from None


async def upgrade(
    raw: trio.abc.Stream,
    identity: KeyPair,
    *,
    initiator: bool,
    expected_peer: PeerId | None,
    limits: UpgradeLimits,
    label: str = "",
) -> tuple[YamuxConnection, noise.HandshakeCompleted]:
    """Secure and multiplex `raw`. The connection's resource scope starts unlimited; the host
    sets `conn.scope` once it has admitted the authenticated peer, before running it."""
    t = limits.handshake_timeout
    if initiator:
        agreed = await _stage("security negotiation", t, lambda: select(raw, [noise.PROTOCOL_ID]))
    else:
        agreed = await _stage("security negotiation", t, lambda: answer(raw, {noise.PROTOCOL_ID}))
    secure = await _stage(
        "noise handshake", t,
        lambda: handshake(raw, identity, initiator=initiator, expected_peer=expected_peer, initial=agreed.trailing),
    )
    if initiator:
        muxer = await _stage("muxer negotiation", t, lambda: select(secure, [yamux.PROTOCOL_ID]))
    else:
        muxer = await _stage("muxer negotiation", t, lambda: answer(secure, {yamux.PROTOCOL_ID}))
    core = yamux.YamuxCore(
        is_client=initiator,
        initial_window=limits.initial_window,
        max_window=limits.max_window,
        max_inbound_streams=limits.max_inbound_streams,
        max_control_backlog=limits.control_backlog,
    )
    conn = YamuxConnection(
        secure, core, initial=muxer.trailing, label=label,
        keepalive_interval=limits.keepalive_interval, keepalive_timeout=limits.keepalive_timeout,
    )
    return conn, secure.remote

