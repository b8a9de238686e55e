"""Thin trio driver for the multistream-select cores, usable on raw, secure and muxed streams."""

from __future__ import annotations

import trio

from ..errors import ProtocolError
from . import multistream
from .raw import RECEIVE_SIZE


async def _drive(stream: trio.abc.Stream, core, first: bytes, initial: bytes):
    if first:
        await stream.send_all(first)
    data = initial
    while True:
        if data:
            result = core.receive_data(data)
            out = core.data_to_send()
            if out:
                await stream.send_all(out)
            if result is not None:
                return result
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise ProtocolError("stream closed during multistream-select")


async def select(stream: trio.abc.Stream, protocols: list[str], *, initial: bytes = b"") -> multistream.Agreed:
    """Propose `protocols` in order; returns the agreed one (raises NegotiationFailed if none)."""
    core = multistream.Dialer(protocols)
    return await _drive(stream, core, core.initiate(), initial)


async def answer(stream: trio.abc.Stream, supported, *, initial: bytes = b"") -> multistream.Agreed:
    """Answer proposals with the protocols in `supported` (any container supporting `in`)."""
    core = multistream.Listener(supported)
    return await _drive(stream, core, core.initiate(), initial)

