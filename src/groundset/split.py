"""Split stage: cut a manifest JSONL into shards of `shard_size` records by byte ranges.

Indexing reads the manifest once in large blocks and records where every shard starts and
ends; writing a shard is then a kernel-side copy of its byte range. Memory stays flat (one
block) whatever the shard size, and the shards are byte-identical slices of the manifest.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .io import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

BLOCK = 8 << 20
NEWLINE = ord("\n")


def shard_name(index: int) -> str:
    """File name of shard `index` (0-based)."""
    return f"shard_{index}.jsonl"


def index_manifest(path: str | os.PathLike, shard_size: int, block: int = BLOCK) -> dict:
    """Byte ranges and record counts of the shards of a manifest (one line = one record)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    path = Path(path)
    size = path.stat().st_size
    ends: list[int] = []
    records = 0
    pos = 0
    last_byte = NEWLINE  # a file that starts with a newline starts with a blank line
    with (
        open(path, "rb") as handle,
        tqdm(total=size, unit="B", unit_scale=True, desc="index", mininterval=5) as bar,
    ):
        while chunk := handle.read(block):
            if b"\n\n" in chunk or (last_byte == NEWLINE and chunk[0] == NEWLINE):
                raise ValueError(
                    f"{path}: blank line near byte {pos}; every line must be one JSON record"
                )
            lines = chunk.count(b"\n")
            if records + lines >= shard_size * (len(ends) + 1):
                newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == NEWLINE)
                target = shard_size * (len(ends) + 1)
                while target <= records + lines:
                    ends.append(pos + int(newlines[target - records - 1]) + 1)
                    target += shard_size
            records += lines
            pos += len(chunk)
            last_byte = chunk[-1]
            bar.update(len(chunk))
    if size and last_byte != NEWLINE:
        records += 1  # a last line without its newline is still a record
    if records > len(ends) * shard_size:  # a last, partial shard
        ends.append(size)
    starts = [0, *ends[:-1]] if ends else []
    shards = []
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        count = min(shard_size, records - i * shard_size)
        shards.append(
            {"shard": i, "file": shard_name(i), "start": start, "end": end, "records": count}
        )
    return {
        "manifest": str(path.resolve()),
        "manifest_bytes": size,
        "records": records,
        "shard_size": shard_size,
        "shards": shards,
    }


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy `length` bytes from `src` at `offset` to the current position of `dst`."""
    try:
        while length > 0:
            copied = os.copy_file_range(src, dst, min(length, 1 << 30), offset)
            if copied == 0:
                raise OSError("copy_file_range copied nothing")
            offset += copied
            length -= copied
        return
    except OSError:
        pass  # e.g. another filesystem or an old kernel: fall back to reads and writes
    while length > 0:
        data = os.pread(src, min(length, BLOCK), offset)
        if not data:
            raise OSError(f"unexpected end of file at byte {offset}")
        os.write(dst, data)
        offset += len(data)
        length -= len(data)


def write_shard(index: dict, shard: int, output: str | os.PathLike) -> int:
    """Write one shard of an indexed manifest atomically; returns its record count."""
    manifest = Path(index["manifest"])
    if not 0 <= shard < len(index["shards"]):
        raise IndexError(f"shard {shard} not in {manifest}'s index ({len(index['shards'])} shards)")
    if manifest.stat().st_size != index["manifest_bytes"]:
        raise RuntimeError(f"{manifest} changed since it was indexed; rerun the split")
    entry = index["shards"][shard]
    with open(manifest, "rb") as src, atomic_write(output, "wb") as dst:
        dst.flush()
        _copy_range(src.fileno(), dst.fileno(), entry["start"], entry["end"] - entry["start"])
        at_eof = entry["end"] == index["manifest_bytes"] and entry["end"] > entry["start"]
        if at_eof and os.pread(src.fileno(), 1, entry["end"] - 1) != b"\n":
            os.write(dst.fileno(), b"\n")
    return entry["records"]


def write_index(index: dict, path: str | os.PathLike) -> None:
    """Write a shard index as JSON."""
    write_json(path, index)


def read_index(path: str | os.PathLike) -> dict:
    """Read a shard index written by `write_index`."""
    return read_json(path)


def split_manifest(manifest: str | os.PathLike, outdir: str | os.PathLike, shard_size: int) -> dict:
    """Index a manifest and write all its shards plus `index.json` into `outdir`."""
    outdir = Path(outdir)
    index = index_manifest(manifest, shard_size)
    for entry in tqdm(index["shards"], unit="shard", desc="split", mininterval=5):
        write_shard(index, entry["shard"], outdir / entry["file"])
    write_index(index, outdir / "index.json")
    log.info("%s: %d records in %d shards", manifest, index["records"], len(index["shards"]))
    return index


def count_records(path: str | os.PathLike) -> int:
    """Number of records (non-empty lines) in a JSONL file, counted in blocks."""
    count = 0
    last = NEWLINE
    with open(path, "rb") as handle:
        while chunk := handle.read(BLOCK):
            count += chunk.count(b"\n")
            last = chunk[-1]
    return count + (last != NEWLINE)


def summarize_counts(index: dict, counts: list[dict]) -> dict:
    """Check per-shard record counts against the index and total them."""
    by_shard = {c["shard"]: c["records"] for c in counts}
    expected = {e["shard"]: e["records"] for e in index["shards"]}
    if by_shard != expected:
        bad = sorted(
            s for s in expected.keys() | by_shard.keys() if by_shard.get(s) != expected.get(s)
        )
        raise RuntimeError(f"shard record counts differ from the index for shards {bad}")
    return {
        "shards": len(expected),
        "records": sum(by_shard.values()),
        "records_per_shard": by_shard,
    }
