"""Download parts: a source's URL list cut into parts of `download.part_rows` rows, one
prefilter and one img2dataset job each.

A part is named by its URL-list file (relative to the source's `url_list`) and its row range,
as an 8-hex digest: adding, removing or reordering files leaves the other parts' names, and so
their files, as they are. img2dataset numbers its keys within each part's own run, so an image
id is `<part>_<key>`: unique across parts and stable across reruns. The plan is read from the
parquet footers only (no data), where Snakemake plans the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from groundset.core.io import atomic_write, read_json
from groundset.stages.prefilter import list_parquet_files, open_parquet

SEPARATOR = "_"  # between the part and img2dataset's key in an image id
NAME_LENGTH = 8  # hex digits of a part's name
NAME_PATTERN = rf"[0-9a-f]{{{NAME_LENGTH}}}"  # the `download_part` wildcard


@dataclass(frozen=True)
class Part:
    """One part of a URL list: its name, its file (relative to the url_list) and its rows."""

    name: str
    file: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        """How many URL-list rows the part holds."""
        return self.stop - self.start


def part_name(file: str, start: int, stop: int) -> str:
    """The stable name of the rows [start, stop) of a URL-list file."""
    return hashlib.sha1(f"{file}\0{start}\0{stop}".encode()).hexdigest()[:NAME_LENGTH]


def url_list_root(url_list: str | os.PathLike) -> Path:
    """The folder that `url_list_file` names are relative to (a file's own folder)."""
    path = Path(url_list)
    return path if path.is_dir() else path.parent


def file_parts(file: str, rows: int, part_rows: int | None) -> list[Part]:
    """The parts of one file of `rows` rows (`part_rows` None: one part; an empty file: one
    empty part, so that every file is accounted for)."""
    step = part_rows or max(rows, 1)
    starts = range(0, max(rows, 1), step)
    return [Part(part_name(file, s, min(s + step, rows)), file, s, min(s + step, rows))
            for s in starts]  # fmt: skip


def plan_parts(url_list: str | os.PathLike, part_rows: int | None) -> list[Part]:
    """Every part of a URL list (a parquet file or a folder of them), file by file, from the
    footers; ValueError on two parts of one name (a digest collision: change part_rows)."""
    root = url_list_root(url_list)
    parts = []
    for path in list_parquet_files(url_list):
        with open_parquet(path) as parquet:
            rows = parquet.metadata.num_rows
        parts += file_parts(path.relative_to(root).as_posix(), rows, part_rows)
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"{url_list}: two download parts have one name; change part_rows")
    return parts


def find_part(parts: list[Part], name: str) -> Part:
    """The part called `name` (KeyError naming it if the plan has none)."""
    for part in parts:
        if part.name == name:
            return part
    raise KeyError(f"no download part {name!r} in the plan")


def image_id(part: str, key: str) -> str:
    """The image id of img2dataset's `key` in `part`."""
    return f"{part}{SEPARATOR}{key}"


def part_of(image_id: str) -> str | None:
    """The part of an image id (None for an id without one: a run from before parts)."""
    part, sep, _ = str(image_id).partition(SEPARATOR)
    return part if sep and len(part) == NAME_LENGTH else None


def key_of(image_id: str) -> str:
    """img2dataset's key of an image id, within its part (the id itself without a part)."""
    return str(image_id).partition(SEPARATOR)[2] if part_of(image_id) else str(image_id)


def write_plan(path: str | os.PathLike, source: str, parts: list[Part]) -> None:
    """The plan of a source's parts as JSON: {"source", "parts": [{name, file, start, stop}]}."""
    with atomic_write(path) as handle:
        json.dump({"source": source, "parts": [asdict(part) for part in parts]}, handle, indent=1)
        handle.write("\n")


def read_plan(path: str | os.PathLike) -> list[Part]:
    """The parts of a plan written by `write_plan` ([] when there is none)."""
    if not Path(path).exists():
        return []
    return [Part(**entry) for entry in read_json(path)["parts"]]
