"""Request pacing for paid APIs: a thread-safe limiter that never exceeds a rate over any window."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Stopped(RuntimeError):
    """The job is stopping: no new request may start (those on the wire still land)."""


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart (so any window of T seconds holds at
    most rate*T + 1 starts); `rate=None` means unlimited. Threads wait for their own slot."""

    def __init__(
        self,
        rate: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be positive or None, got {rate}")
        self.interval = 0.0 if rate is None else 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = float("-inf")
        self._stopped = threading.Event()

    @property
    def stopped(self) -> bool:
        """Whether stop() was called."""
        return self._stopped.is_set()

    def stop(self) -> None:
        """Refuse every slot from now on, waking the threads that wait for one (SIGTERM, Ctrl-C)."""
        self._stopped.set()

    def acquire(self) -> float:
        """Wait for the next free slot; return the time the caller may start. Raises Stopped
        once stop() was called, also while waiting, so no new request goes out."""
        if self.stopped:
            raise Stopped("the job is stopping: no new request")
        if not self.interval:
            return self._clock()
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            if self._sleep is time.sleep:
                self._stopped.wait(slot - now)
            else:
                self._sleep(slot - now)
        if self.stopped:
            raise Stopped("the job is stopping: no new request")
        return slot

    def penalize(self, seconds: float) -> None:
        """Push every later slot back (after a 429/Throttling answer, all threads back off)."""
        with self._lock:
            self._next = max(self._next, self._clock() + seconds)


def backoff_delay(
    attempt: int, base: float = 1.0, cap: float = 60.0, jitter: Callable[[], float] | None = None
) -> float:
    """Exponential back-off with full jitter for retry `attempt` (1-based): uniform in [0, min(cap, base*2^(a-1))]."""
    import random

    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return ceiling * (jitter() if jitter else random.random())
