"""Trace one image through a run: every stage's verdict on it, and why, read from the stage files.

`trace(workdir, "SOURCE/IMAGE_ID", config)` follows one record from its URL-list row to the
exports; a key with "://" in it is a URL (optionally `SOURCE/URL`), which also reaches rows the
pre-download filter dropped (they never get an image id). Nothing is loaded whole: JSON Lines
are streamed in blocks and only lines holding the image id (a byte search before any
`json.loads`) are parsed; the manifest, sorted by image id as the manifest stage writes it, is
bisected, and its offset names the one shard whose probe, score and select files are read.

How an image maps to its URL-list row: the provenance the pre-download filter writes on every
row it passes on (`url_list_file`, `url_list_row`), which img2dataset saves in its shard tables
and the manifest keeps on every record; a row the prefilter dropped is a drop line of
`url_lists/<source>/<part>_dropped.parquet`. Nothing of img2dataset's key numbering is
re-derived.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tarfile
from pathlib import Path

import ijson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from groundset.core import layout
from groundset.core.config import download_options, find_source, validate_config
from groundset.core.io import clean_json_value, read_json
from groundset.core.io import contains_bytes as _contains
from groundset.core.io import scan_lines as _scan
from groundset.stages.filter.shard import AESTHETICS_KEY, STATS
from groundset.stages.merge import TIER_FILES
from groundset.stages.parts import image_id, key_of, part_of
from groundset.stages.prefilter import PROVENANCE, PrefilterRules, list_parquet_files, open_parquet

KEPT = "kept"
DROPPED = "dropped"
NOT_RUN = "not run yet"
NOT_REACHED = "not reached"
NOT_FOUND = "not found"
OFF = "off"
UNKNOWN = "unknown"

# Each stage's verdict, in order (a `_Tracer` method of each name, spaces as underscores).
STAGES = ("prefilter", "download", "manifest", "probe", "score", "select", "tier", "dedup",
          "caption", "mask", "export emu3", "export coco", "export odvg", "export webdataset")  # fmt: skip
WINDOW = 1 << 20  # the bisection of a sorted file stops at this many bytes, then scans
SCORE_NAMES = {
    AESTHETICS_KEY: "aesthetics",
    "image_nsfw_score": "nsfw",
    "image_watermark_prob": "watermark",
    "image_width": "width",
    "image_height": "height",
    "aspect_ratios": "aspect_ratio",
}
CHUNK = re.compile(r"chunk_(\d+)\.jsonl")
CHUNK_SIDE = re.compile(r"chunk_(\d+)_(errors|dropped)\.jsonl")


def _short(value: object, limit: int = 100) -> object:
    """A long string cut to `limit` characters (other values as they are)."""
    if isinstance(value, str) and len(value) > limit:
        return value[: limit - 1] + "…"
    return value


def _scores(stats: dict) -> dict:
    """The filter stats of a record by short name (first image), e.g. {"aesthetics": 6.2}."""
    out = {}
    for key, name in SCORE_NAMES.items():
        values = stats.get(key) or []
        if values:
            out[name] = round(values[0], 6) if isinstance(values[0], float) else values[0]
    return out


def _why(reason: str, row: dict, rules: PrefilterRules) -> str:
    """A prefilter reason with the row's values and the rule it broke."""
    width = row.get("WIDTH", row.get("width"))
    height = row.get("HEIGHT", row.get("height"))
    if reason == "too_small":
        return f"too_small: {width} x {height} below {rules.min_width} x {rules.min_height}"
    if reason == "aspect_ratio" and width and height:
        return f"aspect_ratio: {width / height:.4g} outside [{rules.min_ratio}, {rules.max_ratio}]"
    if reason in ("punsafe", "pwatermark"):
        limit = rules.max_punsafe if reason == "punsafe" else rules.max_pwatermark
        return f"{reason}: {row.get(reason)} > {limit}"
    if reason == "missing_url":
        return "missing_url: no URL in the row"
    return reason


def _read_row(path: Path, row: int) -> dict:
    """Row `row` of a parquet file (one row group read)."""
    with open_parquet(path) as parquet:
        for group in range(parquet.num_row_groups):
            count = parquet.metadata.row_group(group).num_rows
            if row < count:
                table = parquet.read_row_group(group)
                return clean_json_value(table.slice(row, 1).to_pylist()[0])
            row -= count
    raise IndexError(f"{path} has no row {row}")


def drop_text(line: dict) -> str:
    """What a drop line says: its reason, and its detail where that says more."""
    reason, detail = str(line.get("drop_reason")), line.get("detail")
    if detail is None or str(detail) == reason:
        return reason
    return str(detail) if str(detail).startswith(reason) else f"{reason}: {detail}"


def _first_row(path: Path, column: str, value: object) -> dict | None:
    """The first row of a parquet file whose `column` is `value` (None: none, or no column)."""
    with open_parquet(path) as parquet:
        if column not in parquet.schema_arrow.names:
            return None
    rows = pq.read_table(path, filters=[(column, "=", value)]).slice(0, 1).to_pylist()
    return clean_json_value(rows[0]) if rows else None


def floored_entities(before: dict, after: dict) -> list[str]:
    """The entities of a mask job's record (`before`) the quality floors took out of the
    gathered one (`after`), each with its score and inside fraction."""
    kept = {(e.get("entity"), tuple(e.get("bbox") or ())) for e in after.get("entities") or []}
    entities = before.get("entities") or []
    scores = before.get("mask_scores") or [None] * len(entities)
    inside = before.get("mask_inside_fraction") or [None] * len(entities)
    return [
        f"{entity.get('entity')} (score {score}, inside {fraction})"
        for entity, score, fraction in zip(entities, scores, inside, strict=False)
        if (entity.get("entity"), tuple(entity.get("bbox") or ())) not in kept
    ]


class _Tracer:
    """One trace: the workdir, the config, the key, and the stages' verdicts as they come."""

    def __init__(self, workdir: Path, config: dict | None) -> None:
        """Start a trace over `workdir` (config: validated, or None)."""
        self.work = workdir
        self.config = config
        self.stages: list[dict] = []
        self.found_in: list[str] = []
        self.source = ""
        self.image_id: str | None = None
        self.origin: dict | None = None  # the URL-list row's provenance (or its drop line)
        self.download_hit: tuple[Path, dict] | None = None  # its img2dataset table row
        self.download_ok: bool | None = None
        self.offset: int | None = None  # the record's byte offset in the manifest
        self.shard: int | None = None
        self.image: str | None = None
        self.stats: dict = {}
        self.masked_line: int | None = None
        self.row_url: str | None = None  # the URL of the image's URL-list row
        self.dropped_at: str | None = None

    # --- bookkeeping ---------------------------------------------------------------------

    def add(self, stage: str, verdict: str, **details: object) -> None:
        """Record one stage's verdict (the first drop before the exports ends the trace's reach:
        the exports are side by side, one leaving an image out says nothing of the others)."""
        clean = {k: v for k, v in details.items() if v is not None}
        self.stages.append({"stage": stage, "verdict": verdict, "details": clean})
        if verdict == DROPPED and self.dropped_at is None and not stage.startswith("export "):
            self.dropped_at = stage

    def at(self, pattern: str, **wildcards: object) -> Path:
        """A layout pattern of this source and the image's download part (and `wildcards`)
        under the workdir."""
        part = part_of(self.image_id) if self.image_id else None
        wildcards = {"download_part": part or "", **wildcards}
        return Path(layout.under(self.work, pattern, source=self.source, **wildcards))

    def parts(self, pattern: str) -> list[Path]:
        """The files of a per-download-part layout pattern of this source, every part's."""
        return sorted(self.work.glob(pattern.format(source=self.source, download_part="*")))

    def rel(self, path: Path) -> str:
        """`path` relative to the workdir when it is under it."""
        try:
            return str(path.relative_to(self.work))
        except ValueError:
            return str(path)

    def found(self, path: Path, where: str = "") -> None:
        """Note a file that holds the record."""
        self.found_in.append(self.rel(path) + where)

    def ours(self, record: dict) -> bool:
        """Whether a parsed line is this trace's record."""
        if not isinstance(record, dict):
            return False
        key = f"{self.source}/{self.image_id}"
        if record.get("key") == key or record.get("name") == key:
            return True
        return str(record.get("image_id")) == self.image_id and record.get("source") == self.source

    def lookup(self, paths: list[Path], count_lines: bool = False) -> tuple[Path, dict] | None:
        """The first of `paths` (those that exist) holding the record, and the record."""
        needle = json.dumps(self.image_id, ensure_ascii=False).encode()
        for path in paths:
            if not path.is_file():
                continue
            for _, lineno, line in _scan(path, needle, count_lines=count_lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if self.ours(record):
                    if count_lines:
                        record["_line"] = lineno
                    self.found(path)
                    return path, record
        return None

    # --- configuration -------------------------------------------------------------------

    def source_config(self) -> dict | None:
        """This source's entry in the config (None without a config or a matching entry)."""
        if self.config is None:
            return None
        try:
            return find_source(self.config, self.source)
        except KeyError:
            return None

    def download_opts(self) -> dict | None:
        """The source's effective `download` settings (None without a config)."""
        entry = self.source_config()
        return None if entry is None else download_options(self.config, entry)

    def rules(self) -> PrefilterRules | None:
        """The prefilter rules of the run (its stats file), else of the config."""
        for stats in self.parts(layout.PREFILTER.stats)[:1]:
            saved = read_json(stats).get("rules")
            try:
                return PrefilterRules(**saved)
            except TypeError:  # no rules saved, or another version's: the config's
                pass
        opts = self.download_opts()
        return None if opts is None else PrefilterRules.from_config(self.config, opts)

    def original_files(self) -> list[Path]:
        """The parquet files of the source's URL list as the config names it ([] if unknown)."""
        entry = self.source_config()
        if entry is None:
            return []
        try:
            return list_parquet_files(entry["url_list"])
        except FileNotFoundError:
            return []

    def original_file(self, name: str) -> Path | None:
        """The source's URL-list file `name` (a `url_list_file`: relative to its url_list)."""
        for path in self.original_files():
            root = Path(self.source_config()["url_list"])
            if path.relative_to(root if root.is_dir() else root.parent).as_posix() == name:
                return path
        return None

    # --- where the image came from -------------------------------------------------------

    def locate(self, url: str | None) -> None:
        """Find the image's img2dataset table row (by key, or by URL) and its URL-list row
        (its provenance); for a URL the prefilter dropped, that drop line."""
        url_col = (self.rules() or PrefilterRules.from_config({})).url_col
        if url is not None:
            for dropped in self.parts(layout.PREFILTER.dropped):
                if (line := _first_row(dropped, "url", url)) is not None:
                    self.found(dropped)
                    self.origin = {**line, "dropped": True}
                    return
            for path in self.parts(layout.PREFILTER.records):
                if (row := _first_row(path, url_col, url)) is not None:
                    self.found(path)
                    self.origin = row
                    break
            self.download_hit = self.table_row("url", url)
            if self.download_hit is not None:
                table, row = self.download_hit  # its part: the folder of the table
                self.image_id = image_id(table.parent.name, str(row.get("key")))
            return
        self.download_hit = self.key_row()
        if self.download_hit is not None:
            self.origin = self.download_hit[1]

    def key_row(self) -> tuple[Path, dict] | None:
        """The image's img2dataset row: in its shard's table (the manifest record's folder
        names it), else its download drop line, else in any table (a run without drop lines)."""
        manifest = self.at(layout.MANIFEST.records)
        hit = self.bisect(manifest) if manifest.exists() else None
        key = key_of(self.image_id)  # img2dataset's, within the part
        if hit is not None:
            image = hit[1].get("image")
            folder = Path(str(image[0] if isinstance(image, list) and image else image)).parent
            table = folder.parent / f"{folder.name}.parquet"
            if table.exists() and (row := _first_row(table, "key", key)) is not None:
                return table, row
        part = part_of(self.image_id)
        dropped = self.at(layout.DOWNLOAD.dropped, download_part=part) if part else None
        found = self.lookup([dropped]) if dropped and dropped.exists() else None
        return found or self.table_row("key", key, part)

    def table_row(
        self, column: str, value: object, part: str | None = None
    ) -> tuple[Path, dict] | None:
        """The first img2dataset shard table row of the source (of its download `part`: None,
        any) whose `column` is `value`."""
        folders = layout.DOWNLOAD.records.format(source=self.source, download_part=part or "*")
        for table in sorted(self.work.glob(f"{folders}/*.parquet")):
            row = _first_row(table, column, value)
            if row is not None:
                return table, row
        return None

    def url_in_original(self, url: str) -> bool:
        """Find a URL in the config's URL list (the prefilter has not run): its row."""
        url_col = (self.rules() or PrefilterRules.from_config({})).url_col
        for path in self.original_files():
            with open_parquet(path) as parquet:
                if url_col not in parquet.schema_arrow.names:
                    continue
                urls = pq.read_table(path, columns=[url_col])[url_col]
            index = pc.index(pc.cast(urls, pa.string()), url).as_py()
            if index >= 0:
                self.origin = {PROVENANCE[0]: path.name, PROVENANCE[1]: index, "unfiltered": True}
                return True
        return False

    # --- stages --------------------------------------------------------------------------

    def listed_row(self) -> dict:
        """The image's row of the URL list (the config's file, else the prefiltered copy)."""
        name, number = self.origin.get(PROVENANCE[0]), self.origin.get(PROVENANCE[1])
        original = self.original_file(name) if name else None
        if original is not None:
            self.found(original, f": row {number}")
            return _read_row(original, number)
        for kept in self.parts(layout.PREFILTER.records):
            rows = pq.read_table(kept, filters=[(PROVENANCE[0], "=", name),
                                                (PROVENANCE[1], "=", number)]).to_pylist()  # fmt: skip
            if rows:
                return clean_json_value(rows[0])
        return {}

    def prefilter(self) -> None:
        """The URL-list row of the image (its provenance) and the prefilter's verdict on it."""
        if self.origin is None or self.origin.get(PROVENANCE[1]) is None:
            if not self.at(layout.URL_LISTS).is_dir():
                return self.add("prefilter", NOT_RUN)
            why = "no provenance: the image's URL-list row is not recorded (an older run?)"
            return self.add("prefilter", UNKNOWN, reason=why)
        rules = self.rules()
        row = self.listed_row()
        url_col = rules.url_col if rules else "URL"
        details = {
            "url_list_file": self.origin[PROVENANCE[0]],
            "row": self.origin[PROVENANCE[1]],
            "url": row.get(url_col, self.origin.get("url")),
            "width": row.get("WIDTH", row.get("width")),
            "height": row.get("HEIGHT", row.get("height")),
        }
        if self.origin.get("dropped"):
            reason = self.origin["drop_reason"]
            why = _why(reason, row, rules) if rules else reason
            return self.add("prefilter", DROPPED, reason=why, **details)
        self.row_url = details["url"]
        self.add("prefilter", NOT_RUN if self.origin.get("unfiltered") else KEPT, **details)

    def download(self) -> None:
        """img2dataset's status for the image (its row of the shard tables)."""
        if not self.at(layout.DOWNLOADS).is_dir():
            return self.add("download", NOT_RUN)
        if self.download_hit is None:
            done = bool(self.parts(layout.DOWNLOAD.stats))
            what = f"key {self.image_id}" if self.image_id else "row of its URL"
            reason = f"no {what} in the shard tables of downloads/{self.source}"
            return self.add("download", NOT_FOUND if done else NOT_RUN, reason=reason)
        table, row = self.download_hit
        self.found(table)
        status = row.get("status", "success")
        details = {
            "status": status,
            "url": row.get("url"),
            "width": row.get("width"),
            "height": row.get("height"),
            "original_size": (
                f"{row['original_width']} x {row['original_height']}"
                if row.get("original_width") is not None
                else None
            ),
            "shard": self.rel(table),
        }
        if self.row_url and row.get("url") and row["url"] != self.row_url:
            details["warning"] = "not the URL of its URL-list row: did the URL list change?"
        self.download_ok = status == "success"
        if not self.download_ok:
            reason = f"{status}: {row.get('error_message')}"
            return self.add("download", DROPPED, reason=reason, **details)
        self.add("download", KEPT, **details)

    def bisect(self, path: Path) -> tuple[int, dict] | None:
        """The record in a manifest sorted by image id (as the manifest stage writes it), found
        by bisecting byte offsets; None when the window it must be in does not hold it."""
        target = (len(self.image_id), self.image_id)
        low, high = 0, path.stat().st_size  # the record starts in [low, high)
        with open(path, "rb") as handle:
            while high - low > WINDOW:
                middle = (low + high) // 2
                handle.seek(middle)
                handle.readline()
                start = handle.tell()
                line = handle.readline()
                if start >= high or not line:
                    high = middle + 1
                    continue
                try:
                    found = str(json.loads(line).get("image_id"))
                except ValueError:
                    return None
                if (len(found), found) < target:
                    low = start + len(line)
                else:
                    high = start + (found == self.image_id)
        needle = json.dumps(self.image_id, ensure_ascii=False).encode()
        for offset, _, line in _scan(path, needle, low):
            if offset >= high:
                break
            record = json.loads(line)
            if self.ours(record):
                return offset, record
        return None

    def manifest(self) -> None:
        """The manifest record (bisected; a full scan only when it should be there)."""
        path = self.at(layout.MANIFEST.records)
        if not path.exists():
            return self.add("manifest", NOT_RUN)
        hit = self.bisect(path)
        if hit is None and self.download_ok is not False:
            needle = json.dumps(self.image_id, ensure_ascii=False).encode()
            for offset, _, line in _scan(path, needle):
                record = json.loads(line)
                if self.ours(record):
                    hit = offset, record
                    break
        if hit is None:
            if self.download_ok:
                reason = "not in the manifest: its sidecar was unreadable or its image file missing"
                return self.add("manifest", DROPPED, reason=reason)
            return self.add("manifest", NOT_FOUND)
        self.offset, record = hit
        self.found(path)
        self.image = record["image"][0] if isinstance(record.get("image"), list) else None
        index = self.at(layout.SHARD_INDEX)
        if index.exists():
            plan = read_json(index)
            if plan.get("manifest_bytes") == path.stat().st_size:
                for entry in plan["shards"]:
                    if entry["start"] <= self.offset < entry["end"]:
                        self.shard = entry["shard"]
        details = {
            "image": self.image,
            "size": f"{record.get('width')} x {record.get('height')}",
            "text": _short(record.get("text"), 60),
            "byte_offset": self.offset,
            "shard": self.shard,
        }
        self.add("manifest", KEPT, **details)

    def shard_files(self, stage: str, suffix: str = "") -> list[Path]:
        """The files of a per-shard stage that may hold the record: its shard's, else all."""
        folder = self.work / stage / self.source / (part_of(self.image_id) or "")
        if self.shard is not None:
            return [folder / f"shard_{self.shard}{suffix}.jsonl"]
        pattern = re.compile(rf"shard_\d+{suffix}\.jsonl")
        return sorted(p for p in folder.glob("shard_*.jsonl") if pattern.fullmatch(p.name))

    def kept_or_dropped(self, stage: str, dropped: list[Path], kept: list[Path],
                        missing: str | None = None, count_lines: bool = False
                        ) -> tuple[Path, dict] | None:  # fmt: skip
        """The record in a stage's kept files; else None, its verdict recorded: not run (no file
        yet), dropped (its drop line's reason) or not found (`missing` says why)."""
        if not any(p.exists() for p in dropped + kept):
            return self.add(stage, NOT_RUN)
        hit = self.lookup(dropped)
        if hit is not None:
            return self.add(stage, DROPPED, reason=drop_text(hit[1]), file=self.rel(hit[0]))
        hit = self.lookup(kept, count_lines=count_lines)
        return hit if hit is not None else self.add(stage, NOT_FOUND, reason=missing)

    def probe(self) -> None:
        """Whether the probe could decode the image (its drop file names why not)."""
        hit = self.kept_or_dropped("probe", self.shard_files("probed", "_dropped"),
                                   self.shard_files("probed"))  # fmt: skip
        if hit is not None:
            self.add("probe", KEPT, file=self.rel(hit[0]))

    def score(self) -> None:
        """The five filters' scores data-juicer computed for the image."""
        hit = self.kept_or_dropped("score", [], self.shard_files("scored"))
        if hit is not None:
            self.stats = hit[1].get(STATS) or {}
            self.add("score", KEPT, file=self.rel(hit[0]), **_scores(self.stats))

    def select(self) -> None:
        """The thresholds' verdict: kept in filtered/, or the filter that dropped it and why."""
        rejected, kept = self.shard_files("rejected"), self.shard_files("filtered")
        if not any(p.exists() for p in rejected + kept):
            return self.add("select", NOT_RUN)
        hit = self.lookup(rejected)
        if hit is not None:
            record = hit[1]
            self.stats = record.get(STATS) or self.stats
            return self.add(
                "select",
                DROPPED,
                reason=drop_text(record),
                filter=record.get("drop_reason"),
                file=self.rel(hit[0]),
                **_scores(self.stats),
            )
        hit = self.lookup(kept)
        if hit is None:
            return self.add("select", NOT_FOUND)
        self.stats = hit[1].get(STATS) or self.stats
        self.add("select", KEPT, file=self.rel(hit[0]))

    def caption_input(self) -> str:
        """The file the captioning reads (caption.input), relative to the workdir."""
        caption = (self.config or {}).get("caption") or {}
        return str(caption.get("input") or f"merged/{TIER_FILES[1]}")

    def held_in_tiers(self, tiers: dict, aesthetics: float | None) -> dict[str, bool]:
        """Per tier file that exists, whether it holds the image (a score below the tier's
        bound says no without a read)."""
        held = {}
        for name in TIER_FILES:
            path = self.at(layout.MERGED).with_name(name)
            if path.exists():
                below = aesthetics is not None and name in tiers and aesthetics < tiers[name]
                held[name] = False if below else self.lookup([path]) is not None
        return held

    def tier(self) -> None:
        """Which aesthetic tiers hold the image, and whether the one captioned does."""
        folder = self.at(layout.MERGED).parent
        if not any((folder / name).exists() for name in TIER_FILES):
            return self.add("tier", NOT_RUN)
        stats = self.at(layout.MERGE.stats)
        tiers = read_json(stats).get("tiers", {}) if stats.exists() else {}
        scores = self.stats.get(AESTHETICS_KEY) or []
        aesthetics = max(scores) if scores else None
        held = self.held_in_tiers(tiers, aesthetics)
        wanted = self.caption_input()
        details = {
            "aesthetics": aesthetics,
            "tiers": tiers or None,
            **held,
            "caption_input": wanted,
        }
        name = Path(wanted).name
        if Path(wanted).parent.name != "merged" or name not in held:
            return self.add("tier", KEPT if any(held.values()) else NOT_FOUND, **details)
        if held[name]:
            return self.add("tier", KEPT, **details)
        why = f"not in {name}"
        if aesthetics is not None and name in tiers and aesthetics < tiers[name]:
            why = f"aesthetics {aesthetics:.4g} < {tiers[name]} ({name})"
        self.add("tier", DROPPED, reason=why, **details)

    def dedup(self) -> None:
        """The dedup verdict: kept, or the record it duplicates."""
        kept, dropped = self.at(layout.DEDUP.records), self.at(layout.DEDUP.dropped)
        if not kept.exists() and not dropped.exists():
            dedup_cfg = ((self.config or {}).get("caption") or {}).get("dedup") or {}
            return self.add("dedup", OFF if dedup_cfg.get("enabled") is False else NOT_RUN)
        hit = self.lookup([dropped])
        if hit is not None:
            record = hit[1]
            kind, distance = record.get("duplicate_kind"), record.get("phash_distance")
            why = f"duplicate of {record.get('duplicate_of')}"
            if kind == "phash" and distance is not None:
                why += f" (perceptual hashes {distance} bits apart)"
            elif kind:
                why += f" (same {kind})"
            details = {
                "duplicate_of": record.get("duplicate_of"),
                "duplicate_kind": kind,
                "phash_distance": distance,
                "file": self.rel(hit[0]),
            }
            return self.add("dedup", DROPPED, reason=why, **details)
        hit = self.lookup([kept])
        if hit is None:
            return self.add("dedup", NOT_FOUND)
        self.add("dedup", KEPT, phash=hit[1].get("phash"), file=self.rel(hit[0]))

    @staticmethod
    def chunk_files(folder: Path, pattern: re.Pattern, kind: str = "") -> list[Path]:
        """The per-chunk files of a folder matching `pattern` (of `kind`: errors, dropped), in
        chunk order."""
        found = []
        for path in folder.glob("chunk_*.jsonl"):
            match = pattern.fullmatch(path.name)
            if match and (not kind or match.group(2) == kind):
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def side_files(self, folder: Path, gathered: str, pattern: re.Pattern, kind: str) -> list[Path]:
        """A gathered file when it exists, else the per-chunk files it is made of."""
        if (folder / gathered).is_file():
            return [folder / gathered]
        return self.chunk_files(folder, pattern, kind)

    def caption(self) -> None:
        """The caption and entities, or the error record's reason."""
        gathered = self.at(layout.CAPTION.records)
        folder = gathered.parent
        ok = self.side_files(folder, gathered.name, CHUNK, "")
        errors = self.side_files(folder, Path(layout.CAPTION.dropped).name, CHUNK_SIDE, "errors")
        if not ok and not errors:
            return self.add("caption", NOT_RUN)
        hit = self.lookup(errors)
        if hit is not None:
            entry = hit[1]
            details = {
                "status": entry.get("status"),
                "attempts": entry.get("attempts"),
                "http_status": entry.get("http_status"),
                "code": entry.get("code"),
                "answer": _short(entry.get("answer") or entry.get("message")),
                "file": self.rel(hit[0]),
            }
            return self.add("caption", DROPPED, reason=drop_text(entry), **details)
        hit = self.lookup(ok)
        if hit is None:
            return self.add(
                "caption", NOT_FOUND, reason="not captioned yet (its chunk has not run)"
            )
        record = hit[1]
        entities = record.get("entities") or []
        meta = record.get("caption_meta") or {}
        details = {
            "caption": _short(record.get("caption")),
            "entities": [e.get("entity") for e in entities],
            "boxes": sum(len(e.get("bboxes") or []) for e in entities),
            "model": meta.get("model"),
            "file": self.rel(hit[0]),
        }
        self.add("caption", KEPT, **details)

    def mask(self) -> None:
        """Masks kept (entities dropped by the quality floors named) or the drop reason."""
        masked = self.at(layout.MASK.records)
        folder, gathered = masked.parent, masked.exists()
        dropped = self.side_files(folder, Path(layout.MASK.dropped).name, CHUNK_SIDE, "dropped")
        chunks = self.chunk_files(folder, CHUNK) if gathered else []
        kept = [masked] if gathered else self.chunk_files(folder, CHUNK)
        missing = "not masked yet (its chunk has not run)"
        hit = self.kept_or_dropped("mask", dropped, kept, missing, count_lines=True)
        if hit is None:
            return
        record = hit[1]
        self.masked_line = record.get("_line")
        if not self.image and isinstance(record.get("image"), str):
            self.image = record["image"]  # the exports name images by their path
        details = {
            "entities": [e.get("entity") for e in record.get("entities") or []],
            "mask_scores": record.get("mask_scores"),
            "mask_file": record.get("mask_file"),
            "low_quality": record.get("mask_low_quality"),
            "file": self.rel(hit[0]),
            "floors": None if gathered else "not applied yet (no masked/masked.jsonl)",
        }
        details.update(self.floors_applied(chunks, record))
        self.add("mask", KEPT, **details)

    def floors_applied(self, chunks: list[Path], record: dict) -> dict:
        """The entities the quality floors took from the image (its mask job's record against
        the gathered one) and the floors, when any were taken."""
        before = self.lookup(chunks) if chunks else None
        if before is None:
            return {}
        floored = floored_entities(before[1], record)
        found = {"entities_dropped_by_floors": floored}
        stats = self.at(layout.MASK.stats)
        if floored and stats.exists():
            found["floors"] = read_json(stats).get("floors")
        return found

    def export_skipped(self, stage: str, path: Path, fallback: str) -> None:
        """The export's verdict on an image it does not hold: the reason its side file of
        skipped records gives, else `fallback`."""
        if path.exists():
            for _, _, line in _scan(path, self.image_id.encode()):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if self.ours(record):
                    self.found(path)
                    return self.add(stage, DROPPED, reason=drop_text(record), file=self.rel(path))
        self.add(stage, DROPPED, reason=fallback)

    def export_off(self, stage: str, *paths: Path) -> None:
        """An export the config does not ask for; files an earlier run left are named."""
        left = [self.rel(p) for p in paths if p.exists()]
        note = f"{', '.join(left)} left from an earlier run (not updated)" if left else None
        self.add(stage, OFF, note=note)

    def formats(self) -> list[str] | None:
        """The configured export formats (None without a config)."""
        if self.config is None:
            return None
        return list((self.config.get("export") or {}).get("formats") or [])

    def export_emu3(self) -> None:
        """The Emu3 datalist line and whether train.json lists it, or the export error."""
        if self.formats() is not None and "emu3" not in self.formats():
            return self.export_off("export emu3", self.at(layout.EMU3.records).parent)
        datalist, errors = self.at(layout.EMU3.records), self.at(layout.EMU3.dropped)
        train = self.at(layout.EMU3_TRAIN)
        if not datalist.exists():
            return self.add("export emu3", NOT_RUN)
        hit = self.kept_or_dropped("export emu3", [errors], [datalist])
        if hit is None:
            return
        line = hit[1]
        listed = train.exists() and _contains(train, json.dumps(line.get("path")).encode())
        if listed:
            self.found(train)
        details = {
            "path": line.get("path"),
            "tokens": line.get("tokens"),
            "in_train_json": listed,
            "reason": None if listed else "not in train.json (export.emu3.max_items)",
        }
        self.add("export emu3", KEPT, **details)

    def image_match(self, name: object) -> bool:
        """Whether an export's file name names this image (its path, or `<source>/<id>.ext`)."""
        if not isinstance(name, str) or not name:
            return False
        if self.image and (name == self.image or self.image.endswith("/" + name.lstrip("/"))):
            return True
        stem = name.rsplit(".", 1)[0]
        return stem.endswith(f"{self.source}/{self.image_id}")

    def coco_image(self, path: Path) -> dict | None:
        """The COCO image entry of the image, with its annotation count (streamed: ijson)."""
        with open(path, "rb") as handle:
            image = next((i for i in ijson.items(handle, "images.item")
                          if self.ours(i) or self.image_match(i.get("file_name"))), None)  # fmt: skip
        if image is None:
            return None
        with open(path, "rb") as handle:
            annotations = ijson.items(handle, "annotations.item")
            count = sum(1 for a in annotations if a.get("image_id") == image.get("id"))
        return {"coco_id": image.get("id"), "annotations": count}

    def export_coco(self) -> None:
        """The COCO image entry and its annotations (export/coco/coco.json)."""
        path = self.at(layout.COCO.records)
        if self.formats() is not None and "coco" not in self.formats():
            return self.export_off("export coco", path)
        if not path.exists():
            return self.add("export coco", NOT_RUN)
        needles = [json.dumps(self.image_id).encode()]
        if self.image:
            needles.append(json.dumps(self.image).strip('"').encode())
        found = self.coco_image(path) if any(_contains(path, n) for n in needles) else None
        if found is not None:
            self.found(path)
            return self.add("export coco", KEPT, file=self.rel(path), **found)
        skipped = self.at(layout.COCO.dropped)
        self.export_skipped("export coco", skipped, f"not in {self.rel(path)}")

    def odvg_line(self, path: Path) -> dict | None:
        """The image's ODVG line (by key, or by the image file it names)."""
        needle = Path(self.image).name if self.image else self.image_id
        for _, _, line in _scan(path, needle.encode()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            names = [record.get(k) for k in ("filename", "file_name", "image")]
            if self.ours(record) or any(self.image_match(n) for n in names):
                return record
        return None

    def export_odvg(self) -> None:
        """The ODVG line of the image and its grounded regions (export/odvg/odvg.jsonl)."""
        path = self.at(layout.ODVG.records)
        if self.formats() is not None and "odvg" not in self.formats():
            return self.export_off("export odvg", path)
        if not path.exists():
            return self.add("export odvg", NOT_RUN)
        record = self.odvg_line(path)
        if record is None:
            skipped = self.at(layout.ODVG.dropped)
            return self.export_skipped("export odvg", skipped, f"not in {self.rel(path)}")
        grounding = record.get("grounding") or {}
        regions = grounding.get("regions") or (record.get("detection") or {}).get("instances")
        self.found(path)
        phrases = [r.get("phrase") or r.get("category") for r in regions or []]
        self.add("export odvg", KEPT, file=self.rel(path), regions=len(regions or []),
                 phrases=phrases or None)  # fmt: skip

    def tar_order(self, tars: list[Path]) -> list[Path]:
        """The tars nearest first to the one the record's line in masked.jsonl points at (the
        export fills them in that order, `export.webdataset.shard_size` samples each)."""
        size = ((self.config or {}).get("export") or {}).get("webdataset", {}).get("shard_size")
        if self.masked_line is None or not size or not tars:
            return tars
        guess = min(self.masked_line // size, len(tars) - 1)
        return sorted(tars, key=lambda path: abs(tars.index(path) - guess))

    def wds_sample(self, archive: tarfile.TarFile) -> tuple[str, list[str]] | None:
        """(key, member extensions) of the image's sample in an open tar, if it holds it."""
        groups: dict[str, list[tarfile.TarInfo]] = {}
        for member in archive:
            base = os.path.basename(member.name)
            if member.isfile() and self.image_id in base:
                stem = member.name[: len(member.name) - len(base)] + base.split(".", 1)[0]
                groups.setdefault(stem, []).append(member)
        plain = re.sub(r"[^A-Za-z0-9]", "", self.source)
        for stem, members in groups.items():
            meta = [m for m in members if m.name.endswith(".json")]
            if meta:
                handle = archive.extractfile(meta[0])
                try:
                    record = json.load(handle) if handle else {}
                except ValueError:
                    record = {}
                if not self.ours(record) and not self.image_match(record.get("image")):
                    continue
            elif plain not in re.sub(r"[^A-Za-z0-9]", "", stem):
                continue
            return stem, sorted(m.name[len(stem) :] for m in members)
        return None

    def export_webdataset(self) -> None:
        """The WebDataset tar and the members that hold the image (export/wds/*.tar)."""
        if self.formats() is not None and "webdataset" not in self.formats():
            return self.export_off("export webdataset", self.at(layout.WEBDATASET.records))
        tars = sorted(self.at(layout.WEBDATASET.records).glob("*.tar"))
        if not tars:
            return self.add("export webdataset", NOT_RUN)
        for path in self.tar_order(tars):
            with tarfile.open(path, "r:") as archive:
                sample = self.wds_sample(archive)
            if sample is not None:
                self.found(path)
                return self.add("export webdataset", KEPT, file=self.rel(path), key=sample[0],
                                members=sample[1])  # fmt: skip
        self.export_skipped(
            "export webdataset",
            self.at(layout.WEBDATASET.dropped),
            f"in none of the {len(tars)} tars",
        )

    def run(self) -> None:
        """Every stage in order; after the first drop (before the exports) the rest are not
        reached."""
        steps = [
            getattr(self, name.replace(" ", "_")) for name in STAGES
        ]  # "export coco": export_coco
        for name, step in zip(STAGES, steps, strict=True):
            if self.dropped_at is not None:
                self.add(name, NOT_REACHED, reason=f"dropped at {self.dropped_at}")
            elif self.image_id is None and name not in ("prefilter", "download"):
                self.add(name, NOT_REACHED, reason="no image id")
            else:
                step()


def known_sources(workdir: Path, config: dict | None) -> list[str]:
    """The sources of the config, then any other the workdir has outputs of."""
    names = [s["name"] for s in (config or {}).get("sources") or []]
    for folder in ("url_lists", "downloads", "manifest", "shards", "scored"):
        if (workdir / folder).is_dir():
            names += [p.name for p in (workdir / folder).iterdir() if p.is_dir()]
    return list(dict.fromkeys(names))


def parse_key(key: str, sources: list[str]) -> tuple[str | None, str | None, str | None]:
    """(source, image id, URL) of a trace key: `SOURCE/IMAGE_ID`, a URL or `SOURCE/URL`."""
    key = key.strip()
    if "://" in key:
        head, _, rest = key.partition("/")
        if head in sources and "://" in rest:
            return head, None, rest
        return None, None, key
    source, sep, image_id = key.partition("/")
    if not sep or not source or not image_id:
        raise ValueError(f"trace key {key!r}: expected SOURCE/IMAGE_ID (or a URL)")
    return source, image_id, None


def trace(workdir: str | os.PathLike, key: str, config: dict | None = None) -> dict | None:
    """Every stage's verdict on one image (`SOURCE/IMAGE_ID`, or its URL); None when the key is
    nowhere (unknown source, or no stage file and no URL-list row holds it).

    Returns {"key", "found_in": [files], "stages": [{"stage", "verdict", "details"}]} (for a URL
    that several sources list, the first source's, with `also_in`: the others' traces); verdicts
    are kept, dropped (details["reason"] says why), not run yet, not reached (after a drop),
    not found (the stage ran but its files lack the image) or off (disabled in the config).
    """
    workdir = Path(workdir)
    if config is not None:
        config = validate_config(copy.deepcopy(config), weights=())
    sources = known_sources(workdir, config)
    source, image_id, url = parse_key(key, sources)
    if url is None:
        if source not in sources:
            return None
        tracer = _Tracer(workdir, config)
        tracer.source, tracer.image_id = source, image_id
        tracer.locate(None)
        return _traced(tracer, url)
    results = []  # a URL may be listed by several sources: each one's trace
    for name in [source] if source else sources:
        tracer = _Tracer(workdir, config)
        tracer.source = name
        tracer.locate(url)
        if tracer.origin is not None or tracer.url_in_original(url):
            result = _traced(tracer, url)
            results += [result] if result else []
    if not results:
        return None
    return {**results[0], "also_in": results[1:]} if len(results) > 1 else results[0]


def _traced(tracer: _Tracer, url: str | None) -> dict | None:
    """Run a tracer set on its image; its result, or None when no file knows the image."""
    tracer.run()
    if not tracer.found_in:
        return None
    name = f"{tracer.source}/{tracer.image_id}" if tracer.image_id else f"{tracer.source}/{url}"
    return {
        "key": name,
        "url": url,
        "found_in": list(dict.fromkeys(tracer.found_in)),
        "stages": tracer.stages,
    }


def _cell(value: object) -> str:
    """One detail value as the table prints it."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        shown = ", ".join(_cell(v) for v in value[:6])
        return f"[{shown}{', …' if len(value) > 6 else ''}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + "}"
    return str(_short(" ".join(str(value).split()), 90))  # one line: a table row per stage


def format_trace(result: dict) -> str:
    """A readable table of `trace`'s result: one line per stage, its verdict and details."""
    lines = [f"trace {result['key']}"]
    if result.get("url"):
        lines.append(f"  url: {result['url']}")
    lines.append(f"  found in: {len(result['found_in'])} file(s)")
    lines += [f"    {where}" for where in result["found_in"]]
    width = max(len(stage["stage"]) for stage in result["stages"])
    lines.append("")
    lines.append(f"{'stage':<{width}}  {'verdict':<12} details")
    for stage in result["stages"]:
        details = dict(stage["details"])
        # every value on one line (a library's multi-line error too): one table row per stage
        reason = " ".join(str(details.pop("reason")).split()) if "reason" in details else None
        parts = [f"reason: {reason}"] if reason is not None else []
        parts += [f"{k}={_cell(v)}" for k, v in details.items()]
        lines.append(f"{stage['stage']:<{width}}  {stage['verdict']:<12} {'; '.join(parts)}")
    for other in result.get("also_in") or []:  # the same URL in another source
        lines += ["", format_trace(other)]
    return "\n".join(lines)
