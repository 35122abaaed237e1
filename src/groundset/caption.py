"""Captioning stage: a grounded caption (caption + entities with boxes) per image from Qwen-VL.

Two backends: DashScope's SDK (`MultiModalConversation.call`) and any OpenAI-compatible
server (DashScope compatible mode, vLLM, SGLang). Requests are paced by a rate limiter shared
by the job's threads, retried with back-off on 429/5xx/timeouts, and every paid answer is
journaled (fsynced) before any output is written, so a killed job, rerun, pays for nothing
twice. Outputs are derived from the journal: captioned records, an error side file (with the
reason and the attempt count) and counts.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import contextlib
import io
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .grounding import parse_answer
from .io import atomic_write, concat_chunks, dumps_record, read_json, write_json
from .journal import Journal
from .pacing import RateLimiter, backoff_delay

log = logging.getLogger(__name__)

BACKENDS = ("dashscope", "openai")
DASHSCOPE_COMPATIBLE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
ANSWER_KEEP_CHARS = 4000  # of an unparsable answer, in the error record

PROMPTS = {
    # The seed's request (its script is not in the write-up; reconstructed from its records):
    # one caption plus high-confidence main entities with boxes, as JSON.
    "seed": (
        "Describe this image in one detailed English caption. Then list the main entities in "
        "the image that you can locate with high confidence; do not list parts of an entity "
        "that overlap it. Give each entity a bounding box [x1, y1, x2, y2]. Answer with JSON "
        'only, in this form: {"caption": "...", "entities": [{"entity": "...", '
        '"bboxes": [x1, y1, x2, y2]}]}'
    ),
    # Qwen2-VL's native grounding tokens inside a caption.
    "qwen2_tokens": (
        "Describe this image in one detailed English caption, and ground each main entity "
        "you mention with its bounding box."
    ),
}


class CaptionError(RuntimeError):
    """A problem that stops the captioning job (configuration, key, endpoint, auth)."""


class Dropped(Exception):
    """An image that is not sent (cannot be read or converted to RGB)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class ApiError(Exception):
    """A failed request, classified: throttled / transient (retried), final (recorded), auth (stops)."""

    def __init__(self, kind: str, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.kind, self.status, self.code = kind, status, code


@dataclass(frozen=True)
class Settings:
    """The `caption:` config section, with the job's share of the global rate."""

    backend: str = "dashscope"
    base_url: str | None = None
    model: str = "qwen-vl-max"
    api_key_env: str = "DASHSCOPE_API_KEY"
    rate_per_second: float | None = 2.0
    rate_headroom: float = 0.02
    concurrency: int = 8
    prompt: str | None = None
    prompt_preset: str = "seed"
    box_convention: str = "auto"
    max_attempts: int = 6
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    timeout_s: float = 120.0
    max_tokens: int = 1024
    max_consecutive_failures: int = 20
    stand_in: bool | str = False
    stand_in_latency_s: float = 0.0
    keep_ungrounded: bool = False
    api_key: str | None = field(default=None, repr=False)  # resolved at run time, never logged

    @classmethod
    def from_config(cls, section: dict, rate_share: int = 1) -> Settings:
        """Settings from the `caption:` config dict; the rate is divided among `rate_share` jobs."""
        known = {f for f in cls.__dataclass_fields__ if f != "api_key"}
        values = {k: v for k, v in section.items() if k in known}
        settings = cls(**values)
        if settings.backend not in BACKENDS:
            raise CaptionError(
                f"caption.backend must be one of {BACKENDS}, not {settings.backend!r}"
            )
        if settings.prompt is None and settings.prompt_preset not in PROMPTS:
            raise CaptionError(
                f"caption.prompt_preset {settings.prompt_preset!r} is not one of {sorted(PROMPTS)}"
            )
        if settings.rate_per_second is not None and rate_share > 1:
            settings = replace(settings, rate_per_second=settings.rate_per_second / rate_share)
        return settings

    @property
    def paced_rate(self) -> float | None:
        """Requests/s the job's limiter allows: its share of the quota less the jitter headroom."""
        if self.rate_per_second is None:
            return None
        return self.rate_per_second * (1.0 - self.rate_headroom)

    @property
    def prompt_text(self) -> str:
        """The prompt sent with every image."""
        return self.prompt if self.prompt else PROMPTS[self.prompt_preset]

    @property
    def expects_json(self) -> bool:
        """Whether the prompt asks for a JSON answer (then prose alone is unparseable, not a caption)."""
        if self.prompt:
            return "json" in self.prompt.lower()
        return self.prompt_preset == "seed"

    @property
    def convention(self) -> str:
        """Box coordinate convention: `auto` is pixels for Qwen2.5-VL, the 0-1000 grid otherwise."""
        if self.box_convention != "auto":
            return self.box_convention
        name = self.model.lower().replace("_", ".")
        return "pixels" if "qwen2.5" in name else "grid1000"

    @property
    def endpoint(self) -> str:
        """The base URL requests go to."""
        if self.base_url:
            return self.base_url.rstrip("/")
        if self.backend == "openai":
            return DASHSCOPE_COMPATIBLE_URL
        import dashscope

        return str(dashscope.base_http_api_url).rstrip("/")


def uses_stand_in(settings: Settings, environ: dict | None = None) -> bool:
    """Whether this run talks to the loopback stand-in (`stand_in: true`, or `auto` without a key)."""
    environ = os.environ if environ is None else environ
    if settings.stand_in == "auto":
        return not environ.get(settings.api_key_env) and not settings.base_url
    return bool(settings.stand_in)


def resolve_key(settings: Settings, environ: dict | None = None) -> Settings:
    """Settings with the API key from the environment (error naming the variable if unset)."""
    if settings.api_key:
        return settings
    environ = os.environ if environ is None else environ
    key = environ.get(settings.api_key_env, "").strip()
    if not key:
        raise CaptionError(
            f"the {settings.backend} backend needs an API key in ${settings.api_key_env} "
            f"(caption.api_key_env); it is not set. Export it, or use a self-hosted server "
            f"with any non-empty value"
        )
    return replace(settings, api_key=key)


def check_endpoint(settings: Settings, timeout: float = 10.0) -> None:
    """Fail with a clear error unless the endpoint answers HTTP (any status counts as reachable)."""
    url = settings.endpoint
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 (http(s) from config)
            pass
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise CaptionError(
            f"the {settings.backend} endpoint {url} cannot be reached: {reason} "
            f"(caption.base_url; is the server up and the address right?)"
        ) from err


def preflight(settings: Settings, environ: dict | None = None) -> dict:
    """Check key and endpoint before any chunk starts; returns what the check saw (no key)."""
    stand_in = uses_stand_in(settings, environ)
    if not stand_in:
        resolve_key(settings, environ)
        check_endpoint(settings)
    return {
        "backend": settings.backend,
        "model": settings.model,
        "endpoint": "loopback stand-in" if stand_in else settings.endpoint,
        "stand_in": stand_in,
        "rate_per_second": settings.rate_per_second,
        "convention": settings.convention,
    }


# --- images -------------------------------------------------------------------------------

SEND_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


@dataclass
class Payload:
    """An image ready to send: a data URL and the size of the image it encodes."""

    data_url: str
    width: int
    height: int


def image_path(record: dict) -> str:
    """The image file of a record (`image` is a list before masking, a string after)."""
    image = record.get("image")
    if isinstance(image, list):
        image = image[0] if image else None
    if not image:
        raise Dropped("no_image", "the record names no image")
    return str(image)


def load_payload(path: str) -> Payload:
    """Read an image and make its data URL; RGB JPEG/PNG/WebP go as is, other modes as RGB PNG.

    Raises Dropped when the file is missing or cannot be decoded and converted to RGB.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise Dropped("image_missing", f"{path}: {err.strerror or err}") from err
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
            fmt, mode = image.format, image.mode
    except Exception as err:  # PIL raises many types for broken files
        detail = "not a readable image" if "cannot identify" in str(err) else str(err)
        raise Dropped("rgb_conversion_failed", f"{path}: {type(err).__name__}: {detail}") from err
    if fmt in SEND_AS_IS and mode in ("RGB", "L"):
        mime = SEND_AS_IS[fmt]
    else:
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    encoded = base64.b64encode(data).decode("ascii")
    return Payload(f"data:{mime};base64,{encoded}", rgb.width, rgb.height)


# --- backends -----------------------------------------------------------------------------

_sent = threading.local()  # the wall-clock slot of this thread's last request


def _take_slot(limiter: RateLimiter) -> None:
    """Wait for the limiter's next slot; called by the HTTP transport right before it sends, so
    the spacing holds on the wire whatever the SDK does before (imports, encoding, retries)."""
    slot = limiter.acquire()
    _sent.at = time.time() - (time.monotonic() - slot)


@dataclass
class Answer:
    """A model's answer to one request."""

    text: str
    request_id: str | None = None


def classify(status: int | None, code: str | None, message: str) -> ApiError:
    """Map an HTTP status / API error code to the retry policy."""
    code_text = (code or "").lower()
    if status in (401, 403) or code_text in ("invalidapikey", "invalid_api_key"):
        return ApiError("auth", message, status, code)
    if status == 429 or code_text.startswith("throttling") or "rate_limit" in code_text:
        return ApiError("throttled", message, status, code)
    if status is None or status >= 500 or status == 408:
        return ApiError("transient", message, status, code)
    return ApiError("final", message, status, code)


class DashScopeBackend:
    """The DashScope SDK's `MultiModalConversation.call` (DashScope's native HTTP API)."""

    name = "dashscope"

    def __init__(self, settings: Settings, limiter: RateLimiter):
        import requests
        from dashscope import MultiModalConversation

        class PacedSession(requests.Session):
            """A session whose every send (retries included) takes a limiter slot first."""

            def send(self, request, **kwargs):
                _take_slot(limiter)
                return super().send(request, **kwargs)

        self.settings = settings
        self._requests = requests
        self._call = MultiModalConversation.call
        self._session = PacedSession()
        pool = requests.adapters.HTTPAdapter(pool_maxsize=max(10, settings.concurrency))
        self._session.mount("http://", pool)
        self._session.mount("https://", pool)

    def ask(self, payload: Payload, prompt: str) -> Answer:
        """One request; raises ApiError."""
        requests = self._requests
        s = self.settings
        kwargs = {}
        if s.base_url:
            kwargs["base_address"] = s.base_url
        messages = [{"role": "user", "content": [{"image": payload.data_url}, {"text": prompt}]}]
        try:
            response = self._call(
                model=s.model,
                messages=messages,
                api_key=s.api_key,
                max_tokens=s.max_tokens,
                request_timeout=s.timeout_s,
                session=self._session,
                **kwargs,
            )
        except requests.RequestException as err:
            raise ApiError("transient", f"{type(err).__name__}: {err}") from err
        except ValueError as err:  # unreadable body (not JSON)
            raise ApiError("transient", f"malformed response: {err}") from err
        status = getattr(response, "status_code", None)
        if status != 200:
            message = f"HTTP {status} {response.code}: {response.message}"
            raise classify(status, response.code, message)
        try:
            content = response.output.choices[0].message.content
        except (AttributeError, IndexError, KeyError, TypeError) as err:
            raise ApiError("transient", f"malformed response: {err}", status) from err
        if isinstance(content, list):
            text = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        else:
            text = str(content or "")
        return Answer(text, getattr(response, "request_id", None))


class OpenAIBackend:
    """Chat completions of any OpenAI-compatible server (DashScope compatible mode, vLLM, SGLang)."""

    name = "openai"

    def __init__(self, settings: Settings, limiter: RateLimiter):
        import httpx2
        import openai

        class PacedTransport(httpx2.BaseTransport):
            """The HTTP transport, taking a limiter slot before each request goes out."""

            def __init__(self, inner):
                self.inner = inner

            def handle_request(self, request):
                _take_slot(limiter)
                return self.inner.handle_request(request)

            def close(self) -> None:
                self.inner.close()

        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        self.settings = settings
        self._openai = openai
        limits = httpx2.Limits(
            max_connections=settings.concurrency + 4, max_keepalive_connections=settings.concurrency
        )
        self.client = openai.OpenAI(
            base_url=settings.endpoint,
            api_key=settings.api_key,
            max_retries=0,  # groundset retries, paced by its own limiter
            timeout=settings.timeout_s,
            http_client=httpx2.Client(
                transport=PacedTransport(httpx2.HTTPTransport(limits=limits)),
                timeout=settings.timeout_s,
            ),
        )

    def ask(self, payload: Payload, prompt: str) -> Answer:
        """One request; raises ApiError."""
        openai = self._openai
        s = self.settings
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": payload.data_url}},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
        try:
            response = self.client.chat.completions.create(
                model=s.model, messages=messages, max_tokens=s.max_tokens
            )
        except openai.APIStatusError as err:
            body = err.body if isinstance(err.body, dict) else {}
            code = body.get("code") or (body.get("error") or {}).get("code")
            raise classify(
                err.status_code, code and str(code), f"HTTP {err.status_code}: {err.message}"
            ) from err
        except (openai.APITimeoutError, openai.APIConnectionError) as err:
            raise ApiError("transient", f"{type(err).__name__}: {err}") from err
        except ValueError as err:
            raise ApiError("transient", f"malformed response: {err}") from err
        try:
            text = response.choices[0].message.content or ""
            request_id = response.id
        except (AttributeError, IndexError, TypeError) as err:
            raise ApiError("transient", f"malformed response: {str(response)[:200]}") from err
        return Answer(text, request_id)


def make_backend(settings: Settings, limiter: RateLimiter | None = None):
    """The backend named by `settings.backend`; its HTTP requests take `limiter`'s slots."""
    backend = {"dashscope": DashScopeBackend, "openai": OpenAIBackend}[settings.backend]
    return backend(settings, limiter or RateLimiter(settings.paced_rate))


@contextlib.contextmanager
def endpoint_for_run(settings: Settings) -> Iterator[Settings]:
    """Settings with a key; starts the loopback stand-in server for the block when it is in use."""
    if not uses_stand_in(settings):
        yield resolve_key(settings)
        return
    from .stand_in_vlm import STAND_IN_KEY, StandInVLM

    log.warning(
        "caption: no endpoint/key configured; using groundset's LOOPBACK STAND-IN server. "
        "Its captions are PLACEHOLDERS, not model output (see README: Captioning)"
    )
    with StandInVLM(latency=settings.stand_in_latency_s) as server:
        url = server.dashscope_url if settings.backend == "dashscope" else server.openai_url
        yield replace(settings, base_url=url, api_key=STAND_IN_KEY)


# --- requests -------------------------------------------------------------------------------


def record_key(record: dict) -> str:
    """Journal key of a record: `source/image_id` (image ids repeat across sources)."""
    image_id = record.get("image_id")
    if image_id in (None, ""):
        raise ValueError(f"record without image_id: {str(record)[:200]}")
    source = record.get("source")
    return f"{source}/{image_id}" if source else str(image_id)


@dataclass
class Outcome:
    """What requesting one image came to: a journal entry (paid answer / final error) or a give-up."""

    entry: dict | None = None
    gave_up: dict | None = None
    retries: int = 0
    throttled: int = 0


def request_image(
    backend, limiter: RateLimiter, settings: Settings, key: str, payload: Payload, sleep=time.sleep
) -> Outcome:
    """Ask about one image, retrying throttling and transient errors with jittered back-off."""
    outcome = Outcome()
    attempts = 0
    while True:
        attempts += 1  # the request waits for its slot in the backend's transport
        started = time.time()
        _sent.at = None
        try:
            answer = backend.ask(payload, settings.prompt_text)
        except ApiError as err:
            if err.kind == "auth":
                raise CaptionError(
                    f"the endpoint refused the API key ({err}); check ${settings.api_key_env}"
                ) from None
            failure = {"key": key, "status": "error", "reason": str(err), "http_status": err.status,
                       "code": err.code, "attempts": attempts,
                       "question": question_id(settings)}  # fmt: skip
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
            "status": "answered",
            "answer": answer.text,
            "request_id": answer.request_id,
            "attempts": attempts,
            "width": payload.width,
            "height": payload.height,
            "model": settings.model,
            "backend": settings.backend,
            "question": question_id(settings),
            "sent_at": round(_sent.at, 4) if _sent.at else None,
            "seconds": round(time.time() - started, 3),
        }
        return outcome


# --- chunks ---------------------------------------------------------------------------------


def iter_range(path: str | os.PathLike, start: int = 0, end: int | None = None) -> Iterator[dict]:
    """Stream the records of a JSONL file between byte offsets `start` and `end`."""
    import json

    with open(path, "rb") as handle:
        handle.seek(start)
        pos = start
        for line in handle:
            if end is not None and pos >= end:
                break
            pos += len(line)
            if line.strip():
                yield json.loads(line)


def chunk_range(
    index_path: str | os.PathLike, chunk: int, records_path: str | os.PathLike | None = None
) -> tuple[str, int, int]:
    """(input file, start, end) of chunk `chunk` of a chunk index (split's index format).

    `records_path` (the rule's input; default: the file the index names) must be the file the
    index was cut from, unchanged."""
    index = read_json(index_path)
    path = str(records_path or index["manifest"])
    if not 0 <= chunk < len(index["shards"]):
        raise CaptionError(
            f"chunk {chunk} is not in {index_path} ({len(index['shards'])} chunks): the plan is "
            "stale (the caption input changed); run the same command again"
        )
    if Path(path).stat().st_size != index["manifest_bytes"]:
        raise CaptionError(f"{path} changed since it was cut into chunks; rerun")
    entry = index["shards"][chunk]
    return path, entry["start"], entry["end"]


def question_id(settings: Settings) -> str:
    """Digest of what is asked (model + prompt): a journaled answer to another question is stale."""
    import hashlib

    return hashlib.sha256(f"{settings.model}\n{settings.prompt_text}".encode()).hexdigest()[:12]


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


COUNTS = (
    "records", "captioned", "entities", "boxes", "without_entities", "from_journal",
    "requested", "attempts", "retries", "throttled", "dropped", "api_errors", "parse_errors",
    "failed", "pending", "ungrounded",
)  # fmt: skip
UNGROUNDED = "no_valid_box"  # reason of a caption dropped for want of one valid box


def caption_chunk(
    records_path: str | os.PathLike,
    output: str | os.PathLike,
    errors: str | os.PathLike,
    stats: str | os.PathLike,
    journal_path: str | os.PathLike,
    settings: Settings,
    start: int = 0,
    end: int | None = None,
    retry_errors: bool = False,
    reparse: bool = False,
) -> dict:
    """Caption the records of one chunk (a byte range of `records_path`); returns the counts.

    Images already in the journal are not requested again (unless `retry_errors` and their
    entry is an error); `reparse` makes no request at all and rebuilds outputs from the journal.
    """
    counts: Counter = Counter(dict.fromkeys(COUNTS, 0))
    reasons: Counter = Counter()
    boxes_dropped: Counter = Counter()
    dropped: dict[str, dict] = {}
    gave_up: dict[str, dict] = {}
    began = time.monotonic()
    stand_in = uses_stand_in(settings)
    with Journal(journal_path) as journal:
        if journal.torn_lines:
            counts["journal_torn_lines"] = journal.torn_lines
        if not reparse:
            with endpoint_for_run(settings) as run_settings:
                _request_pending(
                    records_path, start, end, run_settings, journal, retry_errors,
                    counts, dropped, gave_up,
                )  # fmt: skip
        with atomic_write(output) as out, atomic_write(errors) as err_out:
            for record in iter_range(records_path, start, end):
                counts["records"] += 1
                key = record_key(record)
                base = {"key": key, "image_id": record.get("image_id"),
                        "source": record.get("source"), "image": record.get("image"),
                        "stage": "caption"}  # fmt: skip
                if key in dropped:
                    counts["dropped"] += 1
                    reasons[dropped[key]["reason"]] += 1
                    err_out.write(dumps_record({**base, **dropped[key], "attempts": 0}) + "\n")
                    continue
                entry = journal.done(key)
                if entry is None or key in gave_up:  # never asked, or this run's asking failed
                    failure = gave_up.get(key) or {"reason": "not requested (reparse)",
                                                   "attempts": 0}  # fmt: skip
                    counts["failed" if key in gave_up else "pending"] += 1
                    reasons["gave_up" if key in gave_up else "pending"] += 1
                    err_out.write(dumps_record({**base, **failure, "status": "error"}) + "\n")
                    continue
                if entry["status"] != "answered":
                    counts["api_errors"] += 1
                    reasons[f"http_{entry.get('http_status')}_{entry.get('code')}"] += 1
                    err_out.write(dumps_record({**base, **entry}) + "\n")
                    continue
                parsed = parse_answer(
                    entry["answer"],
                    settings.convention,
                    image_size=(entry.get("width"), entry.get("height")),
                    expect_json=settings.expects_json,
                )
                boxes_dropped.update(parsed.dropped)
                if parsed.error:
                    counts["parse_errors"] += 1
                    reasons[parsed.error] += 1
                    err_out.write(
                        dumps_record({**base, "status": "error", "reason": parsed.error,
                                      "attempts": entry["attempts"],
                                      "answer": entry["answer"][:ANSWER_KEEP_CHARS]})
                        + "\n"
                    )  # fmt: skip
                    continue
                if not parsed.entities and not settings.keep_ungrounded:
                    # a caption without one valid box is not grounding data
                    counts["ungrounded"] += 1
                    reasons[UNGROUNDED] += 1
                    err_out.write(
                        dumps_record({**base, "status": "dropped", "reason": UNGROUNDED,
                                      "caption": parsed.caption, "attempts": entry["attempts"],
                                      "answer": entry["answer"][:ANSWER_KEEP_CHARS]})
                        + "\n"
                    )  # fmt: skip
                    continue
                counts["captioned"] += 1
                counts["entities"] += len(parsed.entities)
                counts["boxes"] += sum(len(e["bboxes"]) for e in parsed.entities)
                counts["without_entities"] += not parsed.entities
                out_record = {**record, "caption": parsed.caption, "entities": parsed.entities}
                out_record["caption_meta"] = {
                    "model": entry.get("model"),
                    "backend": entry.get("backend"),
                    "request_id": entry.get("request_id"),
                    "convention": settings.convention,
                    "boxes_dropped": sum(parsed.dropped.values()),
                }
                out.write(dumps_record(out_record) + "\n")
    counts["seconds"] = round(time.monotonic() - began, 3)
    result = {
        **dict(counts),
        "range": [start, end],
        "error_reasons": dict(reasons),
        "boxes_dropped": dict(boxes_dropped),
        "backend": settings.backend,
        "model": settings.model,
        "stand_in": stand_in,
        "rate_per_second": settings.rate_per_second,
    }
    write_json(stats, result)
    log.info(
        "%s: %d records, %d captioned, %d requested, %d errors/drops",
        records_path,
        counts["records"],
        counts["captioned"],
        counts["requested"],
        counts["records"] - counts["captioned"],
    )
    return result


def _request_pending(
    records_path, start, end, settings: Settings, journal: Journal, retry_errors: bool,
    counts: Counter, dropped: dict, gave_up: dict,
) -> None:  # fmt: skip
    """Request every record of the range that the journal lacks, journaling answers as they land."""
    limiter = RateLimiter(settings.paced_rate)
    backend = make_backend(settings, limiter)
    window = max(1, settings.concurrency) * 2
    consecutive = 0
    question = question_id(settings)
    in_flight: dict[cf.Future, str] = {}

    def collect(done) -> None:
        nonlocal consecutive
        batch = []
        for future in done:
            key = in_flight.pop(future)
            outcome = future.result()  # CaptionError (auth) propagates: stop the job
            counts["retries"] += outcome.retries
            counts["throttled"] += outcome.throttled
            if outcome.entry is not None:
                batch.append(outcome.entry)
                counts["attempts"] += outcome.entry["attempts"]
                consecutive = 0 if outcome.entry["status"] == "answered" else consecutive
            else:
                gave_up[key] = outcome.gave_up
                counts["attempts"] += outcome.gave_up["attempts"]
                consecutive += 1
        journal.append(batch)  # flushed and fsynced before anything else is written
        if consecutive >= settings.max_consecutive_failures:
            raise CaptionError(
                f"{consecutive} images in a row failed after retries (last: "
                f"{gave_up[key]['reason']}); the endpoint looks down. Answers so far are "
                f"journaled in {journal.path}; rerun to continue"
            )

    with (
        cf.ThreadPoolExecutor(max(1, settings.concurrency), thread_name_prefix="caption") as pool,
        tqdm(desc="caption", unit="img", mininterval=5) as bar,
    ):
        try:
            for record in iter_range(records_path, start, end):
                key = record_key(record)
                if not _needs_request(
                    journal.done(key), retry_errors, question, settings.expects_json
                ):
                    counts["from_journal"] += 1
                    continue
                try:
                    payload = load_payload(image_path(record))
                except Dropped as drop:
                    dropped[key] = {"status": "dropped", "reason": drop.reason,
                                    "detail": drop.detail}  # fmt: skip
                    continue
                while len(in_flight) >= window:
                    done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                    collect(done)
                    bar.update(len(done))
                counts["requested"] += 1
                future = pool.submit(request_image, backend, limiter, settings, key, payload)
                in_flight[future] = key
            while in_flight:
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                collect(done)
                bar.update(len(done))
        except BaseException:
            # keep what was paid for: let running requests land and journal them, then stop
            for future in in_flight:
                future.cancel()
            running = [f for f in in_flight if not f.cancelled()]
            cf.wait(running, timeout=settings.timeout_s)
            landed = [f.result().entry for f in running if f.done() and f.exception() is None]
            with contextlib.suppress(Exception):
                journal.append([entry for entry in landed if entry is not None])
            raise


# --- chunk index, journal layout, gathering ---------------------------------------------------


def _layout(index: dict) -> dict:
    """What decides which records a chunk holds (a changed layout moves journaled answers)."""
    return {
        "input": index["manifest"],
        "bytes": index["manifest_bytes"],
        "chunk_size": index["shard_size"],
        "ranges": [[c["start"], c["end"]] for c in index["shards"]],
    }


def journal_name(chunk: int) -> str:
    """File name of chunk `chunk`'s journal."""
    return f"chunk_{chunk}.jsonl"


def rebucket_journals(journal_dir: str | os.PathLike, index: dict) -> dict:
    """Move journaled answers to the chunk that now holds their record (after the input or the
    chunk size changed), so no answer is paid for twice. Answers whose record left the input
    are kept in `orphans.jsonl`. Returns counts."""
    import json
    import shutil

    journal_dir = Path(journal_dir)
    old_files = sorted(journal_dir.glob("chunk_*.jsonl"))
    counts = {"moved_entries": 0, "orphans": 0}
    if not old_files:
        return counts
    where: dict[str, int] = {}
    for entry in index["shards"]:
        for record in iter_range(index["manifest"], entry["start"], entry["end"]):
            where[record_key(record)] = entry["shard"]
    fresh = journal_dir.with_name(journal_dir.name + ".rebucket")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    orphans = journal_dir / "orphans.jsonl"
    if orphans.exists():
        shutil.copyfile(orphans, fresh / "orphans.jsonl")
    for old in old_files:
        groups: dict[str, list[str]] = {}
        with open(old, encoding="utf-8") as handle:
            for line in handle:
                try:
                    key = str(json.loads(line)["key"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line
                chunk = where.get(key)
                name = "orphans.jsonl" if chunk is None else journal_name(chunk)
                counts["orphans" if chunk is None else "moved_entries"] += 1
                groups.setdefault(name, []).append(line if line.endswith("\n") else line + "\n")
        for name, lines in groups.items():
            with open(fresh / name, "a", encoding="utf-8") as out:
                out.writelines(lines)
    for path in fresh.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    stale = journal_dir.with_name(journal_dir.name + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    journal_dir.rename(stale)
    fresh.rename(journal_dir)
    shutil.rmtree(stale)
    return counts


def index_chunks(
    records_path: str | os.PathLike,
    index_path: str | os.PathLike,
    chunk_size: int,
    journal_dir: str | os.PathLike,
) -> dict:
    """Cut the input into chunks of `chunk_size` records (byte ranges) and keep the journals in
    step with the chunk layout."""
    from .split import index_manifest

    index = index_manifest(records_path, chunk_size)
    journal_dir = Path(journal_dir)
    layout_file = journal_dir / "layout.json"
    layout = _layout(index)
    previous = read_json(layout_file) if layout_file.exists() else None
    if previous is not None and previous != layout:
        counts = rebucket_journals(journal_dir, index)
        log.warning(
            "chunk layout changed (input or chunk_size): %d journaled answers moved to their "
            "new chunks, %d kept in orphans.jsonl (their records left the input)",
            counts["moved_entries"],
            counts["orphans"],
        )
    write_json(layout_file, layout)
    write_json(index_path, index)
    return index


def gather_chunks(
    chunks: list[str],
    output: str | os.PathLike,
    errors_out: str | os.PathLike,
    stats_out: str | os.PathLike,
    index: str | os.PathLike | None = None,
) -> dict:
    """Concatenate chunk outputs (and their error files) in chunk order and total their counts;
    with `index`, the chunks must be those of the chunk index."""
    totals: Counter = Counter(dict.fromkeys(COUNTS, 0))
    reasons: Counter = Counter()
    boxes: Counter = Counter()
    meta: dict = {}
    for stats in concat_chunks(chunks, output, "errors", errors_out, index):
        stats.pop("range", None)
        reasons.update(stats.pop("error_reasons", {}))
        boxes.update(stats.pop("boxes_dropped", {}))
        stand_in = bool(stats.pop("stand_in", False))
        meta["stand_in"] = meta.get("stand_in", False) or stand_in
        for key in ("backend", "model", "rate_per_second"):
            meta.setdefault(key, stats.get(key))
            stats.pop(key, None)
        totals.update({k: v for k, v in stats.items() if isinstance(v, int | float)})
    result = {
        **meta,
        "chunks": len(chunks),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in totals.items()},
        "error_reasons": dict(reasons),
        "boxes_dropped": dict(boxes),
    }
    write_json(stats_out, result)
    return result
