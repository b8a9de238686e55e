"""Small trio helpers used at the project's public boundaries."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def open_nursery_unwrapped():
    """A nursery whose lone failure is raised as itself rather than inside an ExceptionGroup.

    Callers of our APIs (`open_host`, transfers) then catch DialError etc. directly; a group of
    two or more real failures is still raised as a group."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out += _leaves(exc)
        else:
            out.append(exc)
    return out
