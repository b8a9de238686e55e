"""Issue 8's attacks against a real `p2pnode run` process, each asserting the issue's targets.

Per attack (`tests/hostile/attacks.py`), a fresh node subprocess with a cluster config and a good
member pinging it 4× a second from its own process (`tests/hostile/harness.py`); the attack runs
for SECONDS, and the node must keep every good ping (none over 1 s, p99 < 100 ms), stay under
200 MiB of RSS, log less than 1 MiB per 30 s of attack, and be alive and answering its control
socket afterwards; three attacks add a target of their own (peers persisted, idle connections
held, what a non-member may read). `benchmarks/hostile.py` runs the same attacks for 30 s.

Against main at 4595994 most of these fail; they pass once issue 8's fixes land. They are not
skipped or relaxed for that reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hostile.attacks import ATTACKS
from hostile.harness import run_attack

pytestmark = pytest.mark.hostile

SECONDS = 3.0


@pytest.mark.parametrize("name", list(ATTACKS))
async def test_node_withstands(name: str, tmp_path: Path) -> None:
    m = await run_attack(ATTACKS[name], SECONDS, tmp_path)
    assert any(m.counts.values()), f"the attack never reached the node\n{m.describe()}"
    assert not m.failures(), f"targets missed: {', '.join(m.failures())}\n{m.describe()}"
