"""Captioning settings: the `caption:` config section, its prompts, the question asked.

Which keys are `params` of the chunk jobs (OUTPUT_KEYS: they change a chunk's outputs) and of
the preflight check (PREFLIGHT_KEYS), and which are tuning knobs (TUNING_KEYS: read from the
config at run time, never marking a job stale), is decided here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

from groundset.core.config import TUNING, fill_section, keys_for, pick_keys

DASHSCOPE_COMPATIBLE_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"

# The prompt of each caption.prompt_preset (keys: the schema's enum of that key; a test checks).
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


# What a caption chunk job's `params` carry: the keys that change its outputs (a change marks
# every chunk stale; answers already journaled for the same question are not paid for again).
OUTPUT_KEYS = keys_for("caption", "caption")
# Tuning knobs: how fast and how stubbornly a job asks, never what its outputs hold. The job
# reads them from the config at run time, so changing one marks nothing stale.
TUNING_KEYS = keys_for("caption", "caption", TUNING)
# Keys of the chunk index and of the dedup before it (their rules' inputs and params; the
# dedup's threads its job's), and the price `groundset estimate` reads: none is a chunk job's.
INDEX_KEYS = (
    "input",
    "chunk_size",
    "dedup.enabled",
    "dedup.max_distance",
    "dedup.threads",
    "price_per_image",
)
# What the preflight check reads of the settings (its job's params: all OUTPUT_KEYS; the tuning
# knobs it reads, api_key_env and rate_per_second, are read at run time). Exactly the fields
# `preflight` touches: tests/test_caption.py records them over every branch of the check and
# fails on any difference. A change checks again, and so cuts the chunks again (the index waits
# for the check); other output keys mark only the chunks stale, which a dry-run lists.
PREFLIGHT_KEYS = ("backend", "base_url", "model", "box_convention", "stand_in", "serve.command")


def output_settings(section: dict) -> dict:
    """The keys of a `caption:` config section that change a chunk's outputs (its job's params)."""
    return pick_keys(section, OUTPUT_KEYS)


def preflight_settings(section: dict) -> dict:
    """The keys of a `caption:` config section that the preflight check depends on (its params)."""
    return pick_keys(section, PREFLIGHT_KEYS)


def tuning_knobs(section: dict) -> dict:
    """The tuning knobs of a `caption:` config section (read at run time, never params)."""
    return pick_keys(section, TUNING_KEYS)


@dataclass(frozen=True)
class Settings:
    """The `caption:` config section, with the job's share of the global rate.

    Built by from_config only: the schema (workflow/schemas/config.schema.yaml) holds every
    default and allowed value, so no field repeats one."""

    backend: str
    base_url: str | None
    model: str
    api_key_env: str
    rate_per_second: float | None
    rate_headroom: float
    concurrency: int
    prompt: str | None
    prompt_preset: str
    box_convention: str
    max_attempts: int
    backoff_base_s: float
    backoff_cap_s: float
    timeout_s: float
    max_tokens: int
    max_consecutive_failures: int
    stand_in: bool | str
    stand_in_latency_s: float
    keep_ungrounded: bool
    max_pixels: int | None
    serve: dict = field(hash=False)  # command, instances, gpus, cpus, mem_mb, startup_timeout_s
    api_key: str | None = field(default=None, repr=False)  # resolved at run time, never logged
    # the job's own server: why it is gone (None while it runs); set for the run by endpoint_for_run
    server_gone: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_config(cls, section: dict, rate_share: int = 1) -> Settings:
        """Settings from a (partial) `caption:` config dict, checked and filled from the schema
        (ConfigError naming the key); the rate is divided among `rate_share` jobs."""
        values = fill_section("caption", section)
        known = {f.name for f in fields(cls) if f.name not in ("api_key", "server_gone")}
        settings = cls(**{k: v for k, v in values.items() if k in known})
        if settings.rate_per_second is not None and rate_share > 1:
            settings = replace(settings, rate_per_second=settings.rate_per_second / rate_share)
        return settings

    @classmethod
    def for_job(cls, outputs: dict, section: dict, rate_share: int = 1) -> Settings:
        """A job's settings: its params (`outputs`) with the tuning knobs of the `caption:` section."""
        return cls.from_config(pick_keys(outputs, OUTPUT_KEYS, tuning_knobs(section)), rate_share)

    @property
    def serves(self) -> bool:
        """Whether the job starts its own server (`serve.command`)."""
        return bool(self.serve.get("command"))

    @property
    def paced_rate(self) -> float | None:
        """Requests/s the job's limiter allows: its share of the quota less the jitter headroom
        (none with a server of its own: `concurrency` is the knob)."""
        if self.rate_per_second is None or self.serves:
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


def question_id(settings: Settings) -> str:
    """Digest of what is asked (model + prompt): a journaled answer to another question is stale."""
    return hashlib.sha256(f"{settings.model}\n{settings.prompt_text}".encode()).hexdigest()[:12]
