"""Run deploy commands on this machine, without the mesh: `python -m p2pnode.deploy.local`.

For trying a recipe (examples/lightnode) and for the tests that kill an executor mid-deploy.
Opens the journal, resumes any unfinished deploy in it (the restart path), submits the command
files given (JSON, the command's `to_dict()` form), prints every status report as a JSON line,
and exits when all of them are final: 0 if every deploy succeeded, 1 if not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import trio

from ..config import ConfigError
from ..errors import P2PNodeError
from . import config as deploy_config
from .config import DeployConfig
from .executor import Executor
from .journal import Journal
from .report import DeployReport
from .spec import DeployCommand


async def run(cfg: DeployConfig, journal_path: Path, commands: list[DeployCommand]) -> int:
    journal = await Journal.open(journal_path)

    async def show(report: DeployReport) -> None:
        print(json.dumps(report.to_dict(), sort_keys=True), flush=True)

    try:
        async with Executor.open(cfg, journal, on_report=show) as ex:
            ids = [r.deploy_id for r in await journal.unfinished()]
            for cmd in commands:
                await ex.submit(cmd)
                ids.append(cmd.deploy_id)
            finals = [await ex.wait(i) for i in ids]
    finally:
        await journal.close()
    return 0 if all(r.success for r in finals) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2pnode.deploy.local", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="JSON file with the node's deploy settings")
    parser.add_argument("--journal", type=Path, required=True, help="SQLite journal (created if missing)")
    parser.add_argument("commands", type=Path, nargs="*", help="command files (JSON)")
    args = parser.parse_args(argv)
    try:
        cfg = deploy_config.parse(json.loads(args.config.read_text()), args.journal.parent)
        commands = [DeployCommand.from_dict(json.loads(p.read_text())) for p in args.commands]
        return trio.run(run, cfg, args.journal, commands)
    except (ConfigError, P2PNodeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
