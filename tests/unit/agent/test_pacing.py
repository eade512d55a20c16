"""Pacing of protection: the buckets' arithmetic, the pacer's two limits, and the throttle's rests, on fake clocks."""

from __future__ import annotations

import threading

import pytest

from memckpt.agent.pacing import MAX_REST_S, MIN_REST_S, DebtBucket, PaceLimits, Pacer, Throttle
from memckpt.errors import ConfigError

MiB = 1 << 20


def test_bucket_starts_full_lets_a_charge_overdraw_and_says_when_the_debt_is_paid() -> None:
    bucket = DebtBucket(rate_per_s=100.0, burst_s=2.0, now=0.0)
    assert bucket.delay_s(0.0) == 0.0  # 200 of credit at the start
    bucket.charge(500.0, now=0.0)  # never refused: the step goes out at full speed
    assert bucket.balance == pytest.approx(-300.0)
    assert bucket.delay_s(0.0) == pytest.approx(3.0)
    assert bucket.delay_s(1.0) == pytest.approx(2.0)
    assert bucket.delay_s(3.0) == 0.0


def test_bucket_credit_is_capped_at_the_burst() -> None:
    bucket = DebtBucket(rate_per_s=10.0, burst_s=1.0, now=0.0)
    bucket.charge(10.0, now=0.0)
    bucket.charge(0.0, now=1000.0)  # a long rest earns one burst, not 10000
    assert bucket.balance == pytest.approx(10.0)
    bucket.charge(25.0, now=1000.0)
    assert bucket.delay_s(1000.0) == pytest.approx(1.5)


def test_bucket_ignores_a_clock_that_goes_back() -> None:
    bucket = DebtBucket(rate_per_s=10.0, burst_s=1.0, now=5.0)
    bucket.charge(20.0, now=5.0)
    assert bucket.delay_s(4.0) == pytest.approx(1.0)  # no credit taken away, none added
    assert bucket.delay_s(6.0) == 0.0


def test_bucket_refuses_a_rate_or_burst_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="positive rate"):
        DebtBucket(rate_per_s=0.0, burst_s=1.0, now=0.0)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"rate_bytes_per_s": -1.0}, "rate_bytes_per_s"),
        ({"cpu_cores": float("nan")}, "cpu_cores"),
        ({"cpu_cores": float("inf")}, "cpu_cores"),
        ({"burst_s": 0.0}, "burst_s"),
    ],
)
def test_limits_refuse_bad_values_naming_them(limits: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PaceLimits(**limits)


def test_no_limits_never_delay() -> None:
    limits = PaceLimits()
    pacer = Pacer(limits, now=0.0, cpu_s=0.0)
    pacer.sent(10**12, now=0.0)
    assert not limits.is_limited
    assert pacer.delay_s(now=0.0, cpu_s=1e6) == 0.0


def test_rate_limit_delays_by_the_bytes_sent_beyond_the_burst() -> None:
    pacer = Pacer(PaceLimits(rate_bytes_per_s=100 * MiB, burst_s=1.0), now=0.0, cpu_s=0.0)
    pacer.sent(300 * MiB, now=0.0)  # three fragments of one step
    assert pacer.delay_s(now=0.0, cpu_s=0.0) == pytest.approx(2.0)
    assert pacer.delay_s(now=2.0, cpu_s=0.0) == 0.0


def test_cpu_limit_charges_the_process_cpu_used_since_the_last_look() -> None:
    pacer = Pacer(PaceLimits(cpu_cores=0.25, burst_s=4.0), now=0.0, cpu_s=50.0)  # 1 CPU-s of credit; earlier CPU is not charged
    assert pacer.delay_s(now=0.0, cpu_s=50.0) == 0.0
    # 2.25 used against 1 of credit (full already: the second of waiting earned nothing), 1.25 in debt at 0.25/s
    assert pacer.delay_s(now=1.0, cpu_s=52.25) == pytest.approx(5.0)
    assert pacer.delay_s(now=6.0, cpu_s=52.25) == 0.0  # the same CPU time is never charged twice
    assert pacer.delay_s(now=6.0, cpu_s=52.0) == 0.0  # nor does a smaller reading give any back


def test_the_longer_of_both_delays_wins() -> None:
    pacer = Pacer(PaceLimits(rate_bytes_per_s=1000.0, cpu_cores=1.0, burst_s=1.0), now=0.0, cpu_s=0.0)
    pacer.sent(3000, now=0.0)  # 2 s of debt
    assert pacer.delay_s(now=0.0, cpu_s=6.0) == pytest.approx(5.0)  # 5 s of CPU debt
    assert pacer.delay_s(now=5.0, cpu_s=6.0) == 0.0


def test_a_pace_of_one_step_per_period_holds_on_average() -> None:
    """Each step costs 2 CPU-s and 150 MiB; within 0.5 cores and 100 MiB/s one step every 4 s fits."""
    pacer = Pacer(PaceLimits(rate_bytes_per_s=100 * MiB, cpu_cores=0.5, burst_s=1.0), now=0.0, cpu_s=0.0)
    now = cpu_s = 0.0
    started = []
    for _ in range(50):
        now += pacer.delay_s(now, cpu_s)
        started.append(now)
        cpu_s += 2.0
        now += 0.5  # the burst itself
        pacer.sent(150 * MiB, now)
    period_s = (started[-1] - started[0]) / (len(started) - 1)
    assert period_s == pytest.approx(4.0, rel=0.02)


class FakeClocks:
    """Wall and CPU time that advance only when the throttle rests (and by what the test says the agent used)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.cpu_s = 7.0
        self.cpu_per_rest_s = 0.0  # CPU the agent burns meanwhile per second rested (receiving peers' fragments)
        self.cpu_per_look_s = 0.0  # CPU each look of the rest costs (a wake-up of its thread)
        self.rests: list[float] = []


class FakeStop(threading.Event):
    """A stop event whose wait advances the fake clocks instead of blocking."""

    def __init__(self, clocks: FakeClocks, stop_after: int | None = None) -> None:
        super().__init__()
        self._clocks = clocks
        self._stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None and timeout > 0
        self._clocks.rests.append(timeout)
        self._clocks.now += timeout
        self._clocks.cpu_s += timeout * self._clocks.cpu_per_rest_s + self._clocks.cpu_per_look_s
        if self._stop_after is not None and len(self._clocks.rests) >= self._stop_after:
            self.set()
        return self.is_set()


def make_throttle(clocks: FakeClocks, limits: PaceLimits) -> Throttle:
    return Throttle(limits, clock=lambda: clocks.now, cpu_clock=lambda: clocks.cpu_s)


def test_throttle_does_not_rest_while_within_the_limits() -> None:
    clocks = FakeClocks()
    throttle = make_throttle(clocks, PaceLimits(rate_bytes_per_s=100.0, burst_s=1.0))
    throttle.sent(50)
    assert throttle.rest(FakeStop(clocks)) is False
    assert clocks.rests == []


def test_throttle_rests_off_the_debt_in_slices() -> None:
    clocks = FakeClocks()
    throttle = make_throttle(clocks, PaceLimits(rate_bytes_per_s=100.0, burst_s=1.0))
    throttle.sent(350)  # 2.5 s of debt
    assert throttle.rest(FakeStop(clocks)) is True
    assert clocks.rests == [MAX_REST_S, MAX_REST_S, pytest.approx(0.5)]
    assert throttle.rested_s == pytest.approx(2.5)


def test_throttle_charges_cpu_used_while_resting() -> None:
    clocks = FakeClocks()
    throttle = make_throttle(clocks, PaceLimits(cpu_cores=0.5, burst_s=1.0))
    clocks.cpu_s += 1.5  # the step: 1 CPU-s of debt beyond the 0.5 of credit, 2 s at 0.5 cores
    clocks.cpu_per_rest_s = 0.25  # peers' fragments arrive meanwhile: it pays off at 0.25 CPU-s per second only
    assert throttle.rest(FakeStop(clocks)) is True
    assert clocks.now - 100.0 == pytest.approx(4.0, abs=MIN_REST_S)


def test_a_rest_ends_when_the_agent_idles_near_its_limit_and_each_look_costs_cpu() -> None:
    clocks = FakeClocks()
    throttle = make_throttle(clocks, PaceLimits(cpu_cores=0.04, burst_s=5.0))
    clocks.cpu_s += 0.4  # a protection: 0.2 CPU-s of debt beyond the 0.2 of credit
    clocks.cpu_per_rest_s = 0.016  # heartbeats, RPCs, checksums: 40 % of the limit
    clocks.cpu_per_look_s = 0.0005  # a wake-up of the resting thread
    stop = FakeStop(clocks, stop_after=1000)  # a rest in slices as short as the debt asks never ends here
    assert throttle.rest(stop) is True
    assert not stop.is_set(), f"still resting after {len(clocks.rests)} looks"
    assert min(clocks.rests) >= MIN_REST_S
    assert clocks.now - 100.0 == pytest.approx(0.2 / (0.04 - 0.016), rel=0.3), "the debt paid at the limit's spare rate"


def test_throttle_stops_resting_when_told_to_stop() -> None:
    clocks = FakeClocks()
    throttle = make_throttle(clocks, PaceLimits(rate_bytes_per_s=1.0, burst_s=1.0))
    throttle.sent(10**6)  # days of debt
    assert throttle.rest(FakeStop(clocks, stop_after=2)) is True
    assert len(clocks.rests) == 2
