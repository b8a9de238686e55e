"""Rolling a deploy across nodes without a coordinator: waves, derived from the signed command alone.

Every node computes the same answer from the same inputs — the command (its ordered target list,
`max_parallel`, `max_failures`, `auto_revert`, `progress_deadline`, `issued_at`) and the signed
outcomes of the targets' reports — so each target knows its wave and when it may start, and every
node shows the same rollout.

Rules (protocols/deploy.md, "Rollout"):
- Waves are the target list in its signed order, cut into groups of `max_parallel`. (The admin
  tool resolves labels or "all" into a peer list sorted by peer ID when it signs; a command that
  still names labels is resolved by each node against the snapshot it holds, sorted the same way.)
- Wave 0 may start at once. Wave i+1 may start when every node of waves 0..i has an outcome and
  at most `max_failures` of them failed. Its clock starts at the latest outcome time of those
  waves (a signed time, so every node computes the same `opened_at`).
- A node's outcome is the first final result it signed (`NodeReport.result`): success, or failed.
  An outcome signed after its wave's deadline (`opened_at + progress_deadline`) counts as failed
  (`late`); a node with no outcome once this node's clock passes deadline + `grace` counts as
  failed (`missed`), so a dead node cannot stall the rollout. The next wave's clock then starts at
  deadline + grace (or at the late outcome, if earlier): when every node could decide.
- More than `max_failures` failures in waves 0..i fails the rollout (`halted`): later waves never
  start (their nodes report `failed` / stage `halted`), and with `auto_revert` every node whose
  outcome was success reverts to its previous release — in the last wave too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs

from .. import timefmt
from .documents import Outcome
from .spec import DeployCommand

SUCCESS, FAILED, MISSED, LATE, RUNNING, WAITING, HALTED = "success", "failed", "missed", "late", "running", "waiting", "halted"


@attrs.frozen
class Plan:
    waves: tuple[tuple[str, ...], ...]
    max_failures: int
    auto_revert: bool
    deadline_ns: int
    issued_at_ns: int

    @classmethod
    def of(cls, cmd: DeployCommand, targets: Sequence[str]) -> Plan:
        size = cmd.rollout.max_parallel
        waves = tuple(tuple(targets[i : i + size]) for i in range(0, len(targets), size))
        return cls(waves, cmd.rollout.max_failures, cmd.rollout.auto_revert, int(cmd.rollout.progress_deadline * timefmt.NS),
                   cmd.issued_at_ns)

    def wave_of(self, peer: str) -> int | None:
        for i, wave in enumerate(self.waves):
            if peer in wave:
                return i
        return None


@attrs.frozen
class View:
    verdicts: dict[str, str]  # peer -> success | failed | late | missed | running (may start) | waiting | halted
    open_waves: int  # waves 0..open_waves-1 may start
    failures: tuple[str, ...]  # peers counted as failed, in wave order
    halted: bool
    done: bool  # every target has a verdict that will not change
    next_check_ns: int | None  # when a missing outcome turns into `missed` (re-evaluate then)
    opened_at_ns: tuple[int, ...]  # when each open wave could start
    total_waves: int = 0
    max_failures: int = 0

    def may_start(self, plan: Plan, peer: str) -> bool:
        wave = plan.wave_of(peer)
        return wave is not None and wave < self.open_waves and not self.halted

    def should_revert(self, plan: Plan, peer: str) -> bool:
        return self.halted and plan.auto_revert and self.verdicts.get(peer) == SUCCESS

    @property
    def reason(self) -> str:
        return self.describe(lambda p: p[-8:])

    def describe(self, name: Callable[[str], str]) -> str:
        """Why the rollout failed, in one sentence (nodes called by `name`)."""
        if not self.halted:
            return ""
        named = ", ".join(f"{name(p)} ({self.verdicts[p]})" for p in self.failures[:5])
        where = (f"halted after wave {self.open_waves} of {self.total_waves}" if self.open_waves < self.total_waves
                 else f"failed in wave {self.open_waves} of {self.total_waves}")
        return f"the rollout {where}: {len(self.failures)} node(s) failed (max_failures {self.max_failures}): {named}"


def evaluate(plan: Plan, outcomes: Mapping[str, Outcome], now_ns: int, grace_ns: int) -> View:
    verdicts: dict[str, str] = {}
    failures: list[str] = []
    opened_at = plan.issued_at_ns
    opened: list[int] = []
    n = len(plan.waves)
    for i, wave in enumerate(plan.waves):
        opened.append(opened_at)
        deadline = opened_at + plan.deadline_ns
        latest = opened_at
        pending = False
        for peer in wave:
            outcome = outcomes.get(peer)
            if outcome is not None and outcome.at_ns <= deadline:
                verdicts[peer] = SUCCESS if outcome.success else FAILED
                latest = max(latest, outcome.at_ns)
            elif outcome is not None:
                verdicts[peer] = LATE
                latest = max(latest, min(outcome.at_ns, deadline + grace_ns))
            elif now_ns > deadline + grace_ns:
                verdicts[peer] = MISSED
                latest = max(latest, deadline + grace_ns)  # when the other nodes could decide it
            else:
                verdicts[peer] = RUNNING
                pending = True
            if verdicts[peer] in (FAILED, LATE, MISSED):
                failures.append(peer)
        if pending:
            for later in plan.waves[i + 1 :]:
                verdicts.update({p: WAITING for p in later})
            return View(verdicts, i + 1, tuple(failures), False, False, deadline + grace_ns + 1, tuple(opened), n, plan.max_failures)
        if len(failures) > plan.max_failures:
            for later in plan.waves[i + 1 :]:
                verdicts.update({p: HALTED for p in later})
            return View(verdicts, i + 1, tuple(failures), True, True, None, tuple(opened), n, plan.max_failures)
        opened_at = latest
    return View(verdicts, n, tuple(failures), False, True, None, tuple(opened), n, plan.max_failures)
