"""Logs as logfmt lines: `action=... key=value`, one event per line, values quoted when needed.

Lines a stranger can trigger go through a `RateLimiter` (the shared one is `limited`):

    limited.warning(log, fmt("handshake_failed", peer=peer, reason=reason), key=("handshake_failed", reason))

The first `burst` lines of a (logger, key) within `window` seconds are written; the rest are
counted, and when the window is over one line says how many were dropped:
`action=log_suppressed what=handshake_failed:timeout count=4123 window=60s`. Key on the action
and a reason from a small set, never on a peer ID or address: keys are what a stranger could
multiply. At most `max_keys` keys are tracked; further ones share one `what=other` bucket.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO


def _quote(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\\\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def fmt(action: str, **fields: object) -> str:
    parts = [f"action={_quote(action)}"]
    parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
    return " ".join(parts)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _quote(self.formatException(record.exc_info))
        return line


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


_OTHER = ("other",)


class _Entry:
    __slots__ = ("logger", "level", "started", "written", "suppressed")

    def __init__(self, logger: logging.Logger, level: int, started: float):
        self.logger, self.level, self.started = logger, level, started
        self.written = self.suppressed = 0


class RateLimiter:
    """Per-reason log rate limiting: `burst` lines per key per `window` seconds, then a count.

    Time comes from `clock` (seconds, monotonic). Summaries are written when the limiter is next
    used after a window ends, or by `flush()`; a window with nothing suppressed ends silently.
    Memory: at most `max_keys` keys (then one `other` per logger), each of at most 4 parts of 64
    characters. Not thread-safe: use it from the event loop."""

    def __init__(self, *, burst: int = 5, window: float = 60.0, max_keys: int = 64, clock: Callable[[], float] = time.monotonic):
        self.burst, self.window, self.max_keys, self.clock = burst, window, max_keys, clock
        self._entries: dict[tuple[str, tuple[str, ...]], _Entry] = {}
        self._next_flush = float("inf")

    def log(self, level: int, logger: logging.Logger, line: str, *, key: str | tuple[object, ...]) -> bool:
        """Write `line` unless its key is over budget; True when it was written."""
        if not logger.isEnabledFor(level):
            return False
        now = self.clock()
        if now >= self._next_flush:
            self.flush()
        parts = (key,) if isinstance(key, str) else key
        ident = (logger.name, tuple(str(p)[:64] for p in parts[:4]))
        entry = self._entries.get(ident)
        if entry is None:
            if len(self._entries) >= self.max_keys:
                ident = (logger.name, _OTHER)
                entry = self._entries.get(ident)
            if entry is None:
                entry = self._entries[ident] = _Entry(logger, level, now)
                self._next_flush = min(self._next_flush, now + self.window)
        if entry.written < self.burst:
            entry.written += 1
            logger.log(level, line)
            return True
        entry.suppressed += 1
        entry.level = max(entry.level, level)
        return False

    def debug(self, logger: logging.Logger, line: str, *, key: str | tuple[object, ...]) -> bool:
        return self.log(logging.DEBUG, logger, line, key=key)

    def info(self, logger: logging.Logger, line: str, *, key: str | tuple[object, ...]) -> bool:
        return self.log(logging.INFO, logger, line, key=key)

    def warning(self, logger: logging.Logger, line: str, *, key: str | tuple[object, ...]) -> bool:
        return self.log(logging.WARNING, logger, line, key=key)

    def error(self, logger: logging.Logger, line: str, *, key: str | tuple[object, ...]) -> bool:
        return self.log(logging.ERROR, logger, line, key=key)

    def reset(self) -> None:
        """Forget every window without writing summaries (tests sharing the module's `limited`)."""
        self._entries.clear()
        self._next_flush = float("inf")

    def flush(self, *, everything: bool = False) -> None:
        """End the windows that are over (all of them with `everything`, e.g. at shutdown):
        write a summary for each that suppressed lines, and forget them."""
        now = self.clock()
        self._next_flush = float("inf")
        for ident, entry in list(self._entries.items()):
            if everything or now >= entry.started + self.window:
                del self._entries[ident]
                if entry.suppressed:
                    entry.logger.log(entry.level, fmt(
                        "log_suppressed", what=":".join(ident[1]), count=entry.suppressed, window=f"{now - entry.started:.0f}s",
                    ))
            else:
                self._next_flush = min(self._next_flush, entry.started + self.window)


limited = RateLimiter()
