"""Merge stage: stream the filtered shards into aesthetic tiers (DESIGN.md: merged_output, aes_6)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.stats import envelope, write_stats
from groundset.stages.filter.shard import AESTHETICS_KEY, STATS

log = logging.getLogger(__name__)

TIER_FILES = ("merged_output.jsonl", "aes_6.jsonl")


def aesthetic_score(record: dict) -> float | None:
    """The record's aesthetic score on 0-10 (the best of its images, like data-juicer's `any`)."""
    scores = (record.get(STATS) or {}).get(AESTHETICS_KEY) or []
    return max(scores) if scores else None


def image_id(record: dict) -> str:
    """The record's image id, derived from its image file name when missing."""
    if record.get("image_id"):
        return str(record["image_id"])
    image = record["image"][0] if isinstance(record["image"], list) else record["image"]
    return Path(image).stem


def merge_tiers(
    inputs: list[str | os.PathLike],
    outputs: tuple[str | os.PathLike, str | os.PathLike],
    tiers: list[float],
    stats_path: str | os.PathLike | None = None,
) -> dict:
    """Write records scoring >= tiers[0] to outputs[0] (merged_output.jsonl) and >= tiers[1] to
    outputs[1] (aes_6.jsonl); return the stats envelope (records out: the first tier's; the
    tiers' counts in `per_tier`, keyed by those names, TIER_FILES)."""
    if len(set(map(str, inputs))) != len(inputs):
        raise ValueError("the same shard is listed twice in the merge inputs")
    counts: Counter = Counter()
    per_source: dict[str, Counter] = {}
    with (
        atomic_write(outputs[0]) as low,
        atomic_write(outputs[1]) as high,
        tqdm(unit="rec", desc="merge", mininterval=5) as bar,
    ):
        for path in inputs:
            for record in iter_jsonl(path):
                counts["records_in"] += 1
                source = per_source.setdefault(record.get("source", ""), Counter())
                score = aesthetic_score(record)
                if score is None:
                    counts["no_score"] += 1
                    continue
                record["image_id"] = image_id(record)
                line = dumps_record(record) + "\n"
                if score < tiers[0]:
                    counts["below_first_tier"] += 1
                if score >= tiers[0]:
                    low.write(line)
                    counts[TIER_FILES[0]] += 1
                    source[TIER_FILES[0]] += 1
                if score >= tiers[1]:
                    high.write(line)
                    counts[TIER_FILES[1]] += 1
                    source[TIER_FILES[1]] += 1
                bar.update()
    stats = envelope(
        "merge",
        counts["records_in"],
        counts[TIER_FILES[0]],
        {"no_score": counts["no_score"], "below_first_tier": counts["below_first_tier"]},
        tiers={TIER_FILES[0]: tiers[0], TIER_FILES[1]: tiers[1]},
        per_tier={name: counts[name] for name in TIER_FILES},
        shards=len(inputs),
        per_source={name: {t: c[t] for t in TIER_FILES} for name, c in sorted(per_source.items())},
    )
    if stats_path:
        write_stats(stats_path, stats)
    log.info("merged %d shards: %s", len(inputs), stats["per_tier"])
    return stats
