"""Which config keys change a run's outputs and which only its speed: every leaf of the schema
has one role, gathered from the stages that read them (their OUTPUT_KEYS / TUNING_KEYS).

`output`: a rule's params or inputs (a change reruns what depends on it, so the outputs are a
clean run's with the new config); `tuning`: read by the jobs at run time or by a tool only
(threads, batch sizes, devices, pacing, prices: a change reruns nothing).
"""

from __future__ import annotations

from groundset.exports import emu3
from groundset.stages import caption, download, mask
from groundset.stages.filter import score
from groundset.stages.filter import shard as select

OUTPUT, TUNING = "output", "tuning"


def _under(section: str, keys: tuple[str, ...] | list[str]) -> list[str]:
    """`keys` of a config section as full dotted paths."""
    return [f"{section}.{key}" for key in keys]


def declared_roles() -> dict[str, set[str]]:
    """Every config key (or section) a stage names, with the roles it is given (one, normally)."""
    output = [
        "workdir", "sources", "shard_size",
        *_under("download", [*download.OUTPUT_KEYS, *download.PREFILTER_OUTPUT_KEYS]),
        *_under("filter", [*score.SCORE_KEYS, *select.SELECT_KEYS, "template", "aesthetics_tiers"]),
        *_under("caption", caption.OUTPUT_KEYS),
        *_under("caption", ["input", "chunk_size", "dedup.enabled", "dedup.max_distance"]),
        *_under("mask", [*mask.OUTPUT_KEYS, *mask.FLOOR_KEYS]),
        *_under("export", ["formats", "draw_n", "draw_seed", "webdataset.shard_size"]),
        *_under("export.emu3", emu3.OUTPUT_KEYS),
    ]  # fmt: skip
    tuning = [
        *_under("download", [*download.TUNING_KEYS, *download.PREFILTER_TUNING_KEYS]),
        *_under("filter", [*score.SCORE_TUNING_KEYS, "gpus"]),
        *_under("filter", [f"{op}.mem_required" for op in ("nsfw", "watermark", "aesthetics")]),
        *_under("caption", [*caption.TUNING_KEYS, "dedup.threads", "price_per_image"]),
        *_under("mask", mask.TUNING_KEYS),
        *_under("export.emu3", emu3.TUNING_KEYS),
    ]
    roles: dict[str, set[str]] = {}
    for role, keys in ((OUTPUT, output), (TUNING, tuning)):
        for key in keys:
            roles.setdefault(key, set()).add(role)
    return roles


def role_of(leaf: str, roles: dict[str, set[str]] | None = None) -> set[str]:
    """The roles of a config leaf: its own, or those of the nearest section named (a section's
    role covers its keys, e.g. filter.image_shape)."""
    roles = declared_roles() if roles is None else roles
    parts = leaf.split(".")
    for end in range(len(parts), 0, -1):
        found = roles.get(".".join(parts[:end]))
        if found:
            return found
    return set()
