"""Captioning stage: a grounded caption (caption + entities with boxes) per image from Qwen-VL.

`settings`: the `caption:` section, prompts, the question asked; `errors`: CaptionError;
`endpoint`: the stand-in decision, the key, the preflight check, the endpoint of a run;
`serve`: servers a job starts itself; `seam`: the one way to the loopback stand-in (opt-in);
`backends`: DashScope's SDK and OpenAI-compatible servers, image payloads, error classes;
`asking`: one image with retries and back-off, a chunk's pending images paced and in flight;
`chunks`: chunk ranges and index, journal layout, one chunk's outputs, the gather.
Every paid answer is journaled (fsynced) before any output is written, so a killed job, rerun,
pays for nothing twice; outputs are derived from the journal.
"""

from groundset.core.records import record_key
from groundset.stages.caption.asking import Outcome, request_image, request_pending, stop_on_sigterm
from groundset.stages.caption.backends import (
    SEND_AS_IS,
    Answer,
    ApiError,
    DashScopeBackend,
    Dropped,
    OpenAIBackend,
    Payload,
    classify,
    load_payload,
    make_backend,
    record_payload,
)
from groundset.stages.caption.chunks import (
    ANSWER_KEEP_CHARS,
    COUNTS,
    UNGROUNDED,
    caption_chunk,
    chunk_range,
    gather_chunks,
    index_chunks,
    iter_range,
    journal_name,
    rebucket_journals,
)
from groundset.stages.caption.endpoint import (
    check_endpoint,
    endpoint_for_run,
    preflight,
    resolve_key,
    uses_stand_in,
)
from groundset.stages.caption.errors import CaptionError
from groundset.stages.caption.settings import (
    DASHSCOPE_COMPATIBLE_URL,
    INDEX_KEYS,
    OUTPUT_KEYS,
    PREFLIGHT_KEYS,
    PROMPTS,
    TUNING_KEYS,
    Settings,
    output_settings,
    preflight_settings,
    question_id,
    tuning_knobs,
)

__all__ = [
    "ANSWER_KEEP_CHARS",
    "COUNTS",
    "DASHSCOPE_COMPATIBLE_URL",
    "INDEX_KEYS",
    "OUTPUT_KEYS",
    "PREFLIGHT_KEYS",
    "PROMPTS",
    "SEND_AS_IS",
    "TUNING_KEYS",
    "UNGROUNDED",
    "Answer",
    "ApiError",
    "CaptionError",
    "DashScopeBackend",
    "Dropped",
    "OpenAIBackend",
    "Outcome",
    "Payload",
    "Settings",
    "caption_chunk",
    "check_endpoint",
    "chunk_range",
    "classify",
    "endpoint_for_run",
    "gather_chunks",
    "index_chunks",
    "iter_range",
    "journal_name",
    "load_payload",
    "make_backend",
    "output_settings",
    "preflight",
    "preflight_settings",
    "question_id",
    "rebucket_journals",
    "record_key",
    "record_payload",
    "request_image",
    "request_pending",
    "resolve_key",
    "stop_on_sigterm",
    "tuning_knobs",
    "uses_stand_in",
]
