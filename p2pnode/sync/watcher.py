"""The source's file watcher: changed paths, debounced, become the scanner's incremental rescans.

`watchfiles.awatch` (Rust `notify`, inotify on Linux) runs under trio through anyio. Its own
grouping is the debounce: a batch is handed over once `quiet_ms` pass without a new event, or
after `max_delay_ms` at the latest; events that arrive while a rescan runs are kept by the
watcher and form the next batch. A periodic full rescan (`Scanner.run`) covers anything a
watcher can miss (an overflowing inotify queue, a tree replaced while we were down).

Lifetime: `run` is a task the owner starts in its nursery and cancels to stop. awatch's blocking
wait runs on a worker thread that only returns when its stop event is set, so a sibling task sets
that event the moment the scope is cancelled; shutdown then takes at most one `step`.
"""

from __future__ import annotations

import logging
import os

import trio
import watchfiles

from ..logfmt import fmt
from . import names
from .scanner import Scanner

log = logging.getLogger("p2pnode.sync.watcher")


class Watcher:
    def __init__(self, scanner: Scanner, *, quiet_ms: int = 300, max_delay_ms: int = 2000, force_polling: bool | None = None):
        self.scanner = scanner
        self.quiet_ms = quiet_ms
        self.max_delay_ms = max_delay_ms
        self.force_polling = force_polling
        self.batches = 0

    def _relative(self, changes: set[tuple[watchfiles.Change, str]]) -> set[str]:
        roots = {self.scanner.root, os.path.realpath(self.scanner.root)}  # events may name either
        out: set[str] = set()
        for _, path in changes:
            for root in roots:
                rel = os.path.relpath(path, root)
                if rel not in (".", "..") and not rel.startswith("../"):
                    break
            else:
                continue
            if names.is_temp_name(os.path.basename(rel)):
                continue
            out.add(rel)
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; `started` once the watch is in place (events after that are seen)."""
        stop = trio.Event()

        async def stop_on_cancel() -> None:
            try:
                await trio.sleep_forever()
            finally:
                stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_cancel)
            started = False
            async for changes in watchfiles.awatch(
                self.scanner.root,
                watch_filter=None,
                debounce=self.max_delay_ms,
                step=self.quiet_ms,
                stop_event=stop,
                rust_timeout=max(200, self.quiet_ms),
                yield_on_timeout=True,  # the first (empty) yield tells us the watch is in place
                force_polling=self.force_polling,
                recursive=True,
            ):
                if not started:
                    started = True
                    log.info(fmt("sync_watching", folder=self.scanner.folder.id, root=self.scanner.root))
                    task_status.started()
                paths = self._relative(changes)
                if not paths:
                    continue
                self.batches += 1
                await self.scanner.rescan(paths)
