"""The one seam between the pipeline and groundset's stand-ins (`groundset.testing`): each
function here is reached only where a config opts into a stand-in, and imports it then.

- the sample's loopback image server (a source's `serve_dir`: the bundled sample);
- the tiny random filter models (`filter.stand_in_models`);
- the loopback stand-in VLM server (`caption.stand_in`, see caption.endpoint.uses_stand_in).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace

from groundset.stages.caption.settings import Settings

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stand_in_endpoint(settings: Settings) -> Iterator[Settings]:
    """Settings pointing at a loopback stand-in server for the block (placeholder captions)."""
    from groundset.testing.vlm import STAND_IN_KEY, StandInVLM

    log.warning(
        "caption: no endpoint/key configured; using groundset's LOOPBACK STAND-IN server. "
        "Its captions are PLACEHOLDERS, not model output (see README: Captioning)"
    )
    with StandInVLM(latency=settings.stand_in_latency_s) as server:
        url = server.dashscope_url if settings.backend == "dashscope" else server.openai_url
        yield replace(settings, base_url=url, api_key=STAND_IN_KEY, stand_in=True)


@contextlib.contextmanager
def sample_proxy(serve_dir: str | os.PathLike, env: dict) -> Iterator[dict]:
    """`env` with a proxy to a loopback server of the files under `serve_dir` (the sample's
    URLs resolve to it) for the block."""
    from groundset.testing.sample_server import proxy_env, serve

    with serve(serve_dir) as server:
        yield proxy_env(server, env)


def stand_in_models(models_dir: str | os.PathLike) -> dict:
    """The tiny random filter models built under `models_dir` (filter.stand_in_models)."""
    from groundset.testing.models import build_stand_in_models

    return build_stand_in_models(models_dir)
