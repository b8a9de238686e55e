"""The watcher under trio: changes on disk reach the index through incremental rescans, ignored
paths and our temp files do not trigger work, and cancelling stops it promptly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import trio

from p2pnode.sync.model import FileEntry
from p2pnode.sync.watcher import Watcher
from synckit import SyncPair, open_pair


@pytest.fixture
async def pair(tmp_path: Path):
    async with open_pair(tmp_path) as p:
        yield p


async def wait_for(pair: SyncPair, check, timeout: float = 20.0) -> dict[str, FileEntry]:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while True:
            idx = await pair.index()
            if check(idx):
                return idx
            await trio.sleep(0.05)


async def test_watcher_feeds_incremental_rescans(pair: SyncPair):
    (pair.src / "old.txt").write_text("before the watcher")
    await pair.scan()
    scans_before = pair.scanner.scans
    watcher = Watcher(pair.scanner, quiet_ms=100, max_delay_ms=500)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        (pair.src / "new").mkdir()
        (pair.src / "new/file.txt").write_text("hello")
        (pair.src / "runtime").mkdir()  # ignored by default
        (pair.src / "runtime/app.pid").write_text("123")
        await wait_for(pair, lambda idx: "new/file.txt" in idx and idx["new/file.txt"].size == 5)
        (pair.src / "new/file.txt").write_text("hello again")
        os.unlink(pair.src / "old.txt")
        idx = await wait_for(pair, lambda idx: idx["new/file.txt"].size == 11 and idx["old.txt"].deleted)
        assert not any(n.startswith("runtime") for n in idx)
        shutil.rmtree(pair.src / "new")
        idx = await wait_for(pair, lambda idx: idx["new"].deleted and idx["new/file.txt"].deleted)
        assert pair.scanner.scans > scans_before and watcher.batches >= 3
        t0 = trio.current_time()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - t0 < 2.0  # the watch thread stopped within a step


async def test_watcher_started_means_watching(pair: SyncPair):
    """Whatever changes after `started` is seen, even without a periodic rescan."""
    watcher = Watcher(pair.scanner, quiet_ms=50, max_delay_ms=200)
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        (pair.src / "right-after-start").write_text("x")
        await wait_for(pair, lambda idx: "right-after-start" in idx)
        nursery.cancel_scope.cancel()
