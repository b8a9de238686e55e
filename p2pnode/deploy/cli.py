"""`p2pnode deploy status|list|logs`: deploy records from the local node (any node: records are on the bus).

Each asks the node through its control socket (<data-dir>/control.sock, the node's user only);
`logs --node N` is fetched by the local node from node N (or, if N cannot be reached, the log
tail of its last report).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import trio

from .. import control
from .records import format_list, format_record

EXIT_FAILED = 1


async def _get(args: argparse.Namespace, target: str) -> tuple[int, Any]:
    with trio.fail_after(args.timeout):
        return await control.request(Path(args.data_dir) / control.SOCKET_NAME, "GET", target)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text, flush=True)


async def _status(args: argparse.Namespace) -> int:
    target = f"/deploy/status/{quote(args.deploy_id, safe='')}"
    code, rec = await _get(args, target)
    while code == 200 and args.wait and not rec.get("settled"):
        await trio.sleep(0.5)
        code, rec = await _get(args, target)
    if code != 200:
        _print(args, rec, f"p2pnode: {rec.get('error', f'HTTP {code}')}")
        return EXIT_FAILED
    _print(args, rec, format_record(rec))
    return EXIT_FAILED if rec["state"] in ("failed", "partial") else 0


async def _list(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("app", args.app), ("node", args.node), ("limit", args.limit)) if v}
    code, reply = await _get(args, "/deploy/list" + (f"?{urlencode(query)}" if query else ""))
    if code != 200:
        _print(args, reply, f"p2pnode: {reply.get('error', f'HTTP {code}')}")
        return EXIT_FAILED
    _print(args, reply, format_list(reply["deploys"]))
    return 0


async def _logs(args: argparse.Namespace) -> int:
    code, reply = await _get(args, f"/deploy/logs/{quote(args.deploy_id, safe='')}?{urlencode({'node': args.node})}")
    if code != 200:
        _print(args, reply, f"p2pnode: {reply.get('error', f'HTTP {code}')}")
        return EXIT_FAILED
    note = f"\n({reply['note']})" if reply.get("note") else ""
    _print(args, reply, reply["log"].rstrip("\n") + note)
    return 0


def add_parser(sub: Any, default_data_dir: Callable[[], str]) -> None:
    d = sub.add_parser("deploy", help="deploy records: status, list, logs (from any node)", description=(
        "Read deploys from this node. Every node stores every deploy command and every target's signed reports, so "
        "any node answers for the whole cluster. Deploys are started with p2pnode-admin deploy …"))
    dsub = d.add_subparsers(dest="deploy_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=default_data_dir(), help="the local node's data directory")
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--timeout", type=float, default=30.0)

    p = dsub.add_parser("status", parents=[common], help="a deploy's record: per node stage, progress, timing, result, log tail")
    p.add_argument("deploy_id")
    p.add_argument("--wait", action="store_true", help="until every target is done; exit 1 if the deploy failed")
    p.set_defaults(func=_status)
    p = dsub.add_parser("list", parents=[common], help="deploys, newest first")
    p.add_argument("--app", metavar="PROJECT/NAME/ENV")
    p.add_argument("--node", metavar="NAME|PEER_ID", help="only deploys that target this node")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_list)
    p = dsub.add_parser("logs", parents=[common], help="a node's full log of a deploy")
    p.add_argument("deploy_id")
    p.add_argument("--node", required=True, metavar="NAME|PEER_ID")
    p.set_defaults(func=_logs)
