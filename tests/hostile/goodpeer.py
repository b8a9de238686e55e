"""The good peer: a cluster member that pings the node under attack, in its own process.

    python -m hostile.goodpeer --seed HEX --target /ip4/…/tcp/…/p2p/… [--rate 4] [--timeout 2]

(with `tests/` on PYTHONPATH). Every 1/rate seconds it starts one ping — a new stream,
multistream-select of /ipfs/ping/1.0.0, 32 bytes echoed — and prints one JSON line as it starts,
{"seq": n, "t": start (unix s)}, and one as it ends: {"seq": n, "ms": duration including the
stream's negotiation} or {"seq": n, "error": …}.
A ping that takes longer than --timeout is a failure. Pings run concurrently, so a stalled node
shows as a run of failures rather than one slow ping. It runs in its own process so that the
attacker's CPU use cannot delay its measurements; it stops on SIGTERM or when stdin closes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time

import trio

from p2pnode import codec
from p2pnode.host import Connection, Host, HostConfig, open_host
from p2pnode.identity import KeyPair
from p2pnode.multiaddr import Multiaddr
from p2pnode.platform.bus import PULL, PULL_LIMITS, PUSH, PUSH_LIMITS
from p2pnode.stdproto import ping as ping_proto
from p2pnode.streamio import MessageReader, send_message


async def _serve_empty_pull(stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
    """Answer the node's on-connect pull like a member with nothing newer (keeps the node's log quiet)."""
    with trio.fail_after(10):
        await MessageReader(stream, PULL_LIMITS.max_request).one()
        await send_message(stream, codec.encode({"docs": [], "need_have": [], "more": False}), PULL_LIMITS.max_reply)


async def _ignore_push(stream: trio.abc.HalfCloseableStream, conn: Connection) -> None:
    """Answer the node forwarding its snapshot to us, a member, like a member that has it already."""
    with trio.fail_after(10):
        await MessageReader(stream, PUSH_LIMITS.max_request).one()
        await send_message(stream, codec.encode({"result": "ignored", "code": "not_newer", "reason": ""}), PUSH_LIMITS.max_reply)


def _emit(record: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _one_ping(host: Host, target: Multiaddr, timeout: float, seq: int) -> None:
    _emit({"seq": seq, "t": time.time()})
    t0 = trio.current_time()
    try:
        with trio.fail_after(timeout):
            conn = await host.connect(target)
            await ping_proto.ping(host, conn, 1)
        _emit({"seq": seq, "ms": (trio.current_time() - t0) * 1000})
    except Exception as exc:  # every failure is a data point, never a crash of the prober
        _emit({"seq": seq, "error": f"{type(exc).__name__}: {exc}"[:200]})


async def _wait_for_stop() -> None:
    """Return on SIGTERM or SIGINT, or when stdin closes (the harness that started us is gone)."""
    async with trio.open_nursery() as nursery:

        async def stdin_closed() -> None:
            stdin = trio.lowlevel.FdStream(os.dup(0))
            while await stdin.receive_some():
                pass
            nursery.cancel_scope.cancel()

        async def signalled() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()

        nursery.start_soon(stdin_closed)
        nursery.start_soon(signalled)


async def main(args: argparse.Namespace) -> None:
    key = KeyPair.from_seed(bytes.fromhex(args.seed))
    target = Multiaddr.parse(args.target)
    async with open_host(key, HostConfig()) as host:
        host.set_handler(PULL, _serve_empty_pull)
        host.set_handler(PUSH, _ignore_push)
        async with trio.open_nursery() as nursery:

            async def stopper() -> None:
                await _wait_for_stop()
                nursery.cancel_scope.cancel()

            nursery.start_soon(stopper)
            tick = trio.current_time()
            for seq in itertools.count():
                nursery.start_soon(_one_ping, host, target, args.timeout, seq)
                tick += 1 / args.rate
                await trio.sleep_until(tick)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", required=True, help="hex Ed25519 seed of the member's key")
    parser.add_argument("--target", required=True, help="the node's TCP multiaddr with /p2p/")
    parser.add_argument("--rate", type=float, default=4.0, help="pings per second (default 4)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds after which a ping counts as failed (default 2)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
