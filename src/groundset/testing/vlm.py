"""Loopback stand-in for a Qwen-VL endpoint: speaks DashScope's and OpenAI's HTTP protocols.

Used by the tests, the captioning benchmark and the bundled sample (no model or API can be
reached here). It answers every request with a placeholder grounded caption computed from the
image (or whatever a test's responder scripts: other formats, 429s, 5xx, slow or garbage
answers), checks the API key, and logs each request (image digest, start/end time, status).
Captions from it are placeholders, not model output.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from groundset.stages.caption.serve import STAND_IN_OWNER  # in its model list: the run can tell

DASHSCOPE_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
OPENAI_PATH = "/v1/chat/completions"
STAND_IN_KEY = "stand-in-key"  # the key the sample's stand-in accepts (not a secret)


@dataclass
class Reply:
    """What the stand-in sends for one request: an answer (HTTP 200) or an error status."""

    status: int = 200
    answer: str | None = None
    code: str | None = None
    message: str | None = None
    raw: bytes | None = None  # a body sent as is (garbage, truncated JSON)
    delay: float | None = None  # seconds before answering (default: the server's latency)


@dataclass
class Logged:
    """One request the stand-in served."""

    protocol: str
    image: str  # sha256 of the image bytes, 16 hex digits ("" if none)
    start: float
    end: float
    status: int
    model: str


Responder = Callable[[bytes, int, str], Reply | None]


def image_digest(data: bytes) -> str:
    """The id the stand-in logs an image under (also what tests compute from their files)."""
    return hashlib.sha256(data).hexdigest()[:16]


def decode_data_url(url: str) -> bytes:
    """The bytes of a `data:<mime>;base64,<payload>` URL (ValueError if it is not one)."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise ValueError("image is not a base64 data URL")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except binascii.Error as err:
        raise ValueError(f"bad base64 image: {err}") from err


def _salient_box(image: Image.Image) -> list[int]:
    """A 0-1000 grid box around the pixels that differ most from the image's mean colour."""
    small = np.asarray(image.convert("L").resize((64, 64)), dtype=np.float32)
    diff = np.abs(small - small.mean())
    mask = diff > max(diff.mean() + diff.std(), 1.0)
    if mask.sum() < 8:
        return [250, 250, 750, 750]
    ys, xs = np.nonzero(mask)
    x1, x2 = int(xs.min() * 1000 / 64), int((xs.max() + 1) * 1000 / 64)
    y1, y2 = int(ys.min() * 1000 / 64), int((ys.max() + 1) * 1000 / 64)
    if x2 - x1 < 20 or y2 - y1 < 20:
        return [250, 250, 750, 750]
    return [x1, y1, x2, y2]


def placeholder_answer(data: bytes) -> str:
    """A grounded-caption answer in the default prompt's JSON shape (0-1000 grid boxes), in a fence."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        image.draft("L", (128, 128))  # a JPEG decodes at reduced scale: the box needs 64 x 64
        main = _salient_box(image)
    shape = "landscape" if width > height else "portrait" if height > width else "square"
    answer = {
        "caption": f"[placeholder caption from groundset's stand-in server, not a model] "
        f"A {shape} {width}x{height} image with a distinct region near its centre.",
        "entities": [
            {"entity": "main subject", "bboxes": main},
            {"entity": "upper half", "bboxes": [0, 0, 1000, 500]},
        ],
    }
    return "```json\n" + json.dumps(answer) + "\n```"


def default_responder(image: bytes, count: int, protocol: str) -> Reply:
    """The stand-in's answer when no test scripts one: a placeholder caption of the image."""
    try:
        return Reply(answer=placeholder_answer(image))
    except OSError:
        return Reply(400, code="InvalidParameter", message="The image cannot be decoded.")


def _dashscope_body(reply: Reply, request_id: str) -> dict:
    """A DashScope multimodal-generation response body."""
    if reply.status != 200:
        return {"code": reply.code or "InternalError", "message": reply.message or "error",
                "request_id": request_id}  # fmt: skip
    return {
        "output": {
            "choices": [
                {
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": [{"text": reply.answer}]},
                }
            ]
        },
        "usage": {
            "input_tokens": 1000,
            "output_tokens": len(reply.answer or "") // 4,
            "image_tokens": 900,
        },  # fmt: skip
        "request_id": request_id,
    }


def _openai_body(reply: Reply, request_id: str, model: str) -> dict:
    """An OpenAI chat-completions response body."""
    if reply.status != 200:
        return {"error": {"message": reply.message or "error", "type": "error",
                          "code": reply.code or str(reply.status)}}  # fmt: skip
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": reply.answer},
            }
        ],  # fmt: skip
        "usage": {"prompt_tokens": 1000, "completion_tokens": 50, "total_tokens": 1050},
    }


def _image_of(protocol: str, body: dict) -> bytes:
    """The (first) image of a request body, decoded from its data URL."""
    for message in body.get("input", {}).get("messages", []) or body.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if protocol == "dashscope" and "image" in part:
                return decode_data_url(part["image"])
            if protocol == "openai" and part.get("type") == "image_url":
                return decode_data_url(part["image_url"]["url"])
    raise ValueError("no image in the request")


def _reply_bytes(reply: Reply, protocol: str, request_id: str, model: str) -> bytes:
    """The body a reply is sent as: its raw bytes, else the protocol's JSON."""
    if reply.raw is not None:
        return reply.raw
    if protocol == "dashscope":
        return json.dumps(_dashscope_body(reply, request_id)).encode()
    return json.dumps(_openai_body(reply, request_id, model)).encode()


class StandInVLM:
    """A threaded loopback HTTP server answering DashScope and OpenAI chat requests."""

    def __init__(
        self,
        responder: Responder | None = None,
        latency: float = 0.0,
        api_key: str | None = STAND_IN_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        served_model_name: str = "stand-in",
        request_log: str | os.PathLike | None = None,
    ):
        self.responder = responder or default_responder
        self.latency = latency
        self.api_key = api_key  # None: any key (a vLLM server started without --api-key)
        self.served_model_name = served_model_name
        self.request_log = request_log  # a JSONL file: one line per request served
        self.log: list[Logged] = []
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the server (http://127.0.0.1:PORT)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def dashscope_url(self) -> str:
        """What to set as `dashscope.base_http_api_url` / `caption.base_url` for DashScope."""
        return self.url + "/api/v1"

    @property
    def openai_url(self) -> str:
        """What to pass as the OpenAI client's `base_url`."""
        return self.url + "/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        """The request handler class of this server (GET /v1/models, POST chat requests)."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet: the tests read `server.log`
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                key = self.headers.get("Authorization")
                if server.api_key is not None and key != f"Bearer {server.api_key}":
                    self._send(401, b'{"error": {"message": "Unauthorized"}}')  # as vLLM
                elif self.path.rstrip("/") == "/v1/models":
                    model = {"id": server.served_model_name, "object": "model",
                             "owned_by": STAND_IN_OWNER}  # fmt: skip
                    body = {"object": "list", "data": [model]}
                    self._send(200, json.dumps(body).encode())
                else:
                    self._send(404, b'{"code": "NotFound", "message": "no such path"}')

            def do_POST(self) -> None:
                start = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                protocol = {DASHSCOPE_PATH: "dashscope", OPENAI_PATH: "openai"}.get(
                    self.path.split("?")[0]
                )
                if protocol is None:
                    self._send(404, b'{"code": "NotFound", "message": "no such path"}')
                    return
                authorization = self.headers.get("Authorization")
                reply, digest, model = server._reply(protocol, raw, authorization)
                delay = server.latency if reply.delay is None else reply.delay
                if delay:
                    time.sleep(delay)
                payload = _reply_bytes(reply, protocol, uuid.uuid4().hex, model)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._send(reply.status, payload)  # may fail if the client gave up
                server._keep(Logged(protocol, digest, start, time.monotonic(), reply.status, model))

        return Handler

    def _reply(self, protocol: str, raw: bytes, authorization: str | None) -> tuple:
        """(reply, image digest, model) of one chat request's body and Authorization header."""
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return Reply(401, code="InvalidApiKey", message="Invalid API-key provided."), "", ""
        try:
            body = json.loads(raw)
            model = str(body.get("model", ""))
            image = _image_of(protocol, body)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            return Reply(400, code="InvalidParameter", message=str(err)), "", ""
        digest = image_digest(image) if image else ""
        with self._lock:
            self.counts[digest] += 1
            count = self.counts[digest]
        reply = self.responder(image, count, protocol) or default_responder(image, count, protocol)
        return reply, digest, model

    def _keep(self, entry: Logged) -> None:
        """Log one served request (and append it to the request log file, if any)."""
        with self._lock:
            self.log.append(entry)
            if self.request_log:
                with open(self.request_log, "a", encoding="utf-8") as handle:
                    line = {**dataclasses.asdict(entry), "pid": os.getpid()}
                    handle.write(json.dumps(line) + "\n")

    def start(self) -> StandInVLM:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> StandInVLM:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve the stand-in as its own process, as `caption.serve.command` starts a vLLM server:
    `python -m groundset.testing.vlm --port {port}` (tests, the benchmark; PLACEHOLDER captions)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--served-model-name", default="stand-in")
    parser.add_argument("--api-key", default=None, help="the key it requires (default: any)")
    parser.add_argument("--request-log", default=None, help="JSONL file, a line per request")
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds before serving")
    args = parser.parse_args(argv)
    print(
        "groundset stand-in VLM server: PLACEHOLDER captions, not a model "
        f"(pid {os.getpid()}, port {args.port})",
        file=sys.stderr,
        flush=True,
    )
    time.sleep(args.startup_delay)
    server = StandInVLM(
        latency=args.latency, api_key=args.api_key, host=args.host, port=args.port,
        served_model_name=args.served_model_name, request_log=args.request_log,
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server._server.serve_forever()
    finally:
        server._server.server_close()


if __name__ == "__main__":
    main()
