"""Where a caption job's requests go: the stand-in decision, the key, the preflight check, and
the endpoint of a run (the configured one, a server the job starts, or the loopback stand-in).
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

from groundset.stages.caption.errors import CaptionError
from groundset.stages.caption.serve import command_problem, served_name, serving
from groundset.stages.caption.settings import Settings

log = logging.getLogger(__name__)


def uses_stand_in(settings: Settings, environ: dict | None = None) -> bool:
    """Whether this run talks to the loopback stand-in (`stand_in: true`, or `auto` without a key)."""
    environ = os.environ if environ is None else environ
    if settings.stand_in == "auto":
        return (
            not environ.get(settings.api_key_env) and not settings.base_url and not settings.serves
        )
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
    if settings.serves:
        command = settings.serve["command"]
        problem = command_problem(command)
        if problem:
            raise CaptionError(f"caption.serve.command: {problem}: {command!r}")
        served = served_name(command)
        if served is not None and served != settings.model:
            raise CaptionError(
                f"caption.model: {settings.model!r}, but caption.serve.command serves {served!r} "
                "(requests must carry the served name: set caption.model to it, or give the "
                "server that name with --served-model-name)"
            )
    elif not stand_in:
        resolve_key(settings, environ)
        check_endpoint(settings)
    return {
        "backend": settings.backend,
        "model": settings.model,
        "endpoint": (
            "servers the jobs start: " + settings.serve["command"]
            if settings.serves
            else "loopback stand-in"
            if stand_in
            else settings.endpoint
        ),
        "stand_in": stand_in,
        "rate_per_second": settings.rate_per_second,
        "convention": settings.convention,
    }


@contextlib.contextmanager
def endpoint_for_run(settings: Settings, server_log: str | None = None) -> Iterator[Settings]:
    """Settings with a key and the endpoint for the block: the job's own server
    (`serve.command`, its output in `server_log`), the loopback stand-in, or the configured one."""
    if settings.serves:
        template, serve = settings.serve["command"], settings.serve
        log_path = server_log or "caption_server.log"
        # a self-hosted server needs no key; one started with --api-key gets the variable's
        key = os.environ.get(settings.api_key_env, "").strip() or "EMPTY"
        with serving(template, settings.model, log_path, serve["startup_timeout_s"], key) as server:
            if server.is_stand_in:
                log.warning(
                    "caption: the server caption.serve.command started is groundset's LOOPBACK "
                    "STAND-IN: its captions are PLACEHOLDERS, not model output"
                )
            stand_in = server.is_stand_in or settings.stand_in
            yield replace(
                settings, base_url=server.base_url, api_key=key, stand_in=stand_in,
                server_gone=server.gone,
            )  # fmt: skip
        return
    if not uses_stand_in(settings):
        yield resolve_key(settings)
        return
    from groundset.stand_ins import stand_in_endpoint  # the config opted in

    with stand_in_endpoint(settings) as run_settings:
        yield run_settings
