"""UTC RFC 3339 timestamps with nanoseconds (`2026-11-23T17:21:23.123456789Z`), as integers of ns."""

from __future__ import annotations

import calendar
import datetime
import re
import time

from .errors import DecodeError

_RE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$")
NS = 1_000_000_000


def now_ns() -> int:
    return time.time_ns()


def format_ns(ns: int) -> str:
    seconds, frac = divmod(ns, NS)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def now() -> str:
    return format_ns(now_ns())


def parse_ns(text: str) -> int:
    """Parse RFC 3339 (any offset, up to 9 fractional digits) to ns since the epoch."""
    m = _RE.match(text) if isinstance(text, str) else None
    if m is None:
        raise DecodeError(f"{text!r} is not an RFC 3339 timestamp like 2026-01-02T03:04:05.000000000Z")
    year, month, day, hour, minute, second, frac, tz = m.groups()
    try:
        datetime.date(int(year), int(month), int(day))  # rejects 2026-02-30
        seconds = calendar.timegm((int(year), int(month), int(day), int(hour), int(minute), int(second), 0, 0, 0))
    except ValueError:
        raise DecodeError(f"{text!r} is not a valid date and time") from None
    if int(hour) > 23 or int(minute) > 59 or int(second) > 60:
        raise DecodeError(f"{text!r} is not a valid time of day")
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        seconds -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return seconds * NS + int((frac or "0").ljust(9, "0"))
