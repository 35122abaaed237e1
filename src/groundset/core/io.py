"""Atomic file writes and streaming JSON Lines helpers shared by every stage."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

# os.open's flags for a fresh temp file: never an existing one, never inherited by children.
_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# numpy's message when the C-level write of an array (`ndarray.tofile`, used by `np.save` on
# real files) comes up short, as it does on a full disk: "3145728 requested and 1003392 written".
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


class NoSpaceLeftError(OSError):
    """A write failed because its device (or the user's quota) is full; names the file."""

    def __str__(self) -> str:
        return str(self.strerror)


def _is_disk_full(err: OSError) -> bool:
    """Whether `err` is a full device or quota, or numpy's short-write report of one."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return err.errno is None and bool(_SHORT_WRITE.match(str(err)))


def _disk_full_error(path: Path, err: OSError) -> NoSpaceLeftError:
    """The clear error for a full disk (or quota) while writing `path`."""
    if err.errno == getattr(errno, "EDQUOT", None):
        return NoSpaceLeftError(err.errno, f"disk quota exceeded writing {path}")
    return NoSpaceLeftError(errno.ENOSPC, f"no space left on device writing {path}")


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")


def remove_stale_temps(path: Path) -> int:
    """Remove the temp files an earlier, killed writer of `path` left beside it (a SIGKILL
    leaves no time to clean up); returns how many. One job writes an output at a time, so
    any such file is stale."""
    removed = 0
    prefix = f".{path.name}."
    with contextlib.suppress(FileNotFoundError), os.scandir(path.parent) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and _TEMP_NAME.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create a fresh temp file beside `path` with the mode a plain open() gives (0o666 & ~umask).

    The kernel applies the umask (and any default ACL of the folder) itself, so nothing reads or
    sets the process-wide umask; tempfile.mkstemp would create the file 0600.
    """
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _TEMP_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temp file name beside {path}")


def plain_mode_tree(folder: str | os.PathLike) -> None:
    """Give every file under `folder` the mode a plain open() gives there (for files that other
    libraries wrote 0600, e.g. safetensors); measured with a temp file, the umask untouched."""
    folder = Path(folder)
    handle, probe = _create_temp(folder / "mode")
    os.close(handle)
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", fsync: bool = True) -> Iterator[IO]:
    """Open a temp file beside `path`; rename it over `path` only if the block succeeds.

    Temp files a killed earlier writer of `path` left are removed first.

    The file gets the mode a plain open() gives under the umask (the dataset lives on a shared
    filesystem); a full disk while flushing, syncing or closing raises NoSpaceLeftError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = _create_temp(path)
    encoding = None if "b" in mode else "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            try:
                handle.flush()
                if fsync:
                    os.fsync(handle.fileno())
                handle.close()
            except OSError as err:
                if _is_disk_full(err) and not isinstance(err, NoSpaceLeftError):
                    raise _disk_full_error(path, err) from err
                raise
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_save(
    path: str | os.PathLike, write: Callable[[IO], object], mode: str = "wb", fsync: bool = True
) -> None:
    """Write `path` atomically through `write(handle)`; a full disk raises NoSpaceLeftError."""
    try:
        with atomic_write(path, mode, fsync) as handle:
            write(handle)
    except NoSpaceLeftError:
        raise
    except OSError as err:
        if _is_disk_full(err):
            raise _disk_full_error(Path(path), err) from err
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
    """Stream the records (JSON objects) of a JSON Lines file; blank lines are skipped, a line that
    is not an object raises ValueError with its line number."""
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {err}") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: not a JSON object (a record): {line[:80]!r}")
            yield record


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Stream records into a JSON Lines file atomically; returns the number written."""
    count = 0
    with atomic_write(path) as handle:
        for record in records:
            handle.write(dumps_record(record))
            handle.write("\n")
            count += 1
    return count


class StalePlanError(RuntimeError):
    """The chunk files a gather got are not the chunks of the current chunk index."""


def check_chunk_plan(index_path: str | os.PathLike, chunks: list, stats: list[dict]) -> None:
    """Raise StalePlanError unless `chunks` (and their stats' byte ranges) are the index's chunks."""
    entries = read_json(index_path)["shards"]
    names = [Path(str(chunk)).name for chunk in chunks]
    expected = [f"chunk_{entry['shard']}.jsonl" for entry in entries]
    problem = None
    if names != expected:
        problem = f"got {len(names)} chunk files for the {len(expected)} chunks of the index"
    else:
        for name, entry, chunk_stats in zip(names, entries, stats, strict=True):
            got = chunk_stats.get("range")
            if got is not None and list(got) != [entry["start"], entry["end"]]:
                problem = (
                    f"{name} holds bytes {got}, the index says [{entry['start']}, {entry['end']}]"
                )
                break
    if problem:
        raise StalePlanError(
            f"the chunk plan is stale ({problem} in {index_path}): the caption input changed "
            "after the chunks were planned. Run the same command again; nothing is paid twice"
        )


def concat_chunks(
    files: Sequence[Sequence[str | os.PathLike]], outputs: Sequence[str | os.PathLike],
    stats: Sequence[str | os.PathLike], index: str | os.PathLike | None = None,
) -> list[dict]:  # fmt: skip
    """Concatenate aligned lists of chunk files (`files[k][j]`: chunk j's k-th file, e.g. records
    and drops) into `outputs[k]` in chunk order; return each chunk's stats.

    With `index` (the chunk index), first check that `files[0]` are exactly its chunks.
    """
    if any(len(group) != len(stats) for group in files) or len(files) != len(outputs):
        raise ValueError(f"chunk file lists not aligned: {[len(g) for g in files]}, {len(stats)}")
    per_chunk = [read_json(path) for path in stats]
    if index is not None:
        check_chunk_plan(index, list(files[0]), per_chunk)
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(atomic_write(path, "wb")) for path in outputs]
        for group, handle in zip(files, handles, strict=True):
            for path in group:
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, handle, 1 << 20)
    return per_chunk


BLOCK = 1 << 22  # bytes read at a time while streaming a file


def scan_lines(
    path: Path, needle: bytes, start: int = 0, count_lines: bool = False
) -> Iterator[tuple[int, int, bytes]]:
    """(offset, line number or -1, line) of each line of `path` from byte `start` holding
    `needle`, read in blocks (only those lines are cut out; line numbers count from `start`)."""
    with open(path, "rb") as handle:
        handle.seek(start)
        rest, rest_at, lines_before = b"", start, 0
        while True:
            block = handle.read(BLOCK)
            data = rest + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            hit = data.find(needle, 0, cut)
            done = 0
            while hit != -1:
                begin = data.rfind(b"\n", 0, hit) + 1
                end = data.find(b"\n", hit, cut)
                end = cut if end == -1 else end
                lineno = -1
                if count_lines:
                    lineno = lines_before + data.count(b"\n", done, begin)
                    lines_before, done = lineno, begin
                yield rest_at + begin, lineno, data[begin:end]
                hit = data.find(needle, end, cut)
            if count_lines:
                lines_before += data.count(b"\n", done, cut)
            if not block:
                return
            rest, rest_at = data[cut:], rest_at + cut


def contains_bytes(path: Path, needle: bytes) -> bool:
    """Whether the bytes of `path` hold `needle` (streamed in blocks)."""
    with open(path, "rb") as handle:
        tail = b""
        while block := handle.read(BLOCK):
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]
    return False
