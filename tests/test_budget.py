"""When to stop sending: --limit and call.max_cost_usd, counting calls in flight."""

from __future__ import annotations

from flow.budget import Budget


def test_limit_allows_exactly_n_calls() -> None:
    budget = Budget(limit=3)
    assert [budget.take(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert budget.reached is None


def test_cap_counts_spend_before_the_run() -> None:
    budget = Budget(cap_usd=1.0, spent_before_usd=1.0)
    assert not budget.take(0.0)
    assert budget.reached is not None and "$1.0000 of $1.0000" in budget.reached


def test_cap_expects_calls_in_flight_to_cost_the_mean_so_far() -> None:
    budget = Budget(cap_usd=1.0)
    for _ in range(4):
        assert budget.take(0.0)
    for _ in range(4):
        budget.settle()
    spent = 4 * 0.1  # four calls settled at $0.10 each
    for _ in range(6):
        assert budget.take(spent)  # the sixth starts with 5 x $0.10 in flight: $0.90
    assert not budget.take(spent)  # a seventh would start at $0.40 + 6 x $0.10
    assert budget.reached is not None and "$0.6000 more expected" in budget.reached


def test_no_limit_and_no_cap_never_stop() -> None:
    budget = Budget()
    assert all(budget.take(1e9) for _ in range(1000))
