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
