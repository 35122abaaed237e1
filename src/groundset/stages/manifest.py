"""Manifest stage: walk img2dataset `files` output into one JSONL record per downloaded image."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from groundset.core.io import atomic_write, clean_json_value, dumps_record
from groundset.core.layout import beside
from groundset.core.records import PROVENANCE
from groundset.core.stats import drop_line, envelope, write_stats
from groundset.stages.download import collect_stats
from groundset.stages.parts import image_id

log = logging.getLogger(__name__)

# Keys img2dataset writes into every sidecar .json; anything else is a saved extra column.
IMG2DATASET_KEYS = {
    "caption",
    "url",
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
    "md5",
}
SIDE_EXTENSIONS = {".json", ".txt", ".parquet"}
STAGE = "manifest"
REASONS = ("bad_sidecar", "not_success", "image_missing")


def shard_dirs(download_dir: Path) -> list[Path]:
    """img2dataset's numbered shard folders (`00000`, `00001`, ...) in order."""
    return sorted(p for p in download_dir.iterdir() if p.is_dir() and p.name.isdigit())


def scan_shard(shard: Path) -> tuple[list[str], dict[str, str]]:
    """Sorted sidecar stems and a stem -> image file name map for one shard folder."""
    sidecars: list[str] = []
    images: dict[str, str] = {}
    with os.scandir(shard) as entries:
        for entry in entries:
            stem, ext = os.path.splitext(entry.name)
            if ext == ".json":
                sidecars.append(stem)
            elif ext not in SIDE_EXTENSIONS and not entry.name.startswith("."):
                images[stem] = entry.name
    sidecars.sort()
    return sidecars, images


def make_record(
    image_path: Path, meta: dict, source: str, columns: list[str] | None, part: str | None = None
) -> dict:
    """One manifest record from an image path and its img2dataset sidecar (the prefilter's
    provenance, where the sidecar has it, as top-level fields; `part`: the download part, whose
    name prefixes the image id)."""
    if columns is None:
        columns = sorted(k for k in meta if k not in IMG2DATASET_KEYS)
    caption = meta.get("caption")
    record = {
        "image": [str(image_path)],
        "text": "" if caption is None else str(caption),
        "image_id": image_id(part, image_path.stem) if part else image_path.stem,
        "source": source,
        "url": meta.get("url"),
        "meta": {c: clean_json_value(meta.get(c)) for c in columns if c not in PROVENANCE},
        "width": meta.get("width"),
        "height": meta.get("height"),
    }
    record.update({c: meta[c] for c in PROVENANCE if meta.get(c) is not None})
    return record


def sidecar_drop(sidecar: Path, ident: str, source: str, meta: dict | None, reason: str,
                 detail: str) -> dict:  # fmt: skip
    """The drop line of a sidecar the manifest does not pass on (its fields as far as read)."""
    fields = {"image_id": ident, "source": source, "sidecar": str(sidecar)}
    if meta:
        fields.update(url=meta.get("url"), **{c: meta[c] for c in PROVENANCE if c in meta})
    return drop_line(fields, STAGE, reason, detail)


def read_sidecar(shard: Path, stem: str, images: dict[str, str], source: str, ident: str) -> dict:
    """One sidecar as a record, or as a drop line (`drop_stage` set) saying why not (`ident`:
    the image id it has)."""
    sidecar = shard / f"{stem}.json"
    try:
        with open(sidecar, encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError) as err:
        log.warning("%s: unreadable sidecar (%s)", sidecar, err)
        return sidecar_drop(sidecar, ident, source, None, "bad_sidecar", str(err))
    if not isinstance(meta, dict):
        return sidecar_drop(sidecar, ident, source, None, "bad_sidecar", "not a JSON object")
    status = meta.get("status", "success")
    if status != "success":
        detail = f"{status}: {meta.get('error_message')}"
        return sidecar_drop(sidecar, ident, source, meta, "not_success", detail)
    name = images.get(stem)
    if name is None:
        log.warning("%s/%s: sidecar without an image file", shard, stem)
        return sidecar_drop(sidecar, ident, source, meta, "image_missing", "no image file")
    return {"meta": meta, "name": name}


def download_folders(download_dir: str | os.PathLike | list, parts: bool) -> list[tuple]:
    """(part or None, folder) of each img2dataset output folder, in image id order: one folder,
    or with `parts` the folders of download parts (each named by its part)."""
    folders = download_dir if isinstance(download_dir, list) else [download_dir]
    folders = sorted(Path(folder).resolve() for folder in folders)
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"download folder {folder} does not exist")
    return [(folder.name if parts else None, folder) for folder in folders]


def iter_records(
    download_dir: str | os.PathLike | list,
    source: str,
    columns: list[str] | None,
    counts: Counter,
    parts: bool = False,
) -> Iterator[dict]:
    """Stream records of every sidecar: a manifest record, or a drop line (`drop_stage` set)
    for one not passed on; `counts` gets sidecars and drops by reason."""
    bar = tqdm(unit="img", desc=f"manifest {source}", mininterval=5)
    for part, root in download_folders(download_dir, parts):
        for shard in shard_dirs(root):
            sidecars, images = scan_shard(shard)
            for stem in sidecars:
                counts["sidecars"] += 1
                ident = image_id(part, stem) if part else stem
                read = read_sidecar(shard, stem, images, source, ident)
                if "drop_stage" in read:
                    counts[read["drop_reason"]] += 1
                    yield read
                    continue
                bar.update()
                yield make_record(shard / read["name"], read["meta"], source, columns, part)
    bar.close()


def build_manifest(
    download_dir: str | os.PathLike | list,
    output: str | os.PathLike,
    source: str,
    columns: list[str] | None = None,
    stats_path: str | os.PathLike | None = None,
    dropped: str | os.PathLike | None = None,
    parts: bool = False,
) -> dict:
    """Write the manifest JSONL of one source and its drop lines (`dropped`, default
    `<stem>_dropped.jsonl`) atomically; return (and optionally write) the stats envelope.

    `download_dir`: img2dataset's output folder, or with `parts` a list of the folders of a
    source's download parts (each named by its part: image ids `<part>_<key>`)."""
    folders = download_folders(download_dir, parts)
    counts: Counter = Counter()
    with (
        atomic_write(output) as handle,
        atomic_write(dropped or beside(output, "_dropped.jsonl")) as drops,
    ):
        for record in iter_records(download_dir, source, columns, counts, parts):
            (drops if "drop_stage" in record else handle).write(dumps_record(record) + "\n")
    failed = sum(sum(collect_stats(folder)["dropped"].values()) for _, folder in folders)
    reasons = {reason: counts[reason] for reason in REASONS}
    kept = counts["sidecars"] - sum(reasons.values())
    extras = {"parts": [part for part, _ in folders]} if parts else {}
    stats = envelope(
        STAGE, counts["sidecars"], kept, reasons, source=source, failed_downloads=failed, **extras
    )
    if stats_path:
        write_stats(stats_path, stats)
    log.info("%s: %d records, %d failed downloads", output, kept, stats["failed_downloads"])
    return stats
