"""Asking about images: one image with retries and back-off, a chunk's pending images in flight.

Requests are paced by a rate limiter shared by the job's threads, retried with jittered back-off
on 429/5xx/timeouts, and every answer is journaled (fsynced) as it lands, also when the job is
stopped, so nothing is paid for twice.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from groundset.core.journal import Journal
from groundset.core.pacing import RateLimiter, Stopped, backoff_delay
from groundset.core.records import record_key, same_image
from groundset.stages.caption.backends import (
    ApiError,
    Dropped,
    Payload,
    _sent,
    fits_budget,
    make_backend,
    record_payload,
)
from groundset.stages.caption.errors import CaptionError
from groundset.stages.caption.grounding import parse_answer
from groundset.stages.caption.settings import Settings, question_id

log = logging.getLogger(__name__)

PAYLOAD_THREADS = min(8, os.cpu_count() or 1)  # beyond `concurrency`: making the next payloads


@dataclass
class Outcome:
    """What requesting one image came to: a journal entry (paid answer / final error) or a give-up."""

    entry: dict | None = None
    gave_up: dict | None = None
    dropped: dict | None = None  # the image could not be sent (no request)
    retries: int = 0
    throttled: int = 0


def _stop_if_fatal(err: ApiError, limiter: RateLimiter, settings: Settings, key: str) -> None:
    """Raise when a failed request ends the job: it is stopping, its server died, the key failed."""
    if limiter.stopped:  # the SDK wrapped the transport's Stopped (or a late failure)
        raise Stopped(f"{key}: not asked, the job is stopping") from None
    gone = settings.server_gone() if settings.server_gone else None
    if gone:  # the job's own server died: no retry can succeed; the rerun goes on
        raise CaptionError(gone) from None
    if err.kind == "auth":
        raise CaptionError(
            f"the endpoint refused the API key ({err}); check ${settings.api_key_env}"
        ) from None


def _failed(err: ApiError, settings: Settings, key: str, attempts: int, url: str | None) -> dict:
    """The journal entry of a failed request."""
    return {"key": key, "status": "error", "reason": str(err), "http_status": err.status,
            "code": err.code, "attempts": attempts, "max_pixels": settings.max_pixels,
            "question": question_id(settings), "url": url}  # fmt: skip


def _answered(
    answer, payload: Payload, settings: Settings, key: str, attempts: int, url: str | None,
    started: float,
) -> dict:  # fmt: skip
    """The journal entry of an answer (`started`: the wall clock when its request was made)."""
    return {
        "key": key,
        "url": url,
        "status": "answered",
        "answer": answer.text,
        "request_id": answer.request_id,
        "attempts": attempts,
        "width": payload.width,  # as sent: the frame of pixel boxes
        "height": payload.height,
        "source_size": list(payload.source),
        "max_pixels": settings.max_pixels,
        "stand_in": settings.stand_in is True,  # a PLACEHOLDER answer (stays one when reused)
        "model": settings.model,
        "backend": settings.backend,
        "question": question_id(settings),
        "sent_at": round(_sent.at, 4) if _sent.at else None,
        "seconds": round(time.time() - started, 3),
    }


def _back_off(
    err: ApiError, attempts: int, outcome: Outcome, limiter: RateLimiter, settings: Settings,
    key: str, sleep,
) -> None:  # fmt: skip
    """Wait before the next attempt (jittered, the limiter held back too when throttled)."""
    delay = backoff_delay(attempts, settings.backoff_base_s, settings.backoff_cap_s)
    outcome.retries += 1
    if err.kind == "throttled":
        outcome.throttled += 1
        limiter.penalize(delay)
    log.info("%s: %s; retry %d in %.1f s", key, err, attempts, delay)
    sleep(delay)


def request_image(
    backend, limiter: RateLimiter, settings: Settings, key: str, payload: Payload,
    sleep=time.sleep, url: str | None = None,
) -> Outcome:  # fmt: skip
    """Ask about one image, retrying throttling and transient errors with jittered back-off
    (`url`: the image's, journaled with the answer: see records.same_image)."""
    outcome = Outcome()
    attempts = 0
    while True:
        if limiter.stopped:  # the job is stopping: what never went out is asked on the rerun
            raise Stopped(f"{key}: not asked, the job is stopping")
        attempts += 1  # the request waits for its slot in the backend's transport
        started = time.time()
        _sent.at = None
        try:
            answer = backend.ask(payload, settings.prompt_text)
        except ApiError as err:
            _stop_if_fatal(err, limiter, settings, key)
            failure = _failed(err, settings, key, attempts, url)
            if err.kind == "final":
                outcome.entry = failure
                return outcome
            if attempts >= settings.max_attempts:
                outcome.gave_up = {**failure, "reason": f"gave up after {attempts} attempts: {err}"}
                return outcome
            _back_off(err, attempts, outcome, limiter, settings, key, sleep)
            continue
        outcome.entry = _answered(answer, payload, settings, key, attempts, url, started)
        return outcome


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (Snakemake, SLURM's scancel) into SystemExit so in-flight answers get journaled."""
    import signal

    def handler(signum, frame):
        raise SystemExit(f"stopped by signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def journaled_answer(
    journal: Journal, record: dict, question: str, max_pixels: int | None
) -> dict | None:
    """The journal's newest answer to `question` about this record's image as `max_pixels`
    sends it, among all it holds (one journaled for another image under the same id, or about
    the image sent at another size, does not count)."""
    for entry in journal.all_for(record_key(record), question):
        if same_image(entry, record) and fits_budget(entry, max_pixels):
            return entry
    return None


def ask_record(
    backend,
    limiter: RateLimiter,
    settings: Settings,
    record: dict,
    on_the_wire: threading.Semaphore,
    payload: Payload | None = None,
    keep: Callable[[dict], None] | None = None,
) -> Outcome:
    """Make a record's payload within the pixel budget (unless given), then ask about it once
    one of the job's `concurrency` request slots is free (payloads are made while other
    requests are out). `keep` journals the answer before the slot frees, so a killed job has
    at most `concurrency` paid answers it did not journal."""
    key = record_key(record)
    if payload is None:
        try:
            payload = record_payload(record, settings.max_pixels)
        except Dropped as drop:
            return Outcome(dropped=_dropped(drop))
    with on_the_wire:
        outcome = request_image(backend, limiter, settings, key, payload, url=record.get("url"))
        if keep is not None and outcome.entry is not None:
            keep(outcome.entry)
        return outcome


def _dropped(drop: Dropped) -> dict:
    """The error record of an image that is not sent."""
    return {"status": "dropped", "reason": drop.reason, "detail": drop.detail}


def _needs_request(
    entry: dict | None, retry_errors: bool, question: str, expect_json: bool = False
) -> bool:
    """Whether a journaled (or absent) entry calls for a request."""
    if entry is None or entry.get("question") != question:
        return True
    if not retry_errors:
        return False
    if entry["status"] == "error":
        return True
    return (
        parse_answer(entry.get("answer", ""), "normalized", expect_json=expect_json).error
        is not None
    )


class _Pending:
    """A chunk's requests in flight (request_pending's state): the limiter, the request slots,
    the futures and what they came to."""

    def __init__(
        self, settings: Settings, journal: Journal, counts: Counter, dropped: dict,
        gave_up: dict, connect: Callable[[], Settings] | None,
    ) -> None:  # fmt: skip
        self.settings, self.journal, self.connect = settings, journal, connect
        self.counts, self.dropped, self.gave_up = counts, dropped, gave_up
        self.limiter = RateLimiter(settings.paced_rate)
        self.backend = None if connect else make_backend(settings, self.limiter)
        # `concurrency` requests on the wire, and a few more threads making the next payloads
        # (decode, shrink, encode) meanwhile, so that no request slot waits for one
        concurrency = max(1, settings.concurrency)
        self.on_the_wire = threading.BoundedSemaphore(concurrency)
        self.threads = concurrency + PAYLOAD_THREADS
        self.window = self.threads * 2
        self.consecutive = 0
        self.question = question_id(settings)
        self.in_flight: dict[cf.Future, str] = {}
        self.journal_lock = threading.Lock()

    def keep(self, entry: dict) -> None:
        """Journal one answer (flushed and fsynced) in its request thread, slot still held."""
        with self.journal_lock:
            self.journal.append([entry])

    def needs_asking(self, record: dict, retry_errors: bool) -> bool:
        """Whether the journal lacks a usable answer about the record's image."""
        settings = self.settings
        entry = journaled_answer(self.journal, record, self.question, settings.max_pixels)
        return _needs_request(entry, retry_errors, self.question, settings.expects_json)

    def first_payload(self, record: dict) -> Payload | None:
        """Before the first request: the record's payload, then the endpoint opened (`connect`);
        None (and no endpoint) when the image cannot be sent."""
        try:
            payload = record_payload(record, self.settings.max_pixels)
        except Dropped as drop:
            self.dropped[record_key(record)] = _dropped(drop)
            return None
        self.settings = self.connect()
        self.backend = make_backend(self.settings, self.limiter)
        return payload

    def submit(self, pool: cf.Executor, record: dict, payload: Payload | None) -> None:
        """Put one record's request in flight."""
        future = pool.submit(
            ask_record, self.backend, self.limiter, self.settings, record, self.on_the_wire,
            payload, self.keep,
        )  # fmt: skip
        self.in_flight[future] = record_key(record)

    def wait(self, bar, most: int) -> None:
        """Collect landed requests until at most `most` are in flight."""
        while len(self.in_flight) > most:
            done, _ = cf.wait(self.in_flight, return_when=cf.FIRST_COMPLETED)
            self.collect(done)
            bar.update(len(done))

    def collect(self, done) -> None:
        """Count what landed requests came to; stop the job when too many in a row failed."""
        last = None
        for future in done:
            key = self.in_flight.pop(future)
            outcome = future.result()  # CaptionError (auth) propagates: stop the job
            if outcome.dropped is not None:
                self.dropped[key] = outcome.dropped
                continue
            self.counts["requested"] += 1
            self.counts["retries"] += outcome.retries
            self.counts["throttled"] += outcome.throttled
            if outcome.entry is not None:  # journaled by its thread already
                self.counts["attempts"] += outcome.entry["attempts"]
                if outcome.entry["status"] == "answered":
                    self.consecutive = 0
            else:
                self.gave_up[key] = last = outcome.gave_up
                self.counts["attempts"] += outcome.gave_up["attempts"]
                self.consecutive += 1
        if self.consecutive >= self.settings.max_consecutive_failures:
            reason = (last or {}).get("reason", "an earlier batch")
            raise CaptionError(
                f"{self.consecutive} images in a row failed after retries (last: {reason}); the "
                f"endpoint looks down. Answers so far are journaled in {self.journal.path}; "
                "rerun to continue"
            )

    def stop(self) -> None:
        """Keep what was paid for: no new request starts (threads waiting for a slot give up),
        the ones on the wire land and their threads journal them."""
        self.limiter.stop()
        for future in self.in_flight:
            future.cancel()
        running = [f for f in self.in_flight if not f.cancelled()]
        cf.wait(running, timeout=self.settings.timeout_s)


def request_pending(
    records: Iterable[dict], settings: Settings, journal: Journal, retry_errors: bool,
    counts: Counter, dropped: dict, gave_up: dict,
    connect: Callable[[], Settings] | None = None,
) -> None:  # fmt: skip
    """Request every record that the journal lacks, journaling answers as they land.

    `connect` opens the endpoint (a server of the job's own, the stand-in, a key) and returns
    the settings to ask with; it is called when the first image that can be sent is ready, so a
    chunk whose images are all journaled or unreadable starts no server."""
    pending = _Pending(settings, journal, counts, dropped, gave_up, connect)
    with (
        cf.ThreadPoolExecutor(pending.threads, thread_name_prefix="caption") as pool,
        tqdm(desc="caption", unit="img", mininterval=5) as bar,
    ):
        try:
            for record in records:
                if not pending.needs_asking(record, retry_errors):
                    counts["from_journal"] += 1
                    continue
                payload = None
                if pending.backend is None:  # the first image to send: can it be? then connect
                    payload = pending.first_payload(record)
                    if payload is None:
                        continue
                pending.wait(bar, pending.window - 1)
                pending.submit(pool, record, payload)
            pending.wait(bar, 0)
        except BaseException:
            pending.stop()
            raise
