"""Per-event-name rate limiting for log lines a stranger can cause.

The first `burst` lines of an event name in each `interval` are logged; later ones are only
counted, and the count is logged once (`action=log_suppressed event=… count=…`) when the
interval ends. One small helper, to be replaced by p2pnode.logfmt's own per-reason limiter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..logfmt import fmt


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, clock: Callable[[], float], *, interval: float = 60.0, burst: int = 5):
        self._log = logger
        self._clock = clock
        self.interval = interval
        self.burst = burst
        self._windows: dict[str, tuple[float, int, int]] = {}  # event → (window start, logged, suppressed)

    def log(self, level: int, event: str, **fields: object) -> None:
        now = self._clock()
        start, logged, suppressed = self._windows.get(event, (now, 0, 0))
        if now - start >= self.interval:
            self._report(event, suppressed, level)
            start, logged, suppressed = now, 0, 0
        if logged < self.burst:
            self._log.log(level, fmt(event, **fields))
            logged += 1
        else:
            suppressed += 1
        self._windows[event] = (start, logged, suppressed)

    def flush(self) -> None:
        """Log the counts of windows that have ended (call now and then)."""
        now = self._clock()
        for event, (start, _, suppressed) in list(self._windows.items()):
            if now - start >= self.interval:
                self._report(event, suppressed, logging.INFO)
                del self._windows[event]

    def _report(self, event: str, suppressed: int, level: int) -> None:
        if suppressed:
            self._log.log(level, fmt("log_suppressed", event=event, count=suppressed, seconds=f"{self.interval:g}"))
