"""The two ways of asking Qwen-VL, and what goes into a request.

DashScope's SDK (`MultiModalConversation.call`) and any OpenAI-compatible server (DashScope
compatible mode, vLLM, SGLang); both take a rate-limiter slot in their HTTP transport right
before each request goes out. Images become data URLs (`load_payload`); failed requests are
classified for the retry policy (`classify`).
"""

from __future__ import annotations

import base64
import io
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from groundset.core.pacing import RateLimiter
from groundset.core.records import RecordError, image_path
from groundset.stages.caption.settings import Settings


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


# --- images -------------------------------------------------------------------------------

SEND_AS_IS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


JPEG_QUALITY = 90  # of an image shrunk to the pixel budget


@dataclass
class Payload:
    """An image ready to send: a data URL, the size of the image it encodes, the file's size."""

    data_url: str
    width: int
    height: int
    source_size: tuple[int, int] | None = None  # (width, height) of the file; None: as sent

    @property
    def source(self) -> tuple[int, int]:
        """(width, height) of the image file."""
        return self.source_size or (self.width, self.height)


def sent_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """The size an image of `width` x `height` is sent at: as is within `max_pixels`, else
    shrunk with its aspect kept to the largest size within the budget."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def fits_budget(entry: dict, max_pixels: int | None) -> bool:
    """Whether a journaled answer was about the image this budget sends (an answer journaled
    without the file's size was about the file as is)."""
    if "width" not in entry or "height" not in entry:  # an error: sent under which budget?
        return entry.get("max_pixels") == max_pixels
    sent = (entry["width"], entry["height"])
    source = tuple(entry.get("source_size") or sent)
    return sent_size(*source, max_pixels) == sent


def load_payload(path: str, max_pixels: int | None = None) -> Payload:
    """Read an image and make its data URL. Within `max_pixels` RGB JPEG/PNG/WebP go as is,
    other modes as RGB PNG; a larger image is shrunk (aspect kept) and sent as JPEG.

    Raises Dropped when the file is missing or cannot be decoded and converted to RGB.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise Dropped("image_missing", f"{path}: {err.strerror or err}") from err
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, mode, source = image.format, image.mode, image.size
            target = sent_size(*source, max_pixels)
            if target != source and fmt == "JPEG":
                image.draft("RGB", target)  # DCT-scaled decode, still at least the target
            image.load()
            rgb = image.convert("RGB")
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    except Exception as err:  # PIL raises many types for broken files
        detail = "not a readable image" if "cannot identify" in str(err) else str(err)
        raise Dropped("rgb_conversion_failed", f"{path}: {type(err).__name__}: {detail}") from err
    if target != source:
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        data, mime = buffer.getvalue(), "image/jpeg"
    elif fmt in SEND_AS_IS and mode in ("RGB", "L"):
        mime = SEND_AS_IS[fmt]
    else:
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        data, mime = buffer.getvalue(), "image/png"
    encoded = base64.b64encode(data).decode("ascii")
    return Payload(f"data:{mime};base64,{encoded}", rgb.width, rgb.height, source)


def record_payload(record: dict, max_pixels: int | None = None) -> Payload:
    """The payload of a record's image within `max_pixels`; Dropped (`no_image`) when the record
    names none."""
    try:
        path = image_path(record)
    except RecordError as err:
        raise Dropped("no_image", "the record names no image") from err
    return load_payload(path, max_pixels)


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
