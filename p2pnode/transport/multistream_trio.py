"""Thin trio driver for the multistream-select cores, usable on raw, secure and muxed streams."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import trio

from ..errors import ProtocolError
from ..streamio import RECEIVE_SIZE
from .multistream import MultistreamDialerCore, MultistreamListenerCore, ProtocolAgreed


async def _agree(stream: trio.abc.Stream, core: MultistreamDialerCore | MultistreamListenerCore, initial: bytes) -> ProtocolAgreed:
    """Send what the core queued, then pump bytes until it reports the agreement."""
    out = core.data_to_send()
    if out:
        await stream.send_all(out)
    data: bytes | bytearray = initial
    while True:
        if data:
            events = core.receive_data(data)
            out = core.data_to_send()
            if out:
                await stream.send_all(out)
            if events:
                event = events[0]
                assert isinstance(event, ProtocolAgreed)  # a proposal (not `ls`) ends in an agreement
                return event
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise ProtocolError("stream closed during multistream-select")


async def select(stream: trio.abc.Stream, protocols: Sequence[str], *, initial: bytes = b"") -> ProtocolAgreed:
    """Propose `protocols` in order; returns the agreed one (raises NegotiationFailed if none)."""
    core = MultistreamDialerCore(protocols)
    core.send_proposal()
    return await _agree(stream, core, initial)


async def answer(stream: trio.abc.Stream, supported: Collection[str], *, initial: bytes = b"") -> ProtocolAgreed:
    """Answer proposals with the protocols in `supported` (any collection supporting `in`)."""
    core = MultistreamListenerCore(supported)
    core.send_header()
    return await _agree(stream, core, initial)

