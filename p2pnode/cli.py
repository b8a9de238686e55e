"""`p2pnode` command line: run a node, ping a peer, show a peer's identify record."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import quote

import attrs
import trio

from . import __version__, control, datadir, logfmt
from .cluster.status import fetch_status
from .platform.rpc import RequestRefused
from .config import CONFIG_NAME, ConfigError, load_or_create, parse
from .deploy import cli as deploy_cli
from .errors import DecodeError, DialError, HandshakeError, P2PNodeError, ProtocolError
from .fsutil import atomic_write
from .host import open_client
from .identity import KeyFileError, load_or_create_key
from .multiaddr import Multiaddr
from .node import Node
from .stdproto import identify as identify_proto
from .stdproto import ping as ping_proto
from .sync import cli as sync_cli
from .platform.db import StoreError
from .trioutil import open_nursery_unwrapped

log = logging.getLogger("p2pnode")
EXIT_CONFIG = 2
EXIT_FAILURE = 1
STOP_TIMEOUT = 20  # below systemd's TimeoutStopSec


def default_data_dir() -> str:
    return os.environ.get("P2PNODE_DATA_DIR", ".p2pnode")


def _parse_addr(text: str) -> Multiaddr:
    try:
        return Multiaddr.parse(text)
    except DecodeError as exc:
        raise SystemExit(f"p2pnode: {exc}") from None  # the message names the multiaddr and the part that is wrong


# -- run ---------------------------------------------------------------------------------------
async def _run(args: argparse.Namespace) -> int:
    with datadir.lock(args.data_dir):  # before anything is written there: a second node stops here
        return await _run_locked(args)


async def _run_locked(args: argparse.Namespace) -> int:
    config, created = load_or_create(args.data_dir)
    if args.listen:
        config = attrs.evolve(config, listen=tuple(_parse_addr(a) for a in args.listen))
    logfmt.setup(args.log_level or config.log_level)
    if created:
        log.info(logfmt.fmt("config_created", path=config.data_dir / "config.json"))
    node = Node(config)
    # Catch the signals before anything is printed: whoever reads the addresses may stop us at
    # once, and a signal that arrives while the node starts is handled once it has started.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_nursery_unwrapped() as nursery:
            await nursery.start(node.run)
            assert node.host is not None  # set before the node reports started
            for addr in node.host.full_addrs():
                print(addr, flush=True)
            async for signum in signals:
                log.info(logfmt.fmt("stopping", signal=signal.Signals(signum).name))
                break
            with trio.fail_after(STOP_TIMEOUT):
                await node.stop()
    return 0


# -- ping / id ---------------------------------------------------------------------------------
async def _ping(args: argparse.Namespace) -> int:
    addr = _parse_addr(args.multiaddr)
    async with open_client() as host:
        with trio.fail_after(args.timeout):
            conn = await host.connect(addr)
        print(f"PING {addr} ({conn.peer_id})", flush=True)
        rtts = []
        for seq in range(1, args.count + 1):
            with trio.fail_after(args.timeout):
                (rtt,) = await ping_proto.ping(host, conn, 1)
            rtts.append(rtt)
            print(f"seq={seq} rtt={rtt * 1000:.3f} ms", flush=True)
            if seq < args.count:
                await trio.sleep(args.interval)
        print(f"--- {len(rtts)} replies, min/avg/max = {min(rtts)*1000:.3f}/{sum(rtts)/len(rtts)*1000:.3f}/{max(rtts)*1000:.3f} ms")
    return 0


async def _id(args: argparse.Namespace) -> int:
    addr = _parse_addr(args.multiaddr)
    async with open_client() as host:
        with trio.fail_after(args.timeout):
            conn = await host.connect(addr)
            record = await identify_proto.identify(host, conn)
    observed = record.observed_multiaddr()
    info = {
        "peer_id": str(conn.peer_id),
        "agent_version": record.agent_version,
        "protocol_version": record.protocol_version,
        "listen_addrs": [str(a) for a in record.listen_multiaddrs()],
        "observed_addr": str(observed) if observed else None,
        "protocols": list(record.protocols),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, list):
                print(f"{k:<{width}}  " + (("\n" + " " * (width + 2)).join(v) if v else "-"))
            else:
                print(f"{k:<{width}}  {v if v is not None else '-'}")
    return 0


async def _init(args: argparse.Namespace) -> int:
    """Create or update <data-dir>/config.json and the node key; never replaces an existing key."""
    datadir.prepare(args.data_dir)
    config, created = load_or_create(args.data_dir)
    raw = config.to_json()
    if args.listen:
        raw["listen"] = args.listen
    if args.cluster_id is not None:
        raw["cluster_id"] = args.cluster_id
    if args.system_pubkey is not None:
        raw["system_pubkey"] = args.system_pubkey
    if args.bootstrap:
        raw["init_connections"] = [
            {"type": "multiaddr" if b.startswith("/") else "dns", "value": b} for b in args.bootstrap
        ]
    if args.dns_server:
        raw["dns_nameservers"] = args.dns_server
    if args.heartbeat_interval is not None:
        raw["heartbeat_interval"] = args.heartbeat_interval
    config = parse(raw, data_dir=config.data_dir)  # validated like a hand-written file
    atomic_write(config.data_dir / CONFIG_NAME, (json.dumps(config.to_json(), indent=2) + "\n").encode(), mode=0o600)
    key, key_created = load_or_create_key(config.key_path)
    info = {"peer_id": str(key.peer_id), "data_dir": str(config.data_dir), "config_created": created,
            "key_created": key_created, "listen": [str(a) for a in config.listen]}
    print(json.dumps(info, indent=2) if args.json else
          f"peer_id {key.peer_id}\nconfig  {config.data_dir / CONFIG_NAME} ({'created' if created else 'updated'})\n"
          f"key     {config.key_path} ({'created' if key_created else 'kept'})")
    return 0


async def _status(args: argparse.Namespace) -> int:
    if args.peer:
        view = await _peer_status(args)
    else:
        path = Path(args.data_dir) / control.SOCKET_NAME
        with trio.fail_after(args.timeout):
            code, view = await control.request(path, "GET", "/status?members=1")
        if code != 200:
            raise control.ControlError(view.get("error", f"HTTP {code}"))
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(format_status(view))
    return 0


async def _peer_status(args: argparse.Namespace) -> dict:
    """Another node's status. Nodes answer members only (unless public_status), so when a node runs
    with this data dir it asks for us over its own connection; otherwise we dial directly."""
    path = Path(args.data_dir) / control.SOCKET_NAME
    if path.exists():
        target = quote(args.peer, safe="")
        with trio.fail_after(args.timeout):
            code, view = await control.request(path, "GET", f"/peer-status?members=1&peer={target}")
        if code != 200:
            raise control.ControlError(view.get("error", f"HTTP {code}"))
        return view
    addr = _parse_addr(args.peer)
    async with open_client() as host:
        with trio.fail_after(args.timeout):
            conn = await host.connect(addr)
            try:
                return await fetch_status(host, conn, members=True)
            except RequestRefused:
                raise P2PNodeError(
                    f"{conn.peer_id} answers status only to members of its cluster: run this on a member "
                    "(with --data-dir of its running node, which asks for you), or set public_status on that node"
                ) from None


def format_status(view: dict) -> str:
    lines = [
        f"peer      {view['peer_id']}",
        f"cluster   {view.get('cluster_id') or '-'}",
        f"state     {view['state']}  ({view['online_count']} of {view['member_count']} members online)",
        f"snapshot  {view.get('snapshot_issued_at') or '-'}",
        f"version   {view['version']}   uptime {view['uptime_s']:.0f}s",
        "addrs     " + ("\n          ".join(view.get("addrs") or ["-"])),
    ]
    members = view.get("members")
    if members:
        rows = [("NAME", "PEER", "ONLINE", "STATE", "LAST HEARTBEAT", "RTT", "LABELS")]
        for m in members:
            rows.append((
                (m.get("name") or "-") + (" (self)" if m.get("self") else ""),
                m["peer_id"][:8] + "…" + m["peer_id"][-6:],
                "yes" if m.get("online") else "no",
                m.get("state") or "-",
                m.get("last_heartbeat") or "-",
                f"{m['rtt_ms']:.2f} ms" if m.get("rtt_ms") is not None else "-",
                ",".join(m.get("labels") or []) or "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append("")
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pnode",
        description="A peer-to-peer node: libp2p transport (TCP, WebSocket, Noise, yamux), no central server.",
    )
    parser.add_argument("--version", action="version", version=f"p2pnode {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a node in the foreground", description=(
        "Run a node. On first start it writes <data-dir>/config.json with defaults (TCP 4100, "
        "WebSocket, both on 4100) and a new Ed25519 key <data-dir>/node.key (mode 0600). Prints its full "
        "multiaddrs (with /p2p/<peer id>) on stdout and logs in logfmt on stderr; SIGTERM or "
        "Ctrl-C stops it cleanly (go-away sent to every peer). One node per data dir: a second "
        "`p2pnode run` on the same data dir exits with code 2 naming the first one's pid."))
    run.add_argument("--data-dir", default=default_data_dir(), help="data directory (default: $P2PNODE_DATA_DIR or ./.p2pnode)")
    run.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address, repeatable; overrides config.json's listen")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides config.json's log_level")
    run.set_defaults(func=_run)

    ping = sub.add_parser("ping", help="ping a peer with /ipfs/ping/1.0.0", description=(
        "Dial MULTIADDR (e.g. /ip4/127.0.0.1/tcp/4100/p2p/12D3KooW…) with a throwaway identity and "
        "print the round-trip time of each ping. Exits 1 if the dial or any ping fails."))
    ping.add_argument("multiaddr")
    ping.add_argument("-n", "--count", type=int, default=4, help="number of pings (default 4)")
    ping.add_argument("-i", "--interval", type=float, default=1.0, help="seconds between pings (default 1)")
    ping.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for the dial and for each ping")
    ping.set_defaults(func=_ping)

    ident = sub.add_parser("id", help="show a peer's identify record", description=(
        "Dial MULTIADDR and print what the peer says about itself over /ipfs/id/1.0.0: agent, "
        "listen addresses, the address it sees us at, and its protocols."))
    ident.add_argument("multiaddr")
    ident.add_argument("--json", action="store_true", help="print JSON")
    ident.add_argument("--timeout", type=float, default=10.0)
    ident.set_defaults(func=_id)

    init = sub.add_parser("init", help="create or update a data dir's config.json and node key", description=(
        "Write <data-dir>/config.json (creating it with defaults, or updating the given fields) and create "
        "the node key if there is none. An existing key is never replaced. Used by install.sh."))
    init.add_argument("--data-dir", default=default_data_dir())
    init.add_argument("--listen", action="append", metavar="MULTIADDR", help="listen address (repeatable; replaces the list)")
    init.add_argument("--cluster-id")
    init.add_argument("--system-pubkey", help="the cluster's system key (12D3KooW… from p2pnode-admin init-system)")
    init.add_argument("--bootstrap", action="append", metavar="DOMAIN|MULTIADDR", help="init_connections entry (repeatable)")
    init.add_argument("--dns-server", action="append", metavar="HOST:PORT", help="DNS server for bootstrap (repeatable)")
    init.add_argument("--heartbeat-interval", type=float)
    init.add_argument("--json", action="store_true")
    init.set_defaults(func=_init)

    status = sub.add_parser("status", help="show a node's state and its view of the members", description=(
        "Without --peer: ask the local node through its control socket (<data-dir>/control.sock, "
        "usable only by the user running the node). With --peer MULTIADDR: ask that node over "
        "/p2pnode/status/1.0.0; its reply is signed and checked."))
    status.add_argument("--data-dir", default=default_data_dir(), help="the local node's data directory")
    status.add_argument("--peer", metavar="ADDR", help=(
        "ask another node (a multiaddr, or a member's peer ID) instead of the local one; nodes answer members only, "
        "so the local node (if one runs with --data-dir) asks for you, else it is dialed directly"))
    status.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    status.add_argument("--timeout", type=float, default=10.0)
    status.set_defaults(func=_status)

    sync_cli.register(sub, default_data_dir())
    deploy_cli.add_parser(sub, default_data_dir)  # p2pnode deploy status|list|logs
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "run":
        logfmt.setup("warning")
    try:
        return trio.run(args.func, args)
    except ConfigError as exc:
        print(f"p2pnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (KeyFileError, StoreError, control.ControlError, datadir.DataDirError) as exc:
        print(f"p2pnode: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except trio.TooSlowError:
        print(f"p2pnode: {args.command}: timed out after {getattr(args, 'timeout', 0):g}s", file=sys.stderr)
        return EXIT_FAILURE
    except (DialError, HandshakeError, ProtocolError, P2PNodeError) as exc:
        print(f"p2pnode: {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
