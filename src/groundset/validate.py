"""Validator: any stage's JSONL against its record schema plus geometry and referenced files.

Checks per record: the JSON schema of its stage (`workflow/schemas/records.schema.yaml`);
boxes normalized with x1 < x2 and y1 < y2; one score per entity; the image exists and its size
matches `__dj__stats__`; a mask file exists with shape (entities, H, W) (or RLE sizes match).
Streams the file; reports violations with line numbers.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from jsonschema import Draft202012Validator

from .config import load_schema

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


def _image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the image header, or None if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None


def check_geometry(record: dict, stage: str, check_files: bool = True) -> list[str]:
    """Geometry and file problems of one record (schema-valid) of `stage`."""
    problems = []
    stats = record.get("__dj__stats__") or {}
    expected = None
    if stats.get("image_width") and stats.get("image_height"):
        expected = (stats["image_width"][0], stats["image_height"][0])
    image = record.get("image")
    image = image[0] if isinstance(image, list) and image else image
    boxes = []
    for entity in record.get("entities") or []:
        boxes += entity.get("bboxes") or ([entity["bbox"]] if "bbox" in entity else [])
    for box in boxes:
        if len(box) == 4 and not (box[0] < box[2] and box[1] < box[3]):
            problems.append(f"box {box} is not ordered (x1 < x2, y1 < y2)")
    size = None
    if check_files and image:
        if not Path(image).is_file():
            problems.append(f"image {image} does not exist")
        else:
            size = _image_size(image)
            if size is None:
                problems.append(f"image {image} cannot be read")
            elif expected and tuple(size) != tuple(expected):
                problems.append(
                    f"image is {size[0]}x{size[1]}, __dj__stats__ says {expected[0]}x{expected[1]}"
                )
    if stage == "masked":
        n = len(record["entities"])
        for name in ("mask_scores", "mask_inside_fraction", "mask_area_ratio"):
            if name in record and len(record[name]) != n:
                problems.append(f"{len(record[name])} {name} for {n} entities")
        if "mask_rle" in record:
            if len(record["mask_rle"]) != n:
                problems.append(f"{len(record['mask_rle'])} RLE masks for {n} entities")
            if size and any(r["size"] != [size[1], size[0]] for r in record["mask_rle"]):
                problems.append("an RLE mask's size is not the image's")
        elif record.get("mask_file"):
            problems += _check_mask_file(record["mask_file"], n, size, check_files)
        elif n:
            problems.append(f"{n} entities but no mask_file")
    return problems


def _check_mask_file(path: str, n: int, size, check_files: bool) -> list[str]:
    """Problems of an .npy mask file: existence, dtype, shape (N, H, W)."""
    import numpy as np

    if not check_files:
        return []
    if not Path(path).is_file():
        return [f"mask file {path} does not exist"]
    try:
        masks = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        return [f"mask file {path} cannot be read: {err}"]
    problems = []
    if masks.dtype != bool:
        problems.append(f"mask file dtype is {masks.dtype}, not bool")
    want = (n, size[1], size[0]) if size else None
    if masks.ndim != 3 or masks.shape[0] != n or (want and tuple(masks.shape) != want):
        problems.append(f"mask file shape {tuple(masks.shape)}, expected {want or (n, 'H', 'W')}")
    return problems


@dataclass
class Report:
    """What validating a file found."""

    path: str
    records: int = 0
    stages: Counter = field(default_factory=Counter)
    kinds: Counter = field(default_factory=Counter)
    violations: list[tuple[int, str]] = field(default_factory=list)

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
        lines = [f"{self.path}: {self.records} records ({stages}), "
                 + ("all valid" if self.ok else f"{sum(self.kinds.values())} violations")]  # fmt: skip
        lines += [f"  {kind}: {count}" for kind, count in self.kinds.items()]
        lines += [f"  line {line}: {message}" for line, message in self.violations]
        return "\n".join(lines)


def validate_file(
    path: str | os.PathLike, stage: str | None = None, check_files: bool = True
) -> Report:
    """Validate every line of a JSONL file (stage per record unless given)."""
    validators = _validators()
    report = Report(str(path))
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                report.add(lineno, "blank_line", "blank line")
                continue
            report.records += 1
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                report.add(lineno, "not_json", f"not valid JSON: {err}")
                continue
            if not isinstance(record, dict):
                report.add(lineno, "not_an_object", "not a JSON object")
                continue
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


def validate_outputs(paths: list[str], report_path: str | os.PathLike) -> None:
    """Validate every file; write the reports; raise (naming the files) if any has violations."""
    from .io import atomic_write

    reports = [validate_file(path) for path in paths]
    bad = [r.path for r in reports if not r.ok]
    if bad:
        for report in reports:
            if not report.ok:
                print(report.text(), file=sys.stderr)
        raise ValueError(f"invalid records in {', '.join(bad)} (see the log for line numbers)")
    with atomic_write(report_path) as handle:
        handle.write("\n".join(r.text() for r in reports) + "\n")
