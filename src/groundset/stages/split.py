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

from groundset.core.io import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

BLOCK = 1 << 20  # 1 MiB blocks keep numpy temporaries in cache
NEWLINE = ord("\n")


def shard_name(index: int) -> str:
    """File name of shard `index` (0-based)."""
    return f"shard_{index}.jsonl"


class ShardSink:
    """Writes the bytes of a manifest into consecutive shard files as the scan cuts them."""

    def __init__(self, outdir: str | os.PathLike, fsync: bool = True):
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.shard = 0
        self.handle = None
        self.tmp: Path | None = None

    def _open(self) -> None:
        """Start the next shard in a temp file."""
        self.tmp = self.outdir / f".{shard_name(self.shard)}.tmp"
        self.handle = open(self.tmp, "wb", buffering=0)  # noqa: SIM115 (closed in _close/abort)

    def _close(self) -> None:
        """Finish the current shard: flush, fsync, rename into place."""
        if self.fsync:
            os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.outdir / shard_name(self.shard))
        self.handle, self.tmp = None, None
        self.shard += 1

    def feed(self, chunk: bytes, pos: int, cuts: list[int]) -> None:
        """Write one block that starts at byte `pos`; `cuts` are shard ends inside it."""
        view = memoryview(chunk)
        start = 0
        for end in cuts:
            if self.handle is None:
                self._open()
            self.handle.write(view[start : end - pos])
            self._close()
            start = end - pos
        if start < len(chunk):
            if self.handle is None:
                self._open()
            self.handle.write(view[start:])

    def finish(self, add_newline: bool) -> None:
        """Close the last shard (adding the missing final newline)."""
        if self.handle is not None:
            if add_newline:
                self.handle.write(b"\n")
            self._close()

    def abort(self) -> None:
        """Remove the unfinished shard after an error."""
        if self.handle is not None:
            self.handle.close()
            self.tmp.unlink(missing_ok=True)


def _check_blank_lines(path: Path, newlines: np.ndarray, last_byte: int, pos: int) -> None:
    """Refuse a block (at byte `pos`, after `last_byte`) with a blank line in it or at its start."""
    starts_blank = len(newlines) > 0 and last_byte == NEWLINE and newlines[0] == 0
    if starts_blank or (len(newlines) > 1 and np.any(np.diff(newlines) == 1)):
        raise ValueError(f"{path}: blank line near byte {pos}; every line must be one JSON record")


def _add_cuts(
    ends: list[int], newlines: np.ndarray, pos: int, records: int, shard_size: int
) -> None:
    """Append to `ends` the shard ends inside a block at byte `pos` after `records` records."""
    target = shard_size * (len(ends) + 1)
    while target <= records + len(newlines):
        ends.append(pos + int(newlines[target - records - 1]) + 1)
        target += shard_size


def _shard_table(ends: list[int], records: int, shard_size: int) -> list[dict]:
    """The index's shard entries from their end bytes."""
    starts = [0, *ends[:-1]] if ends else []
    shards = []
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        count = min(shard_size, records - i * shard_size)
        shards.append(
            {"shard": i, "file": shard_name(i), "start": start, "end": end, "records": count}
        )
    return shards


def index_manifest(
    path: str | os.PathLike, shard_size: int, block: int = BLOCK, sink: ShardSink | None = None
) -> dict:
    """Byte ranges and record counts of the shards of a manifest (one line = one record).

    With a `sink`, the shards are written in the same pass.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    path = Path(path)
    size = path.stat().st_size
    ends: list[int] = []
    records = 0
    pos = 0
    last_byte = NEWLINE  # a file that starts with a newline starts with a blank line
    with (
        open(path, "rb", buffering=0) as handle,
        tqdm(total=size, unit="B", unit_scale=True, desc="index", mininterval=5) as bar,
    ):
        while chunk := handle.read(block):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == NEWLINE)
            _check_blank_lines(path, newlines, last_byte, pos)
            cut = len(ends)
            _add_cuts(ends, newlines, pos, records, shard_size)
            if sink is not None:
                sink.feed(chunk, pos, ends[cut:])
            records += len(newlines)
            pos += len(chunk)
            last_byte = chunk[-1]
            bar.update(len(chunk))
    if size and last_byte != NEWLINE:
        records += 1  # a last line without its newline is still a record
    if records > len(ends) * shard_size:  # a last, partial shard
        ends.append(size)
    if sink is not None:
        sink.finish(add_newline=bool(size) and last_byte != NEWLINE)
    return {
        "manifest": str(path.resolve()),
        "manifest_bytes": size,
        "records": records,
        "shard_size": shard_size,
        "shards": _shard_table(ends, records, shard_size),
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


def write_shard(index: dict, shard: int, output: str | os.PathLike, fsync: bool = True) -> int:
    """Write one shard of an indexed manifest atomically (fsynced unless told not); returns its records."""
    manifest = Path(index["manifest"])
    if not 0 <= shard < len(index["shards"]):
        raise IndexError(f"shard {shard} not in {manifest}'s index ({len(index['shards'])} shards)")
    if manifest.stat().st_size != index["manifest_bytes"]:
        raise RuntimeError(f"{manifest} changed since it was indexed; rerun the split")
    entry = index["shards"][shard]
    with open(manifest, "rb") as src, atomic_write(output, "wb", fsync=fsync) as dst:
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


def split_manifest(
    manifest: str | os.PathLike, outdir: str | os.PathLike, shard_size: int, fsync: bool = True
) -> dict:
    """Write all shards of a manifest plus `index.json` into `outdir` in one pass over it."""
    outdir = Path(outdir)
    sink = ShardSink(outdir, fsync=fsync)
    try:
        index = index_manifest(manifest, shard_size, sink=sink)
    except BaseException:
        sink.abort()
        raise
    write_index(index, outdir / "index.json")
    log.info("%s: %d records in %d shards", manifest, index["records"], len(index["shards"]))
    return index
