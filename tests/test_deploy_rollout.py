"""The rollout rules (p2pnode/deploy/rollout.py), pure: waves from the signed command, when each may
start, halting, deadlines for nodes that never answer, and that every node computes the same view."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pnode.deploy.documents import Outcome
from p2pnode.deploy.rollout import Plan, evaluate

S = 1_000_000_000
PEERS = [f"p{i}" for i in range(7)]


def plan(n: int = 5, parallel: int = 2, failures: int = 0, revert: bool = False, deadline: int = 10) -> Plan:
    waves = tuple(tuple(PEERS[:n][i : i + parallel]) for i in range(0, n, parallel))
    return Plan(waves, failures, revert, deadline * S, 0)


def ok(t: float) -> Outcome:
    return Outcome("success", True, int(t * S))


def bad(t: float) -> Outcome:
    return Outcome("failed", False, int(t * S))


def test_waves_open_one_after_the_other():
    p = plan()
    assert p.waves == (("p0", "p1"), ("p2", "p3"), ("p4",))
    v = evaluate(p, {}, 1 * S, S)
    assert v.open_waves == 1 and v.may_start(p, "p1") and not v.may_start(p, "p2") and not v.done
    v = evaluate(p, {"p0": ok(1)}, 2 * S, S)
    assert v.open_waves == 1 and v.verdicts["p2"] == "waiting"
    v = evaluate(p, {"p0": ok(1), "p1": ok(3)}, 4 * S, S)
    assert v.open_waves == 2 and v.opened_at_ns == (0, 3 * S) and v.may_start(p, "p3")
    v = evaluate(p, {"p0": ok(1), "p1": ok(3), "p2": ok(4), "p3": ok(5), "p4": ok(6)}, 7 * S, S)
    assert v.done and not v.halted and set(v.verdicts.values()) == {"success"}


def test_a_failed_wave_halts_the_rest_and_reverts_with_auto_revert():
    p = plan(revert=True)
    v = evaluate(p, {"p0": ok(1), "p1": ok(1), "p2": bad(2), "p3": ok(3)}, 4 * S, S)
    assert v.halted and v.done and v.open_waves == 2 and v.verdicts["p4"] == "halted" and not v.may_start(p, "p4")
    assert [x for x in PEERS[:5] if v.should_revert(p, x)] == ["p0", "p1", "p3"]
    assert v.reason.startswith("the rollout halted after wave 2 of 3: 1 node(s) failed (max_failures 0): p2 (failed)")
    without = plan(revert=False)
    assert not evaluate(without, {"p0": ok(1), "p1": ok(1), "p2": bad(2), "p3": ok(3)}, 4 * S, S).should_revert(without, "p0")


def test_failures_within_max_failures_do_not_halt():
    p = plan(failures=1)
    v = evaluate(p, {"p0": bad(1), "p1": ok(1), "p2": ok(2), "p3": ok(2), "p4": ok(3)}, 4 * S, S)
    assert v.done and not v.halted and v.failures == ("p0",)


def test_a_node_that_never_answers_is_missed_after_deadline_and_grace():
    p = plan(failures=1, deadline=10)
    v = evaluate(p, {"p0": ok(1)}, 10 * S, S)
    assert not v.done and v.verdicts["p1"] == "running" and v.next_check_ns == 11 * S + 1
    v = evaluate(p, {"p0": ok(1)}, 11 * S + 1, S)
    assert v.verdicts["p1"] == "missed" and v.open_waves == 2 and v.opened_at_ns[1] == 11 * S
    v = evaluate(p, {"p0": ok(1), "p1": ok(9.5)}, 12 * S, S)  # signed in time, delivered late: not missed after all
    assert v.verdicts["p1"] == "success"
    v = evaluate(p, {"p0": ok(1), "p1": ok(10.5)}, 12 * S, S)  # signed after its deadline: late
    assert v.verdicts["p1"] == "late" and v.failures == ("p1",)


outcome = st.one_of(st.none(), st.builds(Outcome, st.sampled_from(["success", "failed"]), st.booleans(), st.integers(0, 60 * S)))


@given(st.integers(1, 7), st.integers(1, 4), st.integers(0, 3), st.lists(outcome, min_size=7, max_size=7), st.integers(0, 120 * S))
def test_every_node_computes_the_same_view_and_waves_open_in_order(n, parallel, max_failures, results, now):
    p = plan(n, parallel, max_failures)
    outcomes = {peer: o for peer, o in zip(PEERS[:n], results) if o is not None}
    v = evaluate(p, outcomes, now, S)
    assert evaluate(p, dict(reversed(list(outcomes.items()))), now, S) == v
    assert 1 <= v.open_waves <= len(p.waves)
    for i in range(v.open_waves - 1):  # every wave before the last open one is fully decided
        assert all(v.verdicts[x] in ("success", "failed", "late", "missed") for x in p.waves[i])
    assert not v.halted or len(v.failures) > max_failures  # halting waits until the failing wave is decided
    if v.halted:
        assert all(v.verdicts[x] == "halted" for w in p.waves[v.open_waves:] for x in w)
    assert v.done == (v.halted or all(v.verdicts[x] != "running" and v.verdicts[x] != "waiting" for x in PEERS[:n]))
