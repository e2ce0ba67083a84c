"""The rate limiter on a fake clock: no real sleeps."""

from __future__ import annotations

import asyncio

import pytest

from flow.limiter import HEADROOM, RateLimiter, parse_duration
from flow.slowdown import CEILING


class FakeClock:
    """Time that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await asyncio.sleep(0)


def limiter(clock: FakeClock, rpm: int | None = None, tpm: int | None = None,
            learn: bool = True) -> RateLimiter:
    return RateLimiter(rpm, tpm, clock=clock, sleep=clock.sleep, learn=learn)


async def admit(lim: RateLimiter, count: int, tokens: int = 1) -> None:
    for _ in range(count):
        await lim.acquire(tokens)


@pytest.mark.parametrize("text, seconds", [
    ("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("0.5", 0.5),
    ("250ms", 0.25), ("", None), ("soon", None), ("5x", None)])
def test_parse_duration_reads_openai_reset_values(text: str, seconds: float | None) -> None:
    assert parse_duration(text) == seconds


async def test_rpm_paces_requests_just_under_the_limit() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    await admit(lim, 200)
    rate = 600 / 60 * HEADROOM
    assert clock.now == pytest.approx(200 / rate, rel=0.01)


async def test_after_idle_requests_still_go_evenly_spaced_never_bunched() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    clock.now = 5.0
    await admit(lim, 9)
    # a burst after idling would put twice the limit into a sliding one-second window
    assert clock.now == pytest.approx(5.0 + 8 / (10 * HEADROOM))


async def test_tpm_paces_by_estimated_tokens() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=60_000)
    await admit(lim, 50, tokens=1000)
    per_s = 1000 * HEADROOM
    assert clock.now == pytest.approx(49 * 1000 / per_s, rel=0.01)


async def test_settle_refunds_unused_tokens() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=60_000)
    clock.now = 1.0
    reservations = [await lim.acquire(490) for _ in range(2)]
    assert clock.now == pytest.approx(1.0 + 490 / (1000 * HEADROOM))
    now = clock.now
    for reservation in reservations:
        lim.settle(reservation, 10)
    await admit(lim, 1, tokens=900)  # the 960 tokens given back are its turn
    assert clock.now == now


async def test_settle_charges_tokens_used_beyond_the_estimate() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=60_000)
    reservation = await lim.acquire(100)
    lim.settle(reservation, 1000)
    await admit(lim, 1, tokens=100)
    assert clock.now > 0.1


async def test_headers_lower_a_configured_limit_and_set_a_missing_one() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=6000)
    lim.observe({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "90000",
                 "x-ratelimit-reset-requests": "100ms"})
    assert lim.limit("requests") == 600
    assert lim.limit("tokens") == 90000
    lim.observe({"x-ratelimit-limit-requests": "60000"})
    assert lim.limit("requests") == 6000


@pytest.mark.parametrize("value", ["0.5", "0", "-3", "inf", "1e400", "nan", "lots", ""])
async def test_a_limit_header_that_is_no_usable_number_is_ignored(value: str) -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=6000)
    lim.observe({"x-ratelimit-limit-requests": value, "x-ratelimit-limit-tokens": value,
                 "x-ratelimit-remaining-requests": value, "x-ratelimit-reset-requests": value})
    assert lim.limit("requests") == 6000 and lim.limit("tokens") is None
    await admit(lim, 5)


async def test_without_limits_only_one_request_goes_until_the_server_answers() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    await lim.acquire(10)
    second = asyncio.create_task(lim.acquire(10))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()
    lim.observe({"x-ratelimit-limit-requests": "120"})
    await asyncio.wait_for(second, 1)
    assert lim.limit("requests") == 120


async def test_a_failed_probe_lets_the_next_request_probe() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    await lim.acquire(10)
    second = asyncio.create_task(lim.acquire(10))
    third = asyncio.create_task(lim.acquire(10))
    await asyncio.sleep(0)
    lim.observe(None, reached_server=False)
    await asyncio.wait_for(second, 1)
    await asyncio.sleep(0)
    assert not third.done()
    lim.observe({})
    await asyncio.wait_for(third, 1)


async def test_a_429_pauses_everyone_then_resumes_slower_and_ramps_back() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    await admit(lim, 5)
    lim.on_rate_limited(2.0)
    await lim.acquire(1)
    assert clock.now >= 2.0
    start = clock.now
    await admit(lim, 6)
    slowed = 5 / (clock.now - start)
    assert slowed < 600 / 60 * HEADROOM * 0.85
    clock.now += 3  # back within seconds to just under the pace that met the 429
    start = clock.now
    await admit(lim, 20)
    assert 19 / (clock.now - start) == pytest.approx(600 / 60 * HEADROOM * CEILING, rel=0.01)
    clock.now += 60
    start = clock.now
    await admit(lim, 200)
    recovered = 200 / (clock.now - start)
    assert recovered > 600 / 60 * HEADROOM * 0.95


async def test_after_a_pause_waiters_are_released_at_the_pace_not_at_once() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=600)
    lim.on_rate_limited(1.0)
    admitted: list[float] = []

    async def one() -> None:
        await lim.acquire(1)
        admitted.append(clock.now)

    await asyncio.gather(*(one() for _ in range(30)))
    within_first_second = [t for t in admitted if t <= 1.0 + 1e-9]
    assert len(within_first_second) <= 1
    gaps = [b - a for a, b in zip(admitted, admitted[1:])]
    assert min(gaps) > 0


async def test_waiters_are_admitted_in_arrival_order() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=60)
    order: list[int] = []

    async def one(index: int) -> None:
        await lim.acquire(1)
        order.append(index)

    tasks = []
    for index in range(10):
        tasks.append(asyncio.create_task(one(index)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == list(range(10))


async def test_a_429_with_no_known_limit_pauses_then_paces_only_if_they_keep_coming() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    lim.observe({})
    for _ in range(100):
        await lim.acquire(1)
        clock.now += 0.01
    lim.on_rate_limited(None)  # one 429 from a server that names no limit: a pause, no pace
    assert lim.limit("requests") is None
    await lim.acquire(1)
    resumed = clock.now
    assert 0 < resumed - 1.0 <= 1.0
    for _ in range(100):  # at 100 a second, soon after: now the pace is set from that rate
        await lim.acquire(1)
        clock.now += 0.01
    lim.on_rate_limited(None)
    learned = lim.limit("requests")
    assert learned is not None and 0.7 * 6000 < learned < 6000
    paused = lim.stats().paused_s
    clock.now += paused + 3  # the pause, then three doublings
    assert lim.limit("requests") == pytest.approx(learned * 8, rel=0.01)
    await lim.acquire(1)
    clock.now += 3  # grown past anything it was: no limit any more
    await lim.acquire(1)
    assert lim.limit("requests") is None


async def test_a_429_below_the_pace_stops_bursts_and_keeps_the_rate() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=6000)
    clock.now = 30.0
    await admit(lim, 10)  # far below 100 a second
    lim.on_rate_limited(0.5)
    clock.now += 0.5
    start = clock.now
    await admit(lim, 50)
    assert 49 / (clock.now - start) == pytest.approx(100 * HEADROOM, rel=0.01)


async def probed(clock: FakeClock, limit: int, remaining: int) -> RateLimiter:
    """A limiter whose first request's answer reported `limit` and `remaining`."""
    lim = limiter(clock)
    probe = await lim.acquire(1)
    lim.observe({"x-ratelimit-limit-requests": str(limit),
                 "x-ratelimit-remaining-requests": str(remaining),
                 "x-ratelimit-reset-requests": "50ms"}, reservation=probe)
    return lim


async def test_capacity_the_server_reports_goes_at_once_and_no_more() -> None:
    clock = FakeClock()
    # a bucket of a minute, full: 1,199 may go now on top of the pace of 20 a second
    lim = await probed(clock, 1200, 1199)
    sent = [await lim.acquire(1) for _ in range(1199)]
    assert clock.now == 0.0
    # spent, by its own count: the next waits for the pace, or for a newer report
    late = asyncio.create_task(lim.acquire(1))
    await asyncio.sleep(0)
    assert not late.done()
    lim.observe({"x-ratelimit-limit-requests": "1200", "x-ratelimit-remaining-requests": "3",
                 "x-ratelimit-reset-requests": "3s"}, reservation=sent[-1])
    await late
    assert clock.now <= 0.1
    start = clock.now
    await admit(lim, 20)
    assert 20 / (clock.now - start) == pytest.approx(20 * HEADROOM, rel=0.06)


async def test_a_small_reported_capacity_is_no_burst() -> None:
    clock = FakeClock()
    lim = await probed(clock, 6000, 99)
    await admit(lim, 50)
    assert clock.now == pytest.approx(49 / (100 * HEADROOM), rel=0.01)


async def test_stats_report_rates_against_limits() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=600, tpm=100_000)
    for _ in range(10):
        reservation = await lim.acquire(100)
        lim.settle(reservation, 50)
    clock.now = 1.0
    stats = lim.stats()
    assert stats.rpm_limit == 600 and stats.tpm_limit == 100_000
    assert stats.requests_per_min == pytest.approx(600, rel=0.01)
    assert stats.tokens_per_min == pytest.approx(30_000, rel=0.01)


async def test_nothing_remaining_holds_everyone_until_some_is_back() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=60)
    clock.now = 1.0
    # all of it back in 2.5 s; one request's worth of a 60-a-minute limit, in 1 s
    lim.observe({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
                 "x-ratelimit-reset-requests": "2.5s"})
    await lim.acquire(1)
    assert clock.now == pytest.approx(2.0)
    lim.observe({"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0",
                 "x-ratelimit-reset-requests": "300ms"})
    start = clock.now
    await lim.acquire(1)
    assert clock.now - start == pytest.approx(1.0 / HEADROOM, rel=0.01)  # the pace's turn
    assert lim.rate_limited == 0


async def test_a_near_miss_429_counts_the_second_longer_and_keeps_the_pace() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=300_000)  # 5,000 tokens a second: 16 requests of 300, not 17
    for _ in range(160):
        await lim.acquire(300)
    lim.on_rate_limited(0.002)  # the server's second, not ours, held a 17th: by 2 ms
    times = []
    for _ in range(160):
        await lim.acquire(300)
        times.append(clock.now)
    assert min(b - a for a, b in zip(times, times[16:], strict=False)) >= 1.002 - 1e-9
    assert 159 / (times[-1] - times[0]) >= 16 / 1.002 * 0.99  # not cut below the limit


async def test_a_429_whose_window_frees_within_a_tenth_of_a_second_pauses_but_keeps_the_pace(
        ) -> None:
    # a sliding window's edge, 60 ms over: waited out, not cut (a cut takes seconds to undo)
    clock = FakeClock()
    lim = limiter(clock, tpm=300_000)  # 16 requests of 300 tokens a second

    async def sixteen_after(wait_s: float) -> tuple[float, float]:
        """(when the first went after the 429, how long the first 17 took)."""
        await admit(lim, 160, 300)
        lim.on_rate_limited(wait_s)
        start = clock.now
        times = []
        for _ in range(17):
            await lim.acquire(300)
            times.append(clock.now)
        return times[0] - start, times[16] - times[0]

    first, second = await sixteen_after(0.06)
    assert 0.06 - 1e-9 <= first <= 0.1 and second <= 1.0 + 1e-6  # paused; the pace it had
    clock.now += 60
    first, second = await sixteen_after(0.5)  # frees later: the rate's fault, cut
    assert first >= 0.5 - 1e-9 and second > 1.1


async def test_a_lower_configured_limit_is_kept_whatever_capacity_the_server_reports() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=120)
    probe = await lim.acquire(1)
    # the server's own limit is far higher, and nearly all of it is left: rpm 120 still binds
    lim.observe({"x-ratelimit-limit-requests": "600000",
                 "x-ratelimit-remaining-requests": "9999",
                 "x-ratelimit-reset-requests": "1ms"}, reservation=probe)
    await admit(lim, 10)
    assert clock.now == pytest.approx(10 / (2 * HEADROOM), rel=0.05)


async def test_a_learned_token_limit_far_above_the_pace_does_not_bind() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    probe = await lim.acquire(0)
    lim.observe({"x-ratelimit-limit-tokens": "150000000"}, reservation=probe)
    for _ in range(100):
        await lim.acquire(30)
        clock.now += 0.01
    assert not lim.tokens_bind()


async def test_a_learned_token_limit_binds_once_the_run_nears_it() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    probe = await lim.acquire(0)
    lim.observe({"x-ratelimit-limit-tokens": "300000"}, reservation=probe)  # 5,000 a second
    assert not lim.tokens_bind()
    for _ in range(20):
        await lim.acquire(300)
    clock.now += 1
    assert lim.tokens_bind()
    clock.now += 60  # once it binds, prompts are counted exactly for the rest of the run
    assert lim.tokens_bind()


async def test_a_configured_token_limit_binds_from_the_start() -> None:
    assert limiter(FakeClock(), tpm=1_000_000_000).tokens_bind()
