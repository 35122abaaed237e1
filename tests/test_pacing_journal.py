"""Rate limiter and the paid-answer journal (captioning groundwork)."""

import threading

import pytest

from groundset.core.journal import Journal
from groundset.core.pacing import RateLimiter, backoff_delay


class FakeClock:
    """A clock that only moves when someone sleeps."""

    def __init__(self):
        self.now = 100.0
        self.lock = threading.Lock()

    def __call__(self):
        return self.now

    def sleep(self, seconds):
        with self.lock:
            self.now += seconds


def test_starts_are_spaced_by_the_rate():
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock, clock.sleep)
    starts = [limiter.acquire() for _ in range(5)]
    assert starts == [100.0, 100.5, 101.0, 101.5, 102.0]


def test_any_window_holds_at_most_rate_times_window_plus_one_under_threads():
    limiter = RateLimiter(20.0)
    starts = []
    lock = threading.Lock()

    def worker():
        for _ in range(5):
            t = limiter.acquire()
            with lock:
                starts.append(t)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    starts.sort()
    assert len(starts) == 40
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.05 - 1e-9  # slots, not sleeps: exact spacing
    for i, t in enumerate(starts):  # sliding 1-second windows
        assert sum(1 for u in starts[i:] if u < t + 1.0) <= 21


def test_unlimited_and_invalid_rates():
    clock = FakeClock()
    limiter = RateLimiter(None, clock, clock.sleep)
    assert [limiter.acquire() for _ in range(3)] == [100.0, 100.0, 100.0]
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_penalize_pushes_later_slots_back():
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock, clock.sleep)
    limiter.acquire()
    limiter.penalize(5.0)
    assert limiter.acquire() == 105.0


def test_backoff_is_bounded_and_jittered():
    assert backoff_delay(1, base=1.0, jitter=lambda: 1.0) == 1.0
    assert backoff_delay(4, base=1.0, jitter=lambda: 0.5) == 4.0
    assert backoff_delay(20, base=1.0, cap=30.0, jitter=lambda: 1.0) == 30.0
    assert 0.0 <= backoff_delay(3) <= 4.0


def test_journal_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "chunk_0.journal.jsonl"
    with Journal(path) as journal:
        journal.append([{"key": "1", "raw": "a"}, {"key": "2", "raw": "b"}])
        assert "1" in journal and journal.done("2")["raw"] == "b"
    with open(path, "a") as handle:
        handle.write('{"key": "3", "raw": "cut sh')  # killed mid-write
    journal = Journal(path)
    assert sorted(journal.entries) == ["1", "2"] and journal.torn_lines == 1
    journal.append([{"key": "3", "raw": "c"}, {"key": "1", "raw": "a2"}])
    journal.close()
    again = Journal(path)
    assert {k: v["raw"] for k, v in again.entries.items()} == {"1": "a2", "2": "b", "3": "c"}
    assert again.torn_lines == 1


def test_journal_append_is_durable_before_returning(tmp_path):
    path = tmp_path / "j.jsonl"
    journal = Journal(path)
    journal.append([{"key": 7, "raw": "x"}])
    # another reader (a rerun after a kill) sees the entry without close()
    assert "7" in Journal(path)
    journal.close()
