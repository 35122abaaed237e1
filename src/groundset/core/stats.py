"""The one stats envelope every stage writes, and the one line of every side file of drops.

Stats: `{"stage", "records_in", "records_out", "dropped": {reason: n}, ...extras}`, with
`records_in == records_out + sum(dropped.values())`: nothing a stage reads leaves it uncounted.
Drop lines: `{"key", "source", "image_id", "drop_stage", "drop_reason", "detail"?, ...record}`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from groundset.core.io import read_json, write_json
from groundset.core.records import RecordError, record_key

ENVELOPE = ("stage", "records_in", "records_out", "dropped")
DROP_FIELDS = ("key", "source", "image_id", "drop_stage", "drop_reason", "detail")


def envelope(
    stage: str, records_in: int, records_out: int, dropped: Mapping[str, int], **extras
) -> dict:
    """A stage's stats: the envelope's counts first (reasons sorted, zero counts kept), extras after."""
    head = {
        "stage": stage,
        "records_in": int(records_in),
        "records_out": int(records_out),
        "dropped": {str(reason): int(n) for reason, n in sorted(dropped.items())},
    }
    clash = set(head) & set(extras)
    if clash:
        raise ValueError(f"stats extras may not restate the envelope: {sorted(clash)}")
    return {**head, **extras}


def write_stats(path: str | os.PathLike, stats: dict) -> None:
    """Write a stage's stats (atomically), refusing one whose counts do not add up."""
    problems = envelope_problems(stats)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    write_json(path, stats)


def read_stats(path: str | os.PathLike) -> dict:
    """A stage's stats file, checked against the envelope."""
    stats = read_json(path)
    problems = envelope_problems(stats)
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return stats


def envelope_problems(stats: object) -> list[str]:
    """What makes `stats` no envelope, or one whose counts do not add up (empty if none)."""
    if not isinstance(stats, dict):
        return ["stats are not a JSON object"]
    missing = [key for key in ENVELOPE if key not in stats]
    if missing:
        return [f"stats lack {', '.join(missing)}"]
    dropped = stats["dropped"]
    if not isinstance(dropped, dict) or not all(isinstance(n, int) for n in dropped.values()):
        return ["`dropped` is not an object of counts"]
    total = stats["records_out"] + sum(dropped.values())
    if stats["records_in"] != total:
        return [
            f"records_in {stats['records_in']} != records_out {stats['records_out']}"
            f" + dropped {sum(dropped.values())}"
        ]
    return []


def add_counts(total: dict, stats: Mapping) -> dict:
    """Sum the envelope counts of `stats` into `total` (the gather of per-chunk stats)."""
    total["records_in"] = total.get("records_in", 0) + stats["records_in"]
    total["records_out"] = total.get("records_out", 0) + stats["records_out"]
    dropped = total.setdefault("dropped", {})
    for reason, n in stats["dropped"].items():
        dropped[reason] = dropped.get(reason, 0) + n
    return total


def safe_key(record: Mapping) -> str | None:
    """The record's `source/image_id` key, or None for a record too broken to have one."""
    try:
        return record_key(dict(record))
    except (RecordError, TypeError, AttributeError):
        return None


def drop_line(record: Mapping, stage: str, reason: str, detail: object = None) -> dict:
    """The side-file line of a record `stage` did not pass on: the drop fields, then the record."""
    head = {
        "key": safe_key(record),
        "source": record.get("source"),
        "image_id": record.get("image_id"),
        "drop_stage": stage,
        "drop_reason": reason,
    }
    if detail is not None:
        head["detail"] = detail
    return {**head, **{k: v for k, v in record.items() if k not in head and k != "detail"}}
