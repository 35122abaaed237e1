"""The caption stage's one way to groundset's stand-ins: the loopback stand-in VLM server, taken
only where the config opts into it (`caption.stand_in`, see endpoint.uses_stand_in)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace

from groundset.stages.caption.settings import Settings
from groundset.testing.vlm import STAND_IN_KEY, StandInVLM

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stand_in_endpoint(settings: Settings) -> Iterator[Settings]:
    """Settings pointing at a loopback stand-in server for the block (placeholder captions)."""
    log.warning(
        "caption: no endpoint/key configured; using groundset's LOOPBACK STAND-IN server. "
        "Its captions are PLACEHOLDERS, not model output (see README: Captioning)"
    )
    with StandInVLM(latency=settings.stand_in_latency_s) as server:
        url = server.dashscope_url if settings.backend == "dashscope" else server.openai_url
        yield replace(settings, base_url=url, api_key=STAND_IN_KEY, stand_in=True)
