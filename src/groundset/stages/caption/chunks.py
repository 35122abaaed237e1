"""Chunks: byte ranges of the caption input, one job each; their journals; their gathering.

A chunk job asks for what its journal lacks, then derives every output from the journal:
captioned records, an error side file (drop lines: `groundset.core.stats.drop_line`, with the
attempt count) and its stats (the envelope of `groundset.core.stats`). The
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from groundset.core.io import atomic_write, concat_chunks, dumps_record, read_json, write_json
from groundset.core.journal import Journal
from groundset.core.records import record_key, same_image
from groundset.core.stats import add_counts, drop_line, envelope, envelope_problems, write_stats
from groundset.stages.caption.asking import journaled_answer, request_pending
from groundset.stages.caption.endpoint import endpoint_for_run, uses_stand_in
from groundset.stages.caption.errors import CaptionError
from groundset.stages.caption.grounding import ERROR_DETAILS, Parsed, parse_answer
from groundset.stages.caption.settings import Settings, question_id
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
    "entities", "boxes", "without_entities", "from_journal", "requested", "attempts", "retries",
    "throttled", "not_sent", "api_errors", "parse_errors", "failed", "pending", "ungrounded",
)  # fmt: skip
UNGROUNDED = "no_valid_box"  # reason of a caption dropped for want of one valid box
GAVE_UP = "gave_up"  # reason of an image whose requests failed until max_attempts
PENDING = "pending"  # reason of an image never asked (reparse: no request is made)
STAGE = "caption"  # the `stage` of the stats envelope and the `drop_stage` of drop lines
SUMMED = (*COUNTS, "seconds", "journal_torn_lines")  # the extras the gather adds up


@dataclass
class Asked:
    """What asking came to, beside the journal: images not sent, and images given up on."""

    dropped: dict[str, dict] = field(default_factory=dict)
    gave_up: dict[str, dict] = field(default_factory=dict)


@dataclass
class Tally:
    """A chunk's counts as its records are settled: the envelope's and the stage's own."""

    counts: Counter = field(default_factory=lambda: Counter(dict.fromkeys(COUNTS, 0)))
    records_in: int = 0
    records_out: int = 0
    reasons: Counter = field(default_factory=Counter)
    boxes_dropped: Counter = field(default_factory=Counter)
    boxes_repaired: Counter = field(default_factory=Counter)
    stand_in: bool = False

    def drop(self, record: dict, count: str, reason: str, detail: str, **extras) -> dict:
        """Count a record the chunk lets go (under `count` and `reason`); its drop line."""
        self.counts[count] += 1
        self.reasons[reason] += 1
        return {**drop_line(record, STAGE, reason, detail), **extras}


def _ask_missing(
    records: Iterable[dict], settings: Settings, journal: Journal, retry_errors: bool,
    counts: Counter, asked: Asked, log_path: str,
) -> bool | None:  # fmt: skip
    """Request what the journal lacks; whether the endpoint opened is the stand-in (None: no
    endpoint was opened, every image being journaled or unsendable)."""
    opened: list[Settings] = []
    with contextlib.ExitStack() as endpoint:

        def connect() -> Settings:
            """The endpoint, opened when the first image is ready to be sent."""
            opened.append(endpoint.enter_context(endpoint_for_run(settings, log_path)))
            return opened[-1]

        request_pending(
            records, settings, journal, retry_errors, counts, asked.dropped, asked.gave_up, connect
        )
    return opened[-1].stand_in is True if opened else None


def _answer_for(
    journal: Journal, record: dict, question: str, settings: Settings, reparse: bool
) -> dict | None:
    """The journal's answer to this config's question about the record's image; reparse (no
    requests) takes the last answer journaled, whatever it was asked."""
    entry = journaled_answer(journal, record, question, settings.max_pixels) or (
        journal.done(record_key(record)) if reparse else None
    )
    if entry is not None and not same_image(entry, record):
        return None  # journaled for another image under this id (re-download)
    return entry


def _unanswered(record: dict, entry: dict | None, asked: Asked, tally: Tally) -> dict | None:
    """The drop line of a record with no answer to parse (not sent, given up on, never asked,
    an API error), or None when there is one."""
    key = record_key(record)
    if key in asked.dropped:
        drop = asked.dropped[key]
        return tally.drop(
            record, "not_sent", drop["reason"], drop["detail"], status="dropped", attempts=0
        )
    if key in asked.gave_up:
        failure = asked.gave_up[key]
        return tally.drop(
            record, "failed", GAVE_UP, failure["reason"], status="error",
            attempts=failure["attempts"], http_status=failure["http_status"],
            code=failure["code"],
        )  # fmt: skip
    if entry is None:
        return tally.drop(
            record, "pending", PENDING, "not requested (reparse)", status="error", attempts=0
        )
    if entry["status"] != "answered":
        return tally.drop(
            record, "api_errors", f"http_{entry.get('http_status')}_{entry.get('code')}",
            entry["reason"], status="error", attempts=entry["attempts"],
            http_status=entry.get("http_status"), code=entry.get("code"),
        )  # fmt: skip
    return None


def _settle(
    record: dict, entry: dict | None, settings: Settings, asked: Asked, tally: Tally
) -> tuple[dict | None, dict | None]:
    """One record of the chunk: (its captioned record, None) or (None, its drop line)."""
    line = _unanswered(record, entry, asked, tally)
    if line is not None:
        return None, line
    parsed = parse_answer(
        entry["answer"],
        settings.convention,
        image_size=(entry.get("width"), entry.get("height")),
        expect_json=settings.expects_json,
    )
    tally.boxes_dropped.update(parsed.dropped)
    answer = entry["answer"][:ANSWER_KEEP_CHARS]
    if parsed.error:
        return None, tally.drop(
            record, "parse_errors", parsed.error, ERROR_DETAILS[parsed.error], status="error",
            attempts=entry["attempts"], answer=answer,
        )  # fmt: skip
    if not parsed.entities and not settings.keep_ungrounded:
        # a caption without one valid box is not grounding data
        detail = (
            "no entity with a valid box (boxes dropped: "
            + (", ".join(f"{k} {n}" for k, n in sorted(parsed.dropped.items())) or "none given")
            + ")"
        )
        return None, tally.drop(
            record, "ungrounded", UNGROUNDED, detail, status="dropped",
            caption=parsed.caption, attempts=entry["attempts"], answer=answer,
        )  # fmt: skip
    return _captioned(record, entry, parsed, settings, tally), None


def _captioned(record: dict, entry: dict, parsed: Parsed, settings: Settings, tally: Tally) -> dict:
    """Count a kept caption; the record with its caption, entities and caption_meta."""
    tally.stand_in = tally.stand_in or bool(entry.get("stand_in"))  # placeholders, even reused
    tally.boxes_repaired.update(parsed.repaired)  # of the captions kept
    tally.records_out += 1
    tally.counts["entities"] += len(parsed.entities)
    tally.counts["boxes"] += sum(len(e["bboxes"]) for e in parsed.entities)
    tally.counts["without_entities"] += not parsed.entities
    meta = {
        "model": entry.get("model"),
        "backend": entry.get("backend"),
        "request_id": entry.get("request_id"),
        "convention": settings.convention,
        "boxes_dropped": sum(parsed.dropped.values()),
        "boxes_repaired": sum(parsed.repaired.values()),
    }
    return {**record, "caption": parsed.caption, "entities": parsed.entities, "caption_meta": meta}


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
    """Caption the records of one chunk (a byte range of `records_path`); returns its stats.

    Images already in the journal are not requested again (unless `retry_errors` and their
    entry is an error); `reparse` makes no request at all and rebuilds outputs from the journal.
    With `serve.command` the job starts its own server for the requests (output in `server_log`).
    """
    tally, asked = Tally(stand_in=uses_stand_in(settings)), Asked()
    began = time.monotonic()
    question = question_id(settings)
    with Journal(journal_path, variant="question") as journal:  # every question's answers
        if journal.torn_lines:
            tally.counts["journal_torn_lines"] = journal.torn_lines
        if not reparse:
            log_path = str(server_log or f"{journal_path}.server.log")
            records = iter_range(records_path, start, end)
            opened = _ask_missing(
                records, settings, journal, retry_errors, tally.counts, asked, log_path
            )
            tally.stand_in = tally.stand_in if opened is None else opened
        with atomic_write(output) as out, atomic_write(errors) as err_out:
            for record in iter_range(records_path, start, end):
                tally.records_in += 1
                entry = _answer_for(journal, record, question, settings, reparse)
                kept, line = _settle(record, entry, settings, asked, tally)
                (out if kept else err_out).write(dumps_record(kept or line) + "\n")
    result = _chunk_stats(tally, settings, [start, end], time.monotonic() - began)
    write_stats(stats, result)
    log.info(
        "%s bytes %d-%s: %d records, %d captioned, %d requested, %d errors/drops",
        records_path, start, end if end is not None else "end", tally.records_in,
        tally.records_out, tally.counts["requested"], tally.records_in - tally.records_out,
    )  # fmt: skip
    return result


def _chunk_stats(tally: Tally, settings: Settings, byte_range: list, seconds: float) -> dict:
    """A chunk's stats: the envelope, then the stage's own counts and facts."""
    return envelope(
        STAGE,
        records_in=tally.records_in,
        records_out=tally.records_out,
        dropped=tally.reasons,
        **dict(tally.counts),
        seconds=round(seconds, 3),
        range=byte_range,
        boxes_dropped=dict(tally.boxes_dropped),
        boxes_repaired=dict(tally.boxes_repaired),
        backend=settings.backend,
        model=settings.model,
        stand_in=tally.stand_in,
        rate_per_second=None if settings.serves else settings.rate_per_second,
    )


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
    order and total their stats; with `index`, the chunks must be those of the chunk index."""
    total: dict = {"records_in": 0, "records_out": 0, "dropped": {}}
    counts: Counter = Counter(dict.fromkeys(COUNTS, 0))
    boxes: Counter = Counter()
    repaired: Counter = Counter()
    meta: dict = {}
    per_chunk = concat_chunks([chunks, errors], [output, errors_out], stats, index)
    for path, chunk_stats in zip(stats, per_chunk, strict=True):
        problems = envelope_problems(chunk_stats)
        if problems:
            raise CaptionError(f"{path}: {'; '.join(problems)} (rerun its chunk)")
        add_counts(total, chunk_stats)
        boxes.update(chunk_stats["boxes_dropped"])
        repaired.update(chunk_stats["boxes_repaired"])
        meta["stand_in"] = meta.get("stand_in", False) or bool(chunk_stats["stand_in"])
        for key in ("backend", "model", "rate_per_second"):
            meta.setdefault(key, chunk_stats[key])
        counts.update({k: v for k, v in chunk_stats.items() if k in SUMMED})
    result = envelope(
        STAGE,
        **total,
        **meta,
        chunks=len(chunks),
        **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in counts.items()},
        boxes_dropped=dict(boxes),
        boxes_repaired=dict(repaired),
    )
    write_stats(stats_out, result)
    return result
