"""Folder sync benchmark, local half: (d) scan speed and rescans, (e) memory with a 100,000-file index.

(d) Cold scan of a tree (one large random file and many small ones), in MiB hashed per second,
    for 1-4 hash workers; the page cache is dropped for the tree's files before each run
    (posix_fadvise DONTNEED after an fsync), and one warm run for comparison. Then a tree of
    100,000 small files: the initial scan, and rescans with nothing changed (target < 3 s).
(e) Memory: a fresh process that holds the 100,000-file index in sync.db, rescans it and pages
    through all of it as index chunks (what a source serves); and a receiver process that
    accepts those chunks and plans a full sync of them. RSS and peak RSS (target < 150 MiB).

Parts (a)-(c) — initial sync against rsync over ssh, bytes on the wire for a 1 % change, the
source's upload with 8 receivers — need the network half of sync and are added with it.

    python benchmarks/sync.py                     # d and e
    python benchmarks/sync.py --parts d --big-mib 512
    python benchmarks/sync.py --files 20000       # a smaller rescan tree

This machine's filesystem slows file creation for minutes after many deletions, so every run
writes into a fresh directory under --dir and deletes it only after all timings (DESIGN.md).
Files changed less than 0.5 s before they are read are hashed twice by design (the scanner's
"racy" rule), so the benchmark lets a new tree age a second before timing it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from procstat import rss_kib

from p2pnode.identity import KeyPair
from p2pnode.sync.blocks import Hasher
from p2pnode.platform.db import Database
from p2pnode.sync.index_db import MIGRATIONS, IndexRepo
from p2pnode.sync.model import FolderConfig, NodeTarget
from p2pnode.sync.scanner import Scanner

MiB = 1024 * 1024
SOURCE = KeyPair.generate().peer_id


def hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def folder_config(root: Path, receiver_target: Path | None = None) -> FolderConfig:
    nodes = (NodeTarget(KeyPair.generate().peer_id, str(receiver_target)),) if receiver_target else ()
    return FolderConfig("bench", SOURCE, str(root), nodes, 1)


# -- trees ------------------------------------------------------------------------------------------------


def make_mixed_tree(root: Path, big_mib: int, small_files: int) -> int:
    """One large random file and `small_files` files of 1-64 KiB in 100 directories; returns bytes."""
    rng = random.Random(7)
    root.mkdir(parents=True)
    total = 0
    with open(root / "large.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(os.urandom(MiB))
    total += big_mib * MiB
    for i in range(small_files):
        d = root / f"dir{i % 100:02d}"
        d.mkdir(exist_ok=True)
        size = rng.randint(1024, 64 * 1024)
        (d / f"f{i:05d}.dat").write_bytes(rng.randbytes(size))
        total += size
    return total


def make_many_files(root: Path, count: int) -> None:
    """`count` files of 0-2 KiB, 100 to a directory, two levels deep (like a source tree)."""
    rng = random.Random(11)
    for i in range(count):
        d = root / f"pkg{i // 1000:03d}" / f"mod{(i // 100) % 10}"
        if i % 100 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i % 100:03d}.txt").write_bytes(rng.randbytes(rng.randint(0, 2048)))


def drop_cache(root: Path) -> None:
    """Evict the tree's file pages: they are clean (os.sync after the tree was made), so DONTNEED drops them.
    The VM's disk may still be cached by its host: "cold" here is the guest's page cache only."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_all(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(4 * MiB):
                    pass


async def scan_once(root: Path, db_path: Path, workers: int) -> tuple[float, int, int]:
    db = await Database.open(db_path, MIGRATIONS)
    try:
        scanner = Scanner(db, IndexRepo(), folder_config(root), hasher=Hasher(workers))
        t0 = time.perf_counter()
        report = await scanner.full_scan()
        return time.perf_counter() - t0, report.bytes_hashed, report.files_hashed
    finally:
        await db.close()


# -- part d -----------------------------------------------------------------------------------------------


async def part_d(base: Path, big_mib: int, small_files: int, many: int) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    tree = base / "mixed"
    total = make_mixed_tree(tree, big_mib, small_files)
    os.sync()
    await trio.sleep(1.0)  # past the scanner's racy window: every file is hashed once
    runs: dict[int, list[float]] = {1: [], 2: [], 3: [], 4: []}
    files = 0
    for i, workers in enumerate((1, 2, 3, 4, 4, 3, 2, 1)):  # both directions: the host's cache warms as we go
        drop_cache(tree)
        seconds, hashed, files = await scan_once(tree, base / f"mixed-{i}.db", workers)
        assert hashed == total, (hashed, total)
        runs[workers].append(seconds)
    for workers, times in runs.items():
        rates = [total / MiB / t for t in times]
        rows.append((f"d  cold scan, {workers} hash worker{'s' if workers > 1 else ''}", f"{statistics.mean(rates):.0f} MiB/s",
                     f"{total / MiB:.0f} MiB, {files} files; runs {', '.join(f'{r:.0f}' for r in rates)} MiB/s"))
    for workers in (1, 2, 4):
        read_all(tree)
        seconds, hashed, _ = await scan_once(tree, base / f"mixed-warm-{workers}.db", workers)
        rows.append((f"d  warm scan (page cache), {workers} hash worker{'s' if workers > 1 else ''}", f"{hashed / MiB / seconds:.0f} MiB/s",
                     "hashlib alone: ~1100 MiB/s per core" if workers == 1 else ""))

    many_root = base / "many"
    t0 = time.perf_counter()
    make_many_files(many_root, many)
    made = time.perf_counter() - t0
    await trio.sleep(1.0)
    db = await Database.open(base / "many.db", MIGRATIONS)
    try:
        scanner = Scanner(db, IndexRepo(), folder_config(many_root))
        t0 = time.perf_counter()
        first = await scanner.full_scan()
        initial = time.perf_counter() - t0
        rows.append((f"d  initial scan of {many:,} small files", f"{initial:.2f} s",
                     f"{first.files_hashed / initial:,.0f} files/s (created in {made:.1f} s)"))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            again = await scanner.full_scan()
            times.append(time.perf_counter() - t0)
            assert again.changed == 0 and again.files_hashed == 0
        target = "OK" if max(times) < 3.0 else "MISSED"
        rows.append((f"d  rescan of {many:,} unchanged files", f"{statistics.median(times):.2f} s",
                     f"median of 3 ({', '.join(f'{t:.2f}' for t in times)}); target < 3 s: {target}"))
    finally:
        await db.close()
    return rows


# -- part e (children) -------------------------------------------------------------------------------------


async def child_source(db_path: str, root: str) -> None:
    """Hold the index: rescan it, then page through all of it as chunks."""
    out = {"baseline": rss_kib()}
    db = await Database.open(db_path, MIGRATIONS)
    repo = IndexRepo()
    scanner = Scanner(db, repo, folder_config(Path(root)))
    await scanner.full_scan()
    out["after_rescan"] = rss_kib()
    after, chunks, entries = 0, [], 0
    while True:
        page = await db.read(lambda c, a=after: repo.unsigned_chunks(c, "bench", a, 10_000))
        if not page:
            break
        for ch in page:
            chunks.append(ch.to_bytes())
            entries += len(ch.entries)
        after = page[-1].seq
    out["after_chunks"] = rss_kib()
    out["peak"] = hwm_kib()
    out["entries"] = entries
    out["chunks"] = len(chunks)
    out["chunk_bytes"] = sum(map(len, chunks))
    Path(db_path + ".chunks").write_bytes(b"".join(len(c).to_bytes(4, "big") + c for c in chunks))
    await db.close()
    print(json.dumps(out))


async def child_receiver(db_path: str, chunks_path: str, target: str) -> None:
    """Take the whole index as chunks, then plan a full sync of it into an empty directory."""
    from p2pnode.sync.model import IndexChunk
    from p2pnode.sync.planner import plan

    out = {"baseline": rss_kib()}
    db = await Database.open(db_path, MIGRATIONS)
    repo = IndexRepo()
    data = Path(chunks_path).read_bytes()
    pos = 0
    while pos < len(data):
        n = int.from_bytes(data[pos : pos + 4], "big")
        chunk = IndexChunk.from_bytes(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
        await db.write(lambda c, ch=chunk: repo.accept_chunk(c, ch))
    del data
    out["after_accept"] = rss_kib()
    p = await db.read(lambda c: plan(repo.iter_desired(c, "bench"), {}, {}, locate=lambda h: repo.locate(c, h)))
    out["plan_files"] = len(p.files)
    out["after_plan"] = rss_kib()
    out["peak"] = hwm_kib()
    await db.close()
    print(json.dumps(out))


def run_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_e(base: Path, many: int) -> list[tuple[str, str, str]]:
    root = base / "many"
    if not root.exists():
        make_many_files(root, many)
        time.sleep(1.0)
    db_path = base / "e-source.db"
    if (base / "many.db").exists():
        shutil.copy(base / "many.db", db_path)
    src = run_child("--child-source", str(db_path), str(root))
    rows = [
        (f"e  source holding {many:,} files: after a rescan", f"{src['after_rescan'] / 1024:.0f} MiB RSS",
         f"interpreter and imports {src['baseline'] / 1024:.0f} MiB"),
        ("e  ... after serving the whole index as chunks", f"{src['after_chunks'] / 1024:.0f} MiB RSS",
         f"peak {src['peak'] / 1024:.0f} MiB; {src['chunks']} chunks, {src['chunk_bytes'] / MiB:.1f} MiB (kept in memory here)"),
    ]
    rcv = run_child("--child-receiver", str(base / "e-receiver.db"), str(db_path) + ".chunks", str(base / "target"))
    target = "OK" if max(src["peak"], rcv["peak"]) < 150 * 1024 else "MISSED"
    rows += [
        (f"e  receiver holding {many:,} desired entries", f"{rcv['after_accept'] / 1024:.0f} MiB RSS", ""),
        (f"e  ... planning a full sync ({rcv['plan_files']:,} files)", f"{rcv['after_plan'] / 1024:.0f} MiB RSS",
         f"peak {rcv['peak'] / 1024:.0f} MiB; target < 150 MiB: {target}"),
    ]
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-source":
        trio.run(child_source, sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--child-receiver":
        trio.run(child_receiver, sys.argv[2], sys.argv[3], sys.argv[4])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="de", help="which parts to run (d, e)")
    ap.add_argument("--dir", default="/var/tmp", help="where the fresh work directory is made")
    ap.add_argument("--big-mib", type=int, default=256, help="size of the large file in the cold-scan tree")
    ap.add_argument("--small-files", type=int, default=4000, help="1-64 KiB files in the cold-scan tree")
    ap.add_argument("--files", type=int, default=100_000, help="files in the rescan / memory tree")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="p2pnode-sync-bench-", dir=args.dir))
    rows: list[tuple[str, str, str]] = []
    try:
        if "d" in args.parts:
            rows += trio.run(part_d, base, args.big_mib, args.small_files, args.files)
        if "e" in args.parts:
            rows += part_e(base, args.files)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>{vwidth}}  notes")
    for name, value, notes in rows:
        print(f"{name:<{width}}  {value:>{vwidth}}  {notes}")


if __name__ == "__main__":
    main()
