"""Pacing of protection: a byte rate and a CPU share, so that the agent leaves the node to training.

The agent shares a node's cores and network with the trainer ranks. Each limit is a bucket
that fills at its rate up to a burst and that a charge may overdraw: protection runs each
step at full speed, then rests until every debt is paid before it picks the next step. So
the slot being sent stays pinned only as long as the sending takes, the step picked after
the rest is the newest one (steps in between are skipped, never queued), and the averages
stay within the limits. Pure logic: the caller passes the monotonic time (`now`) and the
CPU seconds the agent process has used (`cpu_s`); `Throttle` gets both from clocks it is given.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from memckpt.errors import ConfigError

DEFAULT_BURST_S = 5.0  # a limit's idle credit: what the agent may do at once after this long at rest
MAX_REST_S = 1.0  # a rest is taken in slices of at most this, so that a stop is heard at once
MIN_REST_S = 0.1  # ...and of at least this: each look costs CPU the rest itself is charged for


@dataclass(frozen=True, slots=True, kw_only=True)
class PaceLimits:
    """Averages protection must stay under; 0 turns a limit off."""

    rate_bytes_per_s: float = 0.0  # fragment bytes this agent sends per second
    cpu_cores: float = 0.0  # CPU seconds the agent process uses per second, all its threads together
    burst_s: float = DEFAULT_BURST_S

    def __post_init__(self) -> None:
        for name in ("rate_bytes_per_s", "cpu_cores"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0 (0: no limit), got {value}")
        if not math.isfinite(self.burst_s) or self.burst_s <= 0:
            raise ConfigError(f"burst_s must be a finite number > 0, got {self.burst_s}")

    @property
    def is_limited(self) -> bool:
        return self.rate_bytes_per_s > 0 or self.cpu_cores > 0


class DebtBucket:
    """Credit that grows by `rate_per_s` each second up to `rate_per_s * burst_s`; a charge is
    never refused and may leave a debt, and `delay_s` says how long until it is paid."""

    def __init__(self, *, rate_per_s: float, burst_s: float, now: float) -> None:
        if rate_per_s <= 0 or burst_s <= 0:
            raise ValueError(f"a bucket needs a positive rate and burst, got {rate_per_s} and {burst_s}")
        self._rate_per_s = rate_per_s
        self._cap = rate_per_s * burst_s
        self._balance = self._cap  # starts full: the first step is protected at once
        self._at = now

    @property
    def balance(self) -> float:
        return self._balance

    def charge(self, amount: float, now: float) -> None:
        self._refill(now)
        self._balance -= amount

    def delay_s(self, now: float) -> float:
        self._refill(now)
        return 0.0 if self._balance >= 0 else -self._balance / self._rate_per_s

    def _refill(self, now: float) -> None:
        if now > self._at:  # a clock that stands or goes back adds nothing
            self._balance = min(self._cap, self._balance + (now - self._at) * self._rate_per_s)
            self._at = now


class Pacer:
    """Both limits of `PaceLimits` over one agent: bytes sent, and the process's CPU time."""

    def __init__(self, limits: PaceLimits, *, now: float, cpu_s: float) -> None:
        self.limits = limits
        self._bytes = (
            DebtBucket(rate_per_s=limits.rate_bytes_per_s, burst_s=limits.burst_s, now=now) if limits.rate_bytes_per_s else None
        )
        self._cpu = DebtBucket(rate_per_s=limits.cpu_cores, burst_s=limits.burst_s, now=now) if limits.cpu_cores else None
        self._cpu_seen_s = cpu_s

    def sent(self, size_bytes: int, now: float) -> None:
        """Charges `size_bytes` sent to peers."""
        if self._bytes is not None:
            self._bytes.charge(size_bytes, now)

    def delay_s(self, now: float, cpu_s: float) -> float:
        """Seconds to rest before the next step is protected: until the bytes sent and the CPU
        used so far (`cpu_s`, the process total; whatever the agent did since the last call is
        charged, receiving peers' fragments included) are paid off. 0: go on now."""
        delay = 0.0
        if self._cpu is not None:
            self._cpu.charge(max(0.0, cpu_s - self._cpu_seen_s), now)
            delay = self._cpu.delay_s(now)
        self._cpu_seen_s = max(self._cpu_seen_s, cpu_s)
        if self._bytes is not None:
            delay = max(delay, self._bytes.delay_s(now))
        return delay


class Throttle:
    """The replicator's side of a `Pacer`, on real clocks: `sent` after each fragment, `rest`
    before picking the next step. Used by one thread."""

    def __init__(self, limits: PaceLimits, *, clock: Callable[[], float], cpu_clock: Callable[[], float]) -> None:
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._pacer = Pacer(limits, now=clock(), cpu_s=cpu_clock())
        self.rested_s = 0.0  # in all, for logs and tests

    @property
    def limits(self) -> PaceLimits:
        return self._pacer.limits

    def sent(self, size_bytes: int) -> None:
        self._pacer.sent(size_bytes, self._clock())

    def rest(self, stop: threading.Event) -> bool:
        """Waits until the limits allow more work, or `stop` is set; returns whether it waited."""
        waited = False
        while not stop.is_set():
            delay_s = self._pacer.delay_s(self._clock(), self._cpu_clock())
            if delay_s <= 0:
                break
            # The CPU used meanwhile (peers' fragments, and this look) is charged on the next look. Slices
            # as short as a small debt asks would cost more CPU than they wait out: with an agent near its
            # limit on its other work alone, the rest would never end and protection would stand still.
            slice_s = min(max(delay_s, MIN_REST_S), MAX_REST_S)
            stop.wait(slice_s)
            self.rested_s += slice_s
            waited = True
        return waited
