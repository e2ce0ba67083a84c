"""When to stop sending: --limit and call.max_cost_usd, counting calls in flight."""

from __future__ import annotations

from flow.budget import Budget, Verdict

GO, WAIT, STOP = Verdict.GO, Verdict.WAIT, Verdict.STOP


def test_limit_allows_exactly_n_calls() -> None:
    budget = Budget(limit=3)
    assert [budget.take(0.0) for _ in range(5)] == [GO, GO, GO, STOP, STOP]
    assert budget.reached is None


def test_cap_counts_spend_before_the_run() -> None:
    budget = Budget(cap_usd=1.0, spent_before_usd=1.0)
    assert budget.take(0.0) is STOP
    assert budget.reached is not None and "$1.0000 of $1.0000" in budget.reached


def test_calls_in_flight_count_at_the_mean_so_far_and_the_next_waits_for_them() -> None:
    budget = Budget(cap_usd=1.0)
    for _ in range(4):
        assert budget.take(0.0) is GO
    for _ in range(4):
        budget.settle()
    spent = 4 * 0.1  # four calls settled at $0.10 each
    assert [budget.take(spent) for _ in range(7)] == [GO] * 6 + [WAIT]
    budget.settle()  # one came back at $0.10: still $1.00 expected in all
    assert budget.take(spent + 0.1) is WAIT
    budget.settle()  # one came back for nothing: $0.50 + 4 x $0.0833 expected
    assert budget.take(spent + 0.1) is GO
    assert budget.take(1.0) is STOP and budget.reached is not None


def test_before_the_first_reply_calls_in_flight_count_at_their_estimate() -> None:
    budget = Budget(cap_usd=1.0)
    assert [budget.take(0.0, estimate_usd=0.3) for _ in range(5)] == [GO] * 4 + [WAIT]


def test_a_first_call_starts_whatever_its_estimate() -> None:
    assert Budget(cap_usd=1.0).take(0.0, estimate_usd=5.0) is GO


def test_no_limit_and_no_cap_never_stop() -> None:
    budget = Budget()
    assert all(budget.take(1e9) is GO for _ in range(1000))
