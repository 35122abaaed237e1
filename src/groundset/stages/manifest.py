"""Manifest stage: walk img2dataset `files` output into one JSONL record per downloaded image."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from groundset.core.io import atomic_write, clean_json_value, dumps_record, write_json
from groundset.stages.download import collect_stats

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


def make_record(image_path: Path, meta: dict, source: str, columns: list[str] | None) -> dict:
    """One manifest record from an image path and its img2dataset sidecar."""
    if columns is None:
        columns = sorted(k for k in meta if k not in IMG2DATASET_KEYS)
    caption = meta.get("caption")
    return {
        "image": [str(image_path)],
        "text": "" if caption is None else str(caption),
        "image_id": image_path.stem,
        "source": source,
        "url": meta.get("url"),
        "meta": {c: clean_json_value(meta.get(c)) for c in columns},
        "width": meta.get("width"),
        "height": meta.get("height"),
    }


def iter_records(
    download_dir: str | os.PathLike, source: str, columns: list[str] | None, counts: Counter
) -> Iterator[dict]:
    """Stream records of every successful download, counting what is dropped and why."""
    root = Path(download_dir).resolve()
    bar = tqdm(unit="img", desc=f"manifest {source}", mininterval=5)
    for shard in shard_dirs(root):
        sidecars, images = scan_shard(shard)
        for stem in sidecars:
            counts["sidecars"] += 1
            try:
                with open(shard / f"{stem}.json", encoding="utf-8") as handle:
                    meta = json.load(handle)
            except (OSError, ValueError) as err:
                log.warning("%s/%s.json: unreadable sidecar (%s)", shard, stem, err)
                counts["dropped_bad_sidecar"] += 1
                continue
            if meta.get("status", "success") != "success":
                counts["dropped_not_success"] += 1
                continue
            name = images.get(stem)
            if name is None:
                log.warning("%s/%s: sidecar without an image file", shard, stem)
                counts["dropped_image_missing"] += 1
                continue
            counts["records"] += 1
            bar.update()
            yield make_record(shard / name, meta, source, columns)
    bar.close()


def build_manifest(
    download_dir: str | os.PathLike,
    output: str | os.PathLike,
    source: str,
    columns: list[str] | None = None,
    stats_path: str | os.PathLike | None = None,
) -> dict:
    """Write the manifest JSONL of one source atomically and return (and optionally write) stats."""
    download_dir = Path(download_dir)
    if not download_dir.is_dir():
        raise FileNotFoundError(f"download folder {download_dir} does not exist")
    counts: Counter = Counter()
    with atomic_write(output) as handle:
        for record in iter_records(download_dir, source, columns, counts):
            handle.write(dumps_record(record))
            handle.write("\n")
    downloads = collect_stats(download_dir)
    stats = {
        "source": source,
        "records": counts["records"],
        "sidecars": counts["sidecars"],
        "dropped": {
            "bad_sidecar": counts["dropped_bad_sidecar"],
            "not_success": counts["dropped_not_success"],
            "image_missing": counts["dropped_image_missing"],
        },
        "download": downloads,
        "failed_downloads": downloads["count"] - downloads["successes"],
    }
    if stats_path:
        write_json(stats_path, stats)
    log.info(
        "%s: %d records, %d failed downloads", output, stats["records"], stats["failed_downloads"]
    )
    return stats
