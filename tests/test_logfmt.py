"""logfmt lines and the per-reason rate limiter: a flood of one reason costs a few lines and a count."""

from __future__ import annotations

import logging

import pytest

from p2pnode.logfmt import RateLimiter, fmt


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def logger(request):
    log = logging.getLogger(f"test.limiter.{request.node.name}")
    log.setLevel(logging.INFO)
    log.propagate = False
    lines = Lines()
    log.addHandler(lines)
    yield log, lines
    log.removeHandler(lines)


def test_fmt_quotes_values():
    assert fmt("x", a="b c", n=3, none=None, q='say "hi"') == 'action=x a="b c" n=3 q="say \\"hi\\""'


def test_first_lines_pass_then_a_count(logger):
    log, lines = logger
    clock = Clock()
    limited = RateLimiter(burst=3, window=60, clock=clock)
    for i in range(1000):
        clock.now += 0.01
        limited.warning(log, fmt("handshake_failed", peer=f"p{i}", reason="timeout"), key=("handshake_failed", "timeout"))
    assert lines.text == [f"action=handshake_failed peer=p{i} reason=timeout" for i in range(3)]
    clock.now = 1000 + 61  # the window opened with the first line, at 1000.01
    assert limited.warning(log, fmt("handshake_failed", peer="late", reason="timeout"), key=("handshake_failed", "timeout"))
    # the summary for the window that ended comes first; the new window's first line passes
    assert lines.text[3:] == ["action=log_suppressed what=handshake_failed:timeout count=997 window=61s",
                              "action=handshake_failed peer=late reason=timeout"]
    assert [r.levelno for r in lines.records] == [logging.WARNING] * 5


def test_reasons_and_loggers_are_counted_apart(logger):
    log, lines = logger
    other = logging.getLogger(log.name + ".other")
    clock = Clock()
    limited = RateLimiter(burst=1, window=10, clock=clock)
    for _ in range(5):
        limited.info(log, "a", key=("x", "one"))
        limited.info(log, "b", key=("x", "two"))
        limited.info(other, "c", key=("x", "one"))  # propagates to `log`'s handler
    assert lines.text == ["a", "b", "c"]
    limited.flush(everything=True)
    assert sorted(lines.text[3:]) == ["action=log_suppressed what=x:one count=4 window=0s"] * 2 + [
        "action=log_suppressed what=x:two count=4 window=0s"]


def test_a_window_without_suppression_ends_silently(logger):
    log, lines = logger
    clock = Clock()
    limited = RateLimiter(burst=5, window=60, clock=clock)
    limited.info(log, "one", key="k")
    clock.now += 61
    limited.flush()
    limited.info(log, "two", key="k")
    assert lines.text == ["one", "two"]


def test_strangers_cannot_grow_the_table(logger):
    """Every line with a new reason: at most max_keys are tracked, the rest share `other`."""
    log, lines = logger
    clock = Clock()
    limited = RateLimiter(burst=2, window=60, max_keys=8, clock=clock)
    for i in range(100_000):
        limited.warning(log, f"line {i}", key=("bad_message", f"reason {i}" * 50))
    assert len(lines.records) == 8 + 2  # one line for each of 8 keys, two for `other`
    assert all(len(line) <= 64 for line in lines.text)
    clock.now += 60
    limited.flush()
    assert lines.text[-1] == f"action=log_suppressed what=other count={100_000 - 10} window=60s"
    clock.now += 60
    limited.warning(log, "after", key="bad_message")
    assert lines.text[-1] == "after"


def test_levels_below_the_loggers_are_neither_written_nor_counted(logger):
    log, lines = logger
    clock = Clock()
    limited = RateLimiter(burst=1, window=60, clock=clock)
    for _ in range(10):
        assert not limited.debug(log, "noise", key="k")
    limited.flush(everything=True)
    assert lines.text == []


def test_summary_has_the_highest_suppressed_level_and_reset_forgets(logger):
    log, lines = logger
    clock = Clock()
    limited = RateLimiter(burst=1, window=60, clock=clock)
    limited.info(log, "first", key="k")
    limited.info(log, "second", key="k")
    limited.error(log, "third", key="k")
    clock.now += 90
    limited.flush()
    assert lines.records[-1].levelno == logging.ERROR and "count=2 window=90s" in lines.text[-1]
    limited.info(log, "again", key="k")
    limited.info(log, "dropped", key="k")
    limited.reset()
    limited.flush(everything=True)
    assert lines.text[-1] == "again"
