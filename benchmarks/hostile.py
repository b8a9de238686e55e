"""Hostile-peer benchmark (issue 8): each attack against a real node while a good member pings it.

For every attack it starts a fresh `p2pnode run` subprocess (temp data dir, a cluster in its
config, TCP and WebSocket on one loopback port, its log in a file), pushes a snapshot listing the
node and a good peer, starts the good peer (its own process, pinging 4× a second), runs the
attack from this process for --seconds, waits one more second, and prints:
the good peer's pings (count, failed, p50/p99 ms), the node's peak RSS and CPU seconds (/proc),
the bytes it logged, whether it survived (alive and answering its control socket), and
PASS/FAIL per target: no failed ping, p99 < 100 ms, peak RSS < 200 MiB, log < 1 MiB per 30 s.
A ping that takes over 1 s counts as failed.

    python benchmarks/hostile.py                       # every attack, 30 s each (~9 min)
    python benchmarks/hostile.py --seconds 10          # shorter
    python benchmarks/hostile.py --only ping-flood --only syn-flood
    python benchmarks/hostile.py --list                # the attacks and what each does
    python benchmarks/hostile.py --keep /tmp/hostile   # keep each node's data dir and log
    python benchmarks/hostile.py --json out.json       # also write every measurement as JSON

Needs: the package installed in the running interpreter (`pip install -e .`), Linux /proc, free
loopback ports 20000-32000, ~1.5 GB of free memory for the memory attacks against a node without
issue 8's limits, and `ulimit -n` above ~2,100 (the idle-connections attack holds 1,000
connections; this script raises its soft limit to the hard one). The attacker, the node and the
good peer share the machine's cores: the node and the good peer run at a higher CPU priority
(nice -10, in autogroups of their own) when allowed, so that the attacker's CPU and other jobs on
the machine are not counted against the node; the last line says whether they did. Every process it
starts is stopped at the end of its attack, on Ctrl-C, SIGTERM or any failure (and is killed by
the kernel if this script is killed).
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hostile.attacks import ATTACKS
from hostile.harness import PRIORITY_BOOST, TARGETS, Measurement, run_attack


def _fmt_ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def table(rows: list[Measurement]) -> str:
    head = (f"{'attack':<24} {'pings':>5} {'fail':>4} {'p50 ms':>7} {'p99 ms':>8} {'peak RSS':>9} {'CPU s':>6} "
            f"{'log KiB':>8} {'alive':>5}  | no-fail  p99<100  RSS<200  log<budget  alive  own target")
    out = [head, "-" * len(head)]
    for m in rows:
        v = {k: "PASS" if ok else "FAIL" for k, ok in m.verdicts().items()}
        out.append(
            f"{m.attack:<24} {m.pings:>5} {m.failed_pings:>4} {_fmt_ms(m.p50_ms):>7} {_fmt_ms(m.p99_ms):>8} "
            f"{m.peak_rss_mib:>5.0f} MiB {m.cpu_s:>6.1f} {m.log_bytes / 1024:>8.0f} {'yes' if m.survived else 'NO':>5}"
            f"  | {v['pings']:<7}  {v['p99']:<7}  {v['rss']:<7}  {v['log']:<10}  {v['alive']:<5}  {v.get('attack', '-')}"
        )
    return "\n".join(out)


async def main(args: argparse.Namespace) -> int:
    names = args.only or list(ATTACKS)
    rows: list[Measurement] = []
    terminated = False
    async with trio.open_nursery() as nursery:

        async def stop_on_sigterm() -> None:
            nonlocal terminated
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    terminated = True
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_sigterm)
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            root = Path(args.keep) if args.keep else Path(tmp)
            for name in names:
                print(f"== {name}: {ATTACKS[name].summary} ({args.seconds:g} s)", file=sys.stderr, flush=True)
                workdir = root / name
                workdir.mkdir(parents=True, exist_ok=False)
                m = await run_attack(ATTACKS[name], args.seconds, workdir, settle=args.settle)
                rows.append(m)
                print(m.describe(), file=sys.stderr, flush=True)
        nursery.cancel_scope.cancel()
    if terminated:
        print("SIGTERM: stopped; every process started was stopped", file=sys.stderr)
        return 143
    print()
    print(table(rows))
    for m in rows:
        if m.attack_target:
            print(f"own target of {m.attack}: {m.attack_target}")
    budget = TARGETS.log_bytes_per_30s * (args.seconds + args.settle) / 30 / 1024
    print(f"\n(log budget: 1 MiB per 30 s of attack = {budget:.0f} KiB for {args.seconds:g} s + {args.settle:g} s settle;"
          f" pings: {TARGETS.failed_pings} failures allowed, a ping over 1 s is a failure)")
    boosted = sum(m.boosted for m in rows)
    print(f"(the node and the good peer ran at nice {PRIORITY_BOOST} in their own autogroups, above the attacker and"
          f" other jobs: {boosted} of {len(rows)} attacks; without, pings also measure CPU the node was not given)")
    if args.json:
        Path(args.json).write_text(json.dumps([m.to_json() for m in rows], indent=2))
    return 0 if all(not m.failures() for m in rows) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each attack runs (default 30)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds measured after each attack (default 1, at least the ping timeout)")
    parser.add_argument("--only", action="append", choices=sorted(ATTACKS), metavar="NAME", help="run only this attack (repeatable)")
    parser.add_argument("--keep", metavar="DIR", help="keep each node's data dir and log under DIR (must not hold the attacks' names)")
    parser.add_argument("--json", metavar="FILE", help="write the measurements as JSON")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.list:
        for attack in ATTACKS.values():
            print(f"{attack.name:<24} {attack.summary}")
        sys.exit(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        code = trio.run(main, args)
    except (KeyboardInterrupt, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[1] is not None:
            raise
        print("interrupted: every process started was stopped", file=sys.stderr)
        code = 130
    sys.exit(code)
