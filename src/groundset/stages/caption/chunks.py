"""Chunks: byte ranges of the caption input, one job each; their journals; their gathering.

A chunk job asks for what its journal lacks, then derives every output from the journal:
captioned records, an error side file (with the reason and the attempt count) and counts. The
chunk index keeps the journals in step with the chunk layout (answers move with their record).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from groundset.core.io import atomic_write, concat_chunks, dumps_record, read_json, write_json
from groundset.core.journal import Journal
from groundset.core.records import record_key, same_image
from groundset.stages.caption.asking import journaled_answer, request_pending
from groundset.stages.caption.grounding import parse_answer
from groundset.stages.caption.settings import (
    CaptionError,
    Settings,
    endpoint_for_run,
    question_id,
    uses_stand_in,
)
from groundset.stages.split import index_manifest

log = logging.getLogger(__name__)

ANSWER_KEEP_CHARS = 4000  # of an unparsable answer, in the error record


def iter_range(path: str | os.PathLike, start: int = 0, end: int | None = None) -> Iterator[dict]:
    """Stream the records of a JSONL file between byte offsets `start` and `end`."""
    with open(path, "rb") as handle:
        handle.seek(start)
        pos = start
        for line in handle:
            if end is not None and pos >= end:
                break
            pos += len(line)
            if line.strip():
                yield json.loads(line)


def chunk_range(
    index_path: str | os.PathLike, chunk: int, records_path: str | os.PathLike | None = None
) -> tuple[str, int, int]:
    """(input file, start, end) of chunk `chunk` of a chunk index (split's index format).

    `records_path` (the rule's input; default: the file the index names) must be the file the
    index was cut from, unchanged."""
    index = read_json(index_path)
    path = str(records_path or index["manifest"])
    if not 0 <= chunk < len(index["shards"]):
        raise CaptionError(
            f"chunk {chunk} is not in {index_path} ({len(index['shards'])} chunks): the plan is "
            "stale (the caption input changed); run the same command again"
        )
    if Path(path).stat().st_size != index["manifest_bytes"]:
        raise CaptionError(f"{path} changed since it was cut into chunks; rerun")
    entry = index["shards"][chunk]
    return path, entry["start"], entry["end"]


COUNTS = (
    "records", "captioned", "entities", "boxes", "without_entities", "from_journal",
    "requested", "attempts", "retries", "throttled", "dropped", "api_errors", "parse_errors",
    "failed", "pending", "ungrounded",
)  # fmt: skip
UNGROUNDED = "no_valid_box"  # reason of a caption dropped for want of one valid box


def caption_chunk(
    records_path: str | os.PathLike,
    output: str | os.PathLike,
    errors: str | os.PathLike,
    stats: str | os.PathLike,
    journal_path: str | os.PathLike,
    settings: Settings,
    start: int = 0,
    end: int | None = None,
    retry_errors: bool = False,
    reparse: bool = False,
    server_log: str | os.PathLike | None = None,
) -> dict:
    """Caption the records of one chunk (a byte range of `records_path`); returns the counts.

    Images already in the journal are not requested again (unless `retry_errors` and their
    entry is an error); `reparse` makes no request at all and rebuilds outputs from the journal.
    With `serve.command` the job starts its own server for the requests (output in `server_log`).
    """
    counts: Counter = Counter(dict.fromkeys(COUNTS, 0))
    reasons: Counter = Counter()
    boxes_dropped: Counter = Counter()
    boxes_repaired: Counter = Counter()
    dropped: dict[str, dict] = {}
    gave_up: dict[str, dict] = {}
    began = time.monotonic()
    stand_in = uses_stand_in(settings)
    question = question_id(settings)
    with Journal(journal_path, variant="question") as journal:  # every question's answers
        if journal.torn_lines:
            counts["journal_torn_lines"] = journal.torn_lines
        if not reparse:
            log_path = str(server_log or f"{journal_path}.server.log")
            with contextlib.ExitStack() as endpoint:

                def connect() -> Settings:
                    """The endpoint, opened when the first image is ready to be sent."""
                    nonlocal stand_in
                    run_settings = endpoint.enter_context(endpoint_for_run(settings, log_path))
                    stand_in = run_settings.stand_in is True
                    return run_settings

                request_pending(
                    iter_range(records_path, start, end), settings, journal, retry_errors,
                    counts, dropped, gave_up, connect,
                )  # fmt: skip
        with atomic_write(output) as out, atomic_write(errors) as err_out:
            for record in iter_range(records_path, start, end):
                counts["records"] += 1
                key = record_key(record)
                base = {"key": key, "image_id": record.get("image_id"),
                        "source": record.get("source"), "image": record.get("image"),
                        "stage": "caption"}  # fmt: skip
                if key in dropped:
                    counts["dropped"] += 1
                    reasons[dropped[key]["reason"]] += 1
                    err_out.write(dumps_record({**base, **dropped[key], "attempts": 0}) + "\n")
                    continue
                # the answer to this config's question; reparse (no requests) takes the last
                # answer journaled, whatever it was asked
                entry = journaled_answer(journal, record, question, settings.max_pixels) or (
                    journal.done(key) if reparse else None
                )
                if entry is not None and not same_image(entry, record):
                    entry = None  # journaled for another image under this id (re-download)
                if entry is None or key in gave_up:  # never asked, or this run's asking failed
                    failure = gave_up.get(key) or {"reason": "not requested (reparse)",
                                                   "attempts": 0}  # fmt: skip
                    counts["failed" if key in gave_up else "pending"] += 1
                    reasons["gave_up" if key in gave_up else "pending"] += 1
                    err_out.write(dumps_record({**base, **failure, "status": "error"}) + "\n")
                    continue
                if entry["status"] != "answered":
                    counts["api_errors"] += 1
                    reasons[f"http_{entry.get('http_status')}_{entry.get('code')}"] += 1
                    err_out.write(dumps_record({**base, **entry}) + "\n")
                    continue
                parsed = parse_answer(
                    entry["answer"],
                    settings.convention,
                    image_size=(entry.get("width"), entry.get("height")),
                    expect_json=settings.expects_json,
                )
                boxes_dropped.update(parsed.dropped)
                if parsed.error:
                    counts["parse_errors"] += 1
                    reasons[parsed.error] += 1
                    err_out.write(
                        dumps_record({**base, "status": "error", "reason": parsed.error,
                                      "attempts": entry["attempts"],
                                      "answer": entry["answer"][:ANSWER_KEEP_CHARS]})
                        + "\n"
                    )  # fmt: skip
                    continue
                if not parsed.entities and not settings.keep_ungrounded:
                    # a caption without one valid box is not grounding data
                    counts["ungrounded"] += 1
                    reasons[UNGROUNDED] += 1
                    err_out.write(
                        dumps_record({**base, "status": "dropped", "reason": UNGROUNDED,
                                      "caption": parsed.caption, "attempts": entry["attempts"],
                                      "answer": entry["answer"][:ANSWER_KEEP_CHARS]})
                        + "\n"
                    )  # fmt: skip
                    continue
                stand_in = stand_in or bool(entry.get("stand_in"))  # placeholders, even reused
                boxes_repaired.update(parsed.repaired)  # of the captions kept
                counts["captioned"] += 1
                counts["entities"] += len(parsed.entities)
                counts["boxes"] += sum(len(e["bboxes"]) for e in parsed.entities)
                counts["without_entities"] += not parsed.entities
                out_record = {**record, "caption": parsed.caption, "entities": parsed.entities}
                out_record["caption_meta"] = {
                    "model": entry.get("model"),
                    "backend": entry.get("backend"),
                    "request_id": entry.get("request_id"),
                    "convention": settings.convention,
                    "boxes_dropped": sum(parsed.dropped.values()),
                    "boxes_repaired": sum(parsed.repaired.values()),
                }
                out.write(dumps_record(out_record) + "\n")
    counts["seconds"] = round(time.monotonic() - began, 3)
    result = {
        **dict(counts),
        "range": [start, end],
        "error_reasons": dict(reasons),
        "boxes_dropped": dict(boxes_dropped),
        "boxes_repaired": dict(boxes_repaired),
        "backend": settings.backend,
        "model": settings.model,
        "stand_in": stand_in,
        "rate_per_second": None if settings.serves else settings.rate_per_second,
    }
    write_json(stats, result)
    log.info(
        "%s bytes %d-%s: %d records, %d captioned, %d requested, %d errors/drops",
        records_path,
        start,
        end if end is not None else "end",
        counts["records"],
        counts["captioned"],
        counts["requested"],
        counts["records"] - counts["captioned"],
    )
    return result


# --- chunk index, journal layout, gathering ---------------------------------------------------


def _layout(index: dict) -> dict:
    """What decides which records a chunk holds (a changed layout moves journaled answers)."""
    return {
        "input": index["manifest"],
        "bytes": index["manifest_bytes"],
        "chunk_size": index["shard_size"],
        "ranges": [[c["start"], c["end"]] for c in index["shards"]],
    }


def journal_name(chunk: int) -> str:
    """File name of chunk `chunk`'s journal."""
    return f"chunk_{chunk}.jsonl"


def rebucket_journals(journal_dir: str | os.PathLike, index: dict) -> dict:
    """Move journaled entries to the chunk that now holds their record (after the input or the
    chunk size changed), so no answer is paid for (and no mask computed) twice. Entries whose
    record left the input are kept in `orphans.jsonl` and move back when their record returns.
    Only the journals' lines move (`chunk_*.jsonl`); anything else in the folder is dropped.
    Returns counts."""
    journal_dir = Path(journal_dir)
    orphans = journal_dir / "orphans.jsonl"
    # orphans first: an answer journaled later for the same key comes after it and wins
    old_files = [orphans] * orphans.exists() + sorted(journal_dir.glob("chunk_*.jsonl"))
    counts = {"moved_entries": 0, "orphans": 0}
    if not old_files:
        return counts
    where: dict[str, int] = {}
    for entry in index["shards"]:
        for record in iter_range(index["manifest"], entry["start"], entry["end"]):
            where[record_key(record)] = entry["shard"]
    fresh = journal_dir.with_name(journal_dir.name + ".rebucket")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    for old in old_files:
        groups: dict[str, list[str]] = {}
        with open(old, encoding="utf-8") as handle:
            for line in handle:
                try:
                    key = str(json.loads(line)["key"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line
                chunk = where.get(key)
                name = "orphans.jsonl" if chunk is None else journal_name(chunk)
                counts["orphans" if chunk is None else "moved_entries"] += 1
                groups.setdefault(name, []).append(line if line.endswith("\n") else line + "\n")
        for name, lines in groups.items():
            with open(fresh / name, "a", encoding="utf-8") as out:
                out.writelines(lines)
    for path in fresh.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    stale = journal_dir.with_name(journal_dir.name + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    journal_dir.rename(stale)
    fresh.rename(journal_dir)
    shutil.rmtree(stale)
    return counts


def index_chunks(
    records_path: str | os.PathLike,
    index_path: str | os.PathLike,
    chunk_size: int,
    journal_dir: str | os.PathLike,
    *more_journal_dirs: str | os.PathLike,
) -> dict:
    """Cut the input into chunks of `chunk_size` records (byte ranges) and keep the journals of
    every per-chunk stage (captions, masks) in step with the chunk layout."""
    index = index_manifest(records_path, chunk_size)
    for directory in (journal_dir, *more_journal_dirs):
        keep_journals_in_step(directory, index)
    write_json(index_path, index)
    return index


def keep_journals_in_step(journal_dir: str | os.PathLike, index: dict) -> None:
    """Move a stage's journaled entries to the chunks that now hold their records when the
    chunk layout changed since the journals were written (their `layout.json`)."""
    journal_dir = Path(journal_dir)
    layout_file = journal_dir / "layout.json"
    layout = _layout(index)
    previous = read_json(layout_file) if layout_file.exists() else None
    if previous is not None and previous != layout:
        counts = rebucket_journals(journal_dir, index)
        log.warning(
            "%s: chunk layout changed (input or chunk_size): %d journaled entries moved to "
            "their new chunks, %d kept in orphans.jsonl (their records left the input)",
            journal_dir,
            counts["moved_entries"],
            counts["orphans"],
        )
    journal_dir.mkdir(parents=True, exist_ok=True)
    write_json(layout_file, layout)


def gather_chunks(
    chunks: list[str],
    errors: list[str],
    stats: list[str],
    output: str | os.PathLike,
    errors_out: str | os.PathLike,
    stats_out: str | os.PathLike,
    index: str | os.PathLike | None = None,
) -> dict:
    """Concatenate chunk outputs and their error files (lists aligned with `stats`) in chunk
    order and total their counts; with `index`, the chunks must be those of the chunk index."""
    totals: Counter = Counter(dict.fromkeys(COUNTS, 0))
    reasons: Counter = Counter()
    boxes: Counter = Counter()
    repaired: Counter = Counter()
    meta: dict = {}
    for chunk_stats in concat_chunks([chunks, errors], [output, errors_out], stats, index):
        chunk_stats.pop("range", None)
        reasons.update(chunk_stats.pop("error_reasons", {}))
        boxes.update(chunk_stats.pop("boxes_dropped", {}))
        repaired.update(chunk_stats.pop("boxes_repaired", {}))
        stand_in = bool(chunk_stats.pop("stand_in", False))
        meta["stand_in"] = meta.get("stand_in", False) or stand_in
        for key in ("backend", "model", "rate_per_second"):
            meta.setdefault(key, chunk_stats.get(key))
            chunk_stats.pop(key, None)
        totals.update({k: v for k, v in chunk_stats.items() if isinstance(v, int | float)})
    result = {
        **meta,
        "chunks": len(chunks),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in totals.items()},
        "error_reasons": dict(reasons),
        "boxes_dropped": dict(boxes),
        "boxes_repaired": dict(repaired),
    }
    write_json(stats_out, result)
    return result
