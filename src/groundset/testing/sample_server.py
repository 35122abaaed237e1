"""Loopback HTTP proxy that answers the bundled sample's URLs from a local folder.

The sample's URL list points at the host `sample.groundset.invalid`, which never resolves.
During the sample's download, img2dataset runs with `http_proxy` set to this server, so the
real download code path (urllib through a proxy) fetches real files, only over loopback.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

log = logging.getLogger(__name__)

SAMPLE_HOST = "sample.groundset.invalid"


def resolve(root: Path, url_path: str) -> Path | None:
    """Map a URL path onto a file under `root`; None if it escapes `root` or does not exist."""
    candidate = (root / unquote(url_path).lstrip("/")).resolve()
    if root not in candidate.parents or not candidate.is_file():
        return None
    return candidate


def _handler(root: Path, host: str) -> type[BaseHTTPRequestHandler]:
    """A request handler class serving `root` for proxied requests to `host`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            parts = urlsplit(self.path)
            if parts.hostname and parts.hostname != host:
                self.send_error(502, f"unknown host {parts.hostname}")
                return
            path = resolve(root, parts.path)
            if path is None:
                self.send_error(404, "not found")
                return
            body = path.read_bytes()
            self.send_response(200)
            self.send_header(
                "Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args) -> None:
            log.debug("sample server: " + fmt, *args)

    return Handler


@contextlib.contextmanager
def serve(root: str | os.PathLike, host: str = SAMPLE_HOST) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (free port) while the block runs; yields the proxy URL."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"serve_dir {root} is not a folder")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, host))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="sample-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    log.info("serving %s for http://%s/ through proxy %s", root, host, url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        log.info("sample server stopped")


def proxy_env(proxy_url: str, base: dict | None = None) -> dict[str, str]:
    """Environment for a child process that sends every HTTP request through `proxy_url`."""
    env = dict(os.environ if base is None else base)
    for key in ("http_proxy", "HTTP_PROXY"):
        env[key] = proxy_url
    for key in ("no_proxy", "NO_PROXY", "https_proxy", "HTTPS_PROXY"):
        env.pop(key, None)
    return env
