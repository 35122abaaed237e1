"""Validator: any stage's JSONL against its record schema plus geometry and referenced files.

Checks per record: strict JSON (no NaN/Infinity) in UTF-8; the JSON schema of its stage
(`workflow/schemas/records.schema.yaml`: boxes and `mask_scores` in [0, 1], ...); a key
(`records.record_key`: `source/image_id`, `image_id` without a source) not seen on an earlier
line of the file; boxes with x1 < x2 and y1 < y2; one score per entity; the image exists, and
its header size matches `__dj__stats__` and the record's `width`/`height`; a mask file exists
with shape (entities, H, W) equal to `mask_shape` (or RLE sizes match). Streams the file and
reports violations with line numbers. Keys are remembered as their 64-bit hashes (about 110
bytes a record; a false duplicate needs a hash collision, odds ~ records² / 2**65).

Image sizes are read from the header only, never decoded, so PIL's decompression-bomb guard
(which protects decoding) does not apply: an image over `Image.MAX_IMAGE_PIXELS` is not
invalid, its header size is checked like any other.

What a stage dropped and counted is not a violation downstream; the validator checks what each
stage kept. In the workflow (`validate_outputs`) a manifest is therefore checked for schema and
keys only: the filter's probe opens every manifest image and drops, with a reason and counted
(`probed/<source>/shard_{i}_dropped.jsonl`), those deleted or damaged after download, and what
it kept flows into the merged, captioned and masked outputs, whose images, sizes and masks are
checked in full. An image that breaks after the probe kept it is a violation there. Reading
every manifest image again would repeat the probe's work and could only re-report its drops.
`groundset validate manifest.jsonl` by hand, where no probe ran, still checks the files.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from jsonschema import Draft202012Validator

from groundset.core.config import load_schema
from groundset.core.images import image_header_size
from groundset.core.records import RecordError, image_path, record_boxes, record_key

STAGES = ("manifest", "filtered", "captioned", "masked")
MAX_LISTED = 50


def detect_stage(record: dict) -> str:
    """The stage whose output a record looks like."""
    if "mask_scores" in record:
        return "masked"
    if "caption" in record:
        return "captioned"
    if "__dj__stats__" in record:
        return "filtered"
    return "manifest"


def _validators() -> dict[str, Draft202012Validator]:
    """A schema validator per stage."""
    schema = load_schema("records")
    return {stage: Draft202012Validator({**schema, "$ref": f"#/$defs/{stage}"}) for stage in STAGES}


def _size_problems(record: dict, size: tuple[int, int]) -> list[str]:
    """Where the sizes a record states (`__dj__stats__`, `width`/`height`) disagree with its image's."""
    problems = []
    width, height = size
    stats = record.get("__dj__stats__") or {}
    if stats.get("image_width") and stats.get("image_height"):
        expected = (stats["image_width"][0], stats["image_height"][0])
        if tuple(size) != expected:
            problems.append(
                f"image is {width}x{height}, __dj__stats__ says {expected[0]}x{expected[1]}"
            )
    stated_w, stated_h = record.get("width"), record.get("height")
    if (stated_w is not None and stated_w != width) or (
        stated_h is not None and stated_h != height
    ):
        problems.append(
            f"image is {width}x{height}, the record's width/height say "
            f"{'?' if stated_w is None else stated_w}x{'?' if stated_h is None else stated_h}"
        )
    return problems


def check_geometry(record: dict, stage: str, check_files: bool = True) -> list[str]:
    """Geometry and file problems of one record (schema-valid) of `stage`."""
    problems = []
    for _, box in record_boxes(record):
        if len(box) == 4 and not (box[0] < box[2] and box[1] < box[3]):
            problems.append(f"box {box} is not ordered (x1 < x2, y1 < y2)")
    try:
        image = image_path(record)
    except RecordError:
        image = None
    size = None
    if check_files and image:
        if not Path(image).is_file():
            problems.append(f"image {image} does not exist")
        else:
            size = image_header_size(image)
            if size is None:
                problems.append(f"image {image} cannot be read")
            else:
                problems += _size_problems(record, size)
    if stage == "masked":
        problems += _mask_problems(record, size, check_files)
    return problems


def _mask_problems(record: dict, size: tuple[int, int] | None, check_files: bool) -> list[str]:
    """Problems of a masked record's per-entity lists, `mask_shape` and masks (file or RLE)."""
    problems = []
    n = len(record["entities"])
    for name in ("mask_scores", "mask_inside_fraction", "mask_area_ratio"):
        if name in record and len(record[name]) != n:
            problems.append(f"{len(record[name])} {name} for {n} entities")
    stated = record.get("mask_shape")
    if stated is not None and stated[0] != n:
        problems.append(f"mask_shape {stated} for {n} entities")
    if "mask_rle" in record:
        problems += _rle_problems(record["mask_rle"], n, size, stated)
    elif record.get("mask_file"):
        file_problems, shape = _check_mask_file(record["mask_file"], n, size, check_files)
        problems += file_problems
        if stated is not None and shape is not None and tuple(stated) != shape:
            problems.append(f"mask_shape {stated} disagrees with the mask file's shape {shape}")
    elif n:
        problems.append(f"{n} entities but no mask_file")
    return problems


def _rle_problems(
    rles: list[dict], n: int, size: tuple[int, int] | None, stated: list[int] | None
) -> list[str]:
    """Problems of a record's RLE masks: their count and sizes against the image and `mask_shape`."""
    problems = [f"{len(rles)} RLE masks for {n} entities"] if len(rles) != n else []
    if size and any(r["size"] != [size[1], size[0]] for r in rles):
        problems.append("an RLE mask's size is not the image's")
    if stated is not None and any(r["size"] != stated[1:] for r in rles):
        problems.append(f"mask_shape {stated} disagrees with the RLE masks' sizes")
    return problems


def _check_mask_file(
    path: str, n: int, size: tuple[int, int] | None, check_files: bool
) -> tuple[list[str], tuple[int, ...] | None]:
    """Problems of an .npy mask file (existence, dtype, shape (N, H, W)) and its shape."""
    import numpy as np

    if not check_files:
        return [], None
    if not Path(path).is_file():
        return [f"mask file {path} does not exist"], None
    try:
        masks = np.load(path, mmap_mode="r")
        shape = tuple(int(d) for d in masks.shape)
    except Exception as err:  # noqa: BLE001 (numpy raises many types for broken files)
        return [f"mask file {path} cannot be read: {err}"], None
    problems = []
    if masks.dtype != bool:
        problems.append(f"mask file dtype is {masks.dtype}, not bool")
    want = (n, size[1], size[0]) if size else None
    if masks.ndim != 3 or shape[0] != n or (want and shape != want):
        problems.append(f"mask file shape {shape}, expected {want or (n, 'H', 'W')}")
    return problems, shape


@dataclass
class Report:
    """What validating a file found."""

    path: str
    records: int = 0
    stages: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    violations: list[tuple[int, str]] = field(default_factory=list)
    files_checked: bool = True

    @property
    def ok(self) -> bool:
        """True when every record passed."""
        return not self.kinds

    def add(self, line: int, kind: str, message: str) -> None:
        """Count a violation (and keep the first ones with their line numbers)."""
        self.kinds[kind] += 1
        if len(self.violations) < MAX_LISTED:
            self.violations.append((line, message))

    def text(self) -> str:
        """A human-readable summary."""
        stages = ", ".join(f"{k}={v}" for k, v in self.stages.items()) or "none"
        scope = "" if self.files_checked else " (schema and keys; files not checked)"
        lines = [f"{self.path}: {self.records} records ({stages}){scope}, "
                 + ("all valid" if self.ok else f"{sum(self.kinds.values())} violations")]  # fmt: skip
        lines += [f"  {kind}: {count}" for kind, count in self.kinds.items()]
        lines += [f"  line {line}: {message}" for line, message in self.violations]
        return "\n".join(lines)


def _not_json(name: str) -> float:
    """`json.loads` hook for NaN/Infinity, which JSON does not have (and our writers refuse)."""
    raise ValueError(f"{name} is not a JSON number")


def validate_file(
    path: str | os.PathLike, stage: str | None = None, check_files: bool = True
) -> Report:
    """Validate every line of a JSONL file (stage per record unless given)."""
    validators = _validators()
    report = Report(str(path), files_checked=check_files)
    first_line: dict[int, int] = {}  # hash of a key -> the line it was first seen on
    with open(path, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                report.records += 1
                report.add(lineno, "not_utf8", f"not UTF-8: {err}")
                continue
            if not line.strip():
                report.add(lineno, "blank_line", "blank line")
                continue
            report.records += 1
            try:
                record = json.loads(line, parse_constant=_not_json)
            except ValueError as err:
                report.add(lineno, "not_json", f"not valid JSON: {err}")
                continue
            if not isinstance(record, dict):
                report.add(lineno, "not_an_object", "not a JSON object")
                continue
            try:
                key = record_key(record)
            except (RecordError, TypeError):
                key = None  # the schema says what is missing
            if key is not None:
                first = first_line.setdefault(hash(key), lineno)
                if first != lineno:
                    report.add(
                        lineno, "duplicate_key", f"duplicate key {key} (first on line {first})"
                    )
            kind = stage or detect_stage(record)
            report.stages[kind] += 1
            errors = list(validators[kind].iter_errors(record))
            for error in errors[:3]:
                where = "/".join(str(p) for p in error.absolute_path) or "(record)"
                report.add(lineno, "schema", f"{where}: {error.message}")
            if errors:
                continue
            for problem in check_geometry(record, kind, check_files):
                report.add(lineno, "geometry", problem)
    return report


def _exports_verdict(exports: dict[str, str]) -> tuple[str | None, str]:
    """The exports checked against the masked records: what is bad (None: nothing), the report line."""
    from groundset.exports.check import check_exports

    problems = check_exports(**exports)
    for problem in problems:
        print(f"export: {problem}", file=sys.stderr)
    named = ", ".join(sorted({"wds_dir": "webdataset"}.get(k, k) for k in exports if k != "masked"))
    line = f"exports ({named}): images and boxes match their stats, their drop files and "
    bad = "the exports (" + "; ".join(problems) + ")"
    return bad if problems else None, line + exports["masked"]


def _emu3_verdict(emu3: tuple[str, dict], masked: str) -> tuple[str | None, str]:
    """The Emu3 prompts parsed back against the masked records: what is bad, the report line."""
    from groundset.exports.emu3 import Emu3Settings, prompt_problems

    problems = prompt_problems(emu3[0], masked, Emu3Settings.from_config(emu3[1]))
    for problem in problems[:20]:
        print(f"emu3: {problem}", file=sys.stderr)
    bad = f"the Emu3 prompts ({len(problems)} do not parse back to their records)"
    line = f"emu3 prompts: each parses back to its record's entities and boxes ({emu3[0]})"
    return bad if problems else None, line


def _export_verdicts(
    exports: dict[str, str] | None, emu3: tuple[str, dict] | None
) -> list[tuple[str | None, str]]:
    """The checks of the exports and Emu3 prompts asked for (`validate_outputs`), in order."""
    if not exports or "masked" not in exports:
        return []
    verdicts = [_exports_verdict(exports)] if len(exports) > 1 else []
    if emu3:
        verdicts.append(_emu3_verdict(emu3, exports["masked"]))
    return verdicts


def validate_outputs(
    paths: list[str], report_path: str | os.PathLike, schema_only: Collection[str] = (),
    exports: dict[str, str] | None = None, emu3: tuple[str, dict] | None = None,
) -> None:  # fmt: skip
    """Validate every file (`schema_only` ones without file checks) and each export against the
    masked records (`exports`: masked, and coco / odvg / wds_dir / emu3 where exported, each
    checked against its stats and drops: `exports.check`; `emu3`: the
    Emu3 datalist and the `export.emu3` config section, every prompt parsed back); write the
    report or raise."""
    from groundset.core.io import atomic_write

    skip_files = {os.fspath(p) for p in schema_only}
    reports = [validate_file(path, check_files=os.fspath(path) not in skip_files) for path in paths]
    bad = [r.path for r in reports if not r.ok]
    for report in reports:
        if not report.ok:
            print(report.text(), file=sys.stderr)
    lines = [r.text() for r in reports]
    verdicts = _export_verdicts(exports, emu3)
    bad += [problem for problem, _ in verdicts if problem is not None]
    lines += [line for _, line in verdicts]
    if bad:
        raise ValueError(f"invalid records in {', '.join(bad)} (see the log for line numbers)")
    with atomic_write(report_path) as handle:
        handle.write("\n".join(lines) + "\n")
