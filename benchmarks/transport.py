"""Transport benchmark: p2pnode against js-libp2p, on loopback TCP, side by side.

Prints a table of: handshakes per second; time to first stream; bulk throughput of 1 stream and
of 16 concurrent streams (sender and receiver are separate processes, as on real hosts); idle
memory per connection with 500 connections. The same bulk transfers between two js-libp2p nodes
run in the same invocation, and the table gives p2pnode/js ratios.

    python benchmarks/transport.py            # full run (about a minute)
    python benchmarks/transport.py --quick    # smaller sizes, for a smoke check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "interop"))

from jspeer import start_js_peer
from procstat import rss_kib

from p2pnode import diag
from p2pnode.host import HostConfig, open_host
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.transport.upgrade import UpgradeLimits
import trio.lowlevel

MiB = 1 << 20
LISTEN = HostConfig(listen=(Multiaddr.parse("/ip4/127.0.0.1/tcp/0"),), upgrade=UpgradeLimits(keepalive_interval=0))


async def serve() -> None:
    """Child process: a receiving host; prints its address, exits when stdin closes."""
    async with open_host(KeyPair.generate(), LISTEN) as host:
        diag.install(host)
        host.set_protected(lambda peer: True)  # the benchmark's clients are trusted peers, as members are
        print(host.full_addrs()[0], flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addr = self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


async def py_handshakes(addr: str, count: int) -> float:
    async with open_host(KeyPair.generate(), HostConfig(upgrade=UpgradeLimits(keepalive_interval=0))) as h:
        start = time.perf_counter()
        for _ in range(count):
            conn = await h.connect(addr)
            await conn.muxer.aclose()
            while h.connections():
                await trio.lowlevel.checkpoint()
        return count / (time.perf_counter() - start)


async def py_first_stream(addr: str, count: int) -> float:
    """Median seconds from dial to the first byte echoed on a fresh stream."""
    samples = []
    async with open_host(KeyPair.generate(), HostConfig(upgrade=UpgradeLimits(keepalive_interval=0))) as h:
        for _ in range(count):
            start = time.perf_counter()
            conn = await h.connect(addr)
            stream = await h.new_stream(conn, diag.ECHO)
            await stream.send_all(b"x")
            await stream.receive_some(1)
            samples.append(time.perf_counter() - start)
            await stream.aclose()
            await conn.muxer.aclose()
            while h.connections():
                await trio.lowlevel.checkpoint()
    return statistics.median(samples)


async def py_bulk(addr: str, nbytes: int, streams: int) -> float:
    async with open_host(KeyPair.generate(), HostConfig(upgrade=UpgradeLimits(keepalive_interval=0))) as h:
        conn = await h.connect(addr)
        await diag.transfer(h, conn, diag.SINK, 8 * MiB, streams)  # warm-up
        seconds = await diag.transfer(h, conn, diag.SINK, nbytes, streams)
    return nbytes / seconds / MiB


async def py_idle_memory(server: Server, count: int) -> float:
    """KiB of server RSS per idle inbound connection (each from a distinct client identity)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cfg = HostConfig(upgrade=UpgradeLimits(keepalive_interval=0), standard_protocols=False)
    before = rss_kib(server.proc.pid)
    async with trio.open_nursery() as nursery:
        hosts = []
        for _ in range(count):
            h = await _start_host(nursery, cfg)
            await h.connect(server.addr)
            hosts.append(h)
        await trio.sleep(1)
        after = rss_kib(server.proc.pid)
        for h in hosts:
            await h.aclose()
        nursery.cancel_scope.cancel()
    return (after - before) / count


async def _start_host(nursery, cfg):
    from p2pnode.host import Host

    h = Host(KeyPair.generate(), cfg)
    await nursery.start(h.run)
    return h


async def js_bulk(nbytes: int, streams: int) -> float:
    async with start_js_peer() as a, start_js_peer() as b:
        await a.call("sink", addr=b.addr("tcp"), streams=streams, bytes=8 * MiB)
        reply = await a.call("sink", addr=b.addr("tcp"), streams=streams, bytes=nbytes, timeout=600)
    return nbytes / reply["seconds"] / MiB


async def cross_bulk(addr_py: str, nbytes: int) -> tuple[float, float]:
    """py→js and js→py, one stream each, for the record."""
    async with start_js_peer() as js, open_host(KeyPair.generate(), HostConfig(upgrade=UpgradeLimits(keepalive_interval=0))) as h:
        conn = await h.connect(js.addr("tcp"))
        py_to_js = nbytes / await diag.transfer(h, conn, diag.SINK, nbytes, 1) / MiB
        reply = await js.call("sink", addr=addr_py, streams=1, bytes=nbytes, timeout=600)
        js_to_py = nbytes / reply["seconds"] / MiB
    return py_to_js, js_to_py


async def main(quick: bool) -> None:
    size = 64 * MiB if quick else 512 * MiB
    rounds = 3
    server = Server()
    try:
        hs = await py_handshakes(server.addr, 50 if quick else 300)
        first = await py_first_stream(server.addr, 20 if quick else 100)
        py1 = max([await py_bulk(server.addr, size, 1) for _ in range(rounds)])
        py16 = max([await py_bulk(server.addr, size, 16) for _ in range(rounds)])
        js1 = max([await js_bulk(size, 1) for _ in range(rounds)])
        js16 = max([await js_bulk(size, 16) for _ in range(rounds)])
        p2j, j2p = await cross_bulk(server.addr, size)
        mem = await py_idle_memory(server, 100 if quick else 500)
    finally:
        server.close()

    rows = [
        ("handshakes per second (TCP+noise+yamux, sequential)", f"{hs:,.0f}/s", "", ""),
        ("time to first stream (dial → first echoed byte, median)", f"{first * 1000:.2f} ms", "", ""),
        (f"bulk 1 stream, {size // MiB} MiB (best of {rounds})", f"{py1:,.0f} MiB/s", f"{js1:,.0f} MiB/s", f"{py1 / js1:.2f}×"),
        (f"bulk 16 streams, {size // MiB} MiB (best of {rounds})", f"{py16:,.0f} MiB/s", f"{js16:,.0f} MiB/s", f"{py16 / js16:.2f}×"),
        ("p2pnode → js-libp2p, 1 stream", f"{p2j:,.0f} MiB/s", "", ""),
        ("js-libp2p → p2pnode, 1 stream", f"{j2p:,.0f} MiB/s", "", ""),
        (f"idle memory per connection ({100 if quick else 500} connections)", f"{mem:,.1f} KiB", "", "target ≤ 100 KiB"),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'p2pnode':>14}  {'js-libp2p':>14}  {'ratio':>8}")
    for name, ours, theirs, ratio in rows:
        print(f"{name:<{w}}  {ours:>14}  {theirs:>14}  {ratio:>8}")
    print(json.dumps({"handshakes_per_s": hs, "first_stream_ms": first * 1000, "py_1": py1, "py_16": py16,
                      "js_1": js1, "js_16": js16, "py_to_js": p2j, "js_to_py": j2p, "idle_kib_per_conn": mem}))


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        trio.run(serve)
    else:
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--quick", action="store_true", help="smaller transfers and counts")
        trio.run(main, parser.parse_args().quick)
