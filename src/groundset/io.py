"""Atomic file writes and streaming JSON Lines helpers shared by every stage."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", fsync: bool = True) -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    encoding = None if "b" in mode else "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def clean_json_value(value: Any) -> Any:
    """Map NaN/inf floats (pandas' missing values) to None so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json_value(v) for v in value]
    return value


def dumps_record(record: dict) -> str:
    """Serialise one record as a strict-JSON, UTF-8 line (no trailing newline)."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write a small JSON document (stats, indices) atomically, pretty-printed."""
    with atomic_write(path) as handle:
        json.dump(clean_json_value(obj), handle, indent=2, sort_keys=True, allow_nan=False)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON document."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    """Stream records of a JSON Lines file; blank lines are skipped, bad lines raise with the line number."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Stream records into a JSON Lines file atomically; returns the number written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(dumps_record(record))
            handle.write("\n")
            count += 1
    return count


def concat_chunks(
    chunks: Iterable[str | os.PathLike], output: str | os.PathLike, side: str,
    side_out: str | os.PathLike,
) -> list[dict]:  # fmt: skip
    """Concatenate chunk JSONL files and their `…_{side}.jsonl` files in order; return their stats."""
    stats = []
    with atomic_write(output, "wb") as out, atomic_write(side_out, "wb") as side_handle:
        for chunk in chunks:
            base = str(chunk).removesuffix(".jsonl")
            for path, handle in ((chunk, out), (f"{base}_{side}.jsonl", side_handle)):
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, handle, 1 << 20)
            stats.append(read_json(f"{base}_stats.json"))
    return stats
