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
            if limiter.stopped:  # the SDK wrapped the transport's Stopped (or a late failure)
                raise Stopped(f"{key}: not asked, the job is stopping") from None
            gone = settings.server_gone() if settings.server_gone else None
            if gone:  # the job's own server died: no retry can succeed; the rerun goes on
                raise CaptionError(gone) from None
            if err.kind == "auth":
                raise CaptionError(
                    f"the endpoint refused the API key ({err}); check ${settings.api_key_env}"
                ) from None
            failure = {"key": key, "status": "error", "reason": str(err), "http_status": err.status,
                       "code": err.code, "attempts": attempts, "max_pixels": settings.max_pixels,
                       "question": question_id(settings), "url": url}  # fmt: skip
            if err.kind == "final":
                outcome.entry = failure
                return outcome
            if attempts >= settings.max_attempts:
                outcome.gave_up = {**failure, "reason": f"gave up after {attempts} attempts: {err}"}
                return outcome
            delay = backoff_delay(attempts, settings.backoff_base_s, settings.backoff_cap_s)
            outcome.retries += 1
            if err.kind == "throttled":
                outcome.throttled += 1
                limiter.penalize(delay)
            log.info("%s: %s; retry %d in %.1f s", key, err, attempts, delay)
            sleep(delay)
            continue
        outcome.entry = {
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


def request_pending(
    records: Iterable[dict], settings: Settings, journal: Journal, retry_errors: bool,
    counts: Counter, dropped: dict, gave_up: dict,
    connect: Callable[[], Settings] | None = None,
) -> None:  # fmt: skip
    """Request every record that the journal lacks, journaling answers as they land.

    `connect` opens the endpoint (a server of the job's own, the stand-in, a key) and returns
    the settings to ask with; it is called when the first image that can be sent is ready, so a
    chunk whose images are all journaled or unreadable starts no server."""
    limiter = RateLimiter(settings.paced_rate)
    backend = None if connect else make_backend(settings, limiter)
    # `concurrency` requests on the wire, and a few more threads making the next payloads
    # (decode, shrink, encode) meanwhile, so that no request slot waits for one
    concurrency = max(1, settings.concurrency)
    on_the_wire = threading.BoundedSemaphore(concurrency)
    threads = concurrency + PAYLOAD_THREADS
    window = threads * 2
    consecutive = 0
    question = question_id(settings)
    in_flight: dict[cf.Future, str] = {}
    journal_lock = threading.Lock()

    def keep(entry: dict) -> None:
        """Journal one answer (flushed and fsynced) in its request thread, slot still held."""
        with journal_lock:
            journal.append([entry])

    def collect(done) -> None:
        nonlocal consecutive
        for future in done:
            key = in_flight.pop(future)
            outcome = future.result()  # CaptionError (auth) propagates: stop the job
            if outcome.dropped is not None:
                dropped[key] = outcome.dropped
                continue
            counts["requested"] += 1
            counts["retries"] += outcome.retries
            counts["throttled"] += outcome.throttled
            if outcome.entry is not None:  # journaled by its thread already
                counts["attempts"] += outcome.entry["attempts"]
                consecutive = 0 if outcome.entry["status"] == "answered" else consecutive
            else:
                gave_up[key] = outcome.gave_up
                counts["attempts"] += outcome.gave_up["attempts"]
                consecutive += 1
        if consecutive >= settings.max_consecutive_failures:
            raise CaptionError(
                f"{consecutive} images in a row failed after retries (last: "
                f"{gave_up[key]['reason']}); the endpoint looks down. Answers so far are "
                f"journaled in {journal.path}; rerun to continue"
            )

    with (
        cf.ThreadPoolExecutor(threads, thread_name_prefix="caption") as pool,
        tqdm(desc="caption", unit="img", mininterval=5) as bar,
    ):
        try:
            for record in records:
                key = record_key(record)
                if not _needs_request(
                    journaled_answer(journal, record, question, settings.max_pixels),
                    retry_errors,
                    question,
                    settings.expects_json,
                ):
                    counts["from_journal"] += 1
                    continue
                payload = None
                if backend is None:  # the first image to send: make sure it can be, then connect
                    try:
                        payload = record_payload(record, settings.max_pixels)
                    except Dropped as drop:
                        dropped[key] = _dropped(drop)
                        continue
                    settings = connect()
                    backend = make_backend(settings, limiter)
                while len(in_flight) >= window:
                    done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                    collect(done)
                    bar.update(len(done))
                future = pool.submit(
                    ask_record, backend, limiter, settings, record, on_the_wire, payload, keep
                )
                in_flight[future] = key
            while in_flight:
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                collect(done)
                bar.update(len(done))
        except BaseException:
            # keep what was paid for: no new request starts (threads waiting for a slot give
            # up), the ones on the wire land and their threads journal them, then stop
            limiter.stop()
            for future in in_flight:
                future.cancel()
            running = [f for f in in_flight if not f.cancelled()]
            cf.wait(running, timeout=settings.timeout_s)
            raise
