"""The clocks a service reads: wall time (UTC ns, for signed timestamps and replay windows) and trio's
monotonic clock (for intervals and deadlines). Passed in, so tests can move either."""

from __future__ import annotations

import time

import trio


class Clock:
    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic(self) -> float:
        return trio.current_time()


class OffsetClock(Clock):
    """Wall time shifted by `offset_ns` (a node whose clock is off, in tests)."""

    def __init__(self, offset_ns: int):
        self.offset_ns = offset_ns

    def now_ns(self) -> int:
        return time.time_ns() + self.offset_ns
