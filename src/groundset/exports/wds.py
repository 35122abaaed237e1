"""WebDataset export of the masked JSONL (`groundset.exports.common` for the skips).

WebDataset (`export_wds`): `outdir/shard-000000.tar`, `shard-000001.tar`, ... of `shard_size`
samples each. A sample is `{key}.{ext}`, the original image file's bytes unchanged, with ext
from its real format (magic bytes: `jpg` for JPEG, `png`, `webp`, `gif`, `bmp`, `tiff`;
whatever the file's name says), and `{key}.json`: the record without `mask_file`, plus
`key`, `width`, `height`, `bbox_pixels` per entity, and `mask_rle` (compressed COCO RLE, one per
box, aligned with `entities` and `mask_scores`; empty masks included) with `mask_format`
"rle". Keys are `<source>__<image_id>` (`<image_id>` without a source) with every character
outside [A-Za-z0-9_-] replaced by "_" (WebDataset cuts a key at its first "."): a key two
records share is an ExportError, never an overwrite. Members have mtime 0, uid/gid 0 and mode
0444, so the same input gives byte-identical shards. Each shard is written atomically; shards
of an earlier run beyond the new count are removed (the folder belongs to the export).
Memory: one 64-bit hash per sample for the collision check (~60 bytes), nothing else grows.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from PIL import Image

from groundset.core.config import section_defaults
from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.layout import WEBDATASET
from groundset.core.records import RecordError, record_relpath
from groundset.exports.common import (
    ExportError,
    Item,
    PathLike,
    Skip,
    SkipLog,
    pixel_box,
    prepare,
    run_records,
    skipped_path,
    stats_path,
)

# --- WebDataset -----------------------------------------------------------------------------

SHARD_NAME = "shard-{:06d}.tar"
_SHARD = re.compile(r"^shard-(\d{6,})\.tar$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# (magic bytes, offset, extension) of the formats an image download holds
_MAGIC = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"WEBP", 8, "webp"),
    (b"GIF87a", 0, "gif"),
    (b"GIF89a", 0, "gif"),
    (b"BM", 0, "bmp"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
)
_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
            "TIFF": "tiff", "JPEG2000": "jp2", "MPO": "jpg", "ICO": "ico"}  # fmt: skip
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_PADDING = bytes(_BLOCK)


def wds_key(record: dict) -> str:
    """The record's WebDataset key: `<source>__<image_id>`, unsafe characters as "_"."""
    try:
        parts = record_relpath(record, "").split("/")
    except RecordError:
        raise Skip("bad_name") from None
    return "__".join(_UNSAFE.sub("_", part) for part in parts)


def image_ext(data: bytes) -> str | None:
    """The extension of an image file's real format from its first bytes (None if unknown)."""
    for magic, offset, ext in _MAGIC:
        if data[offset : offset + len(magic)] == magic and (ext != "webp" or data[:4] == b"RIFF"):
            return ext
    import io

    try:
        with Image.open(io.BytesIO(data)) as img:
            return _PIL_EXT.get(img.format or "")
    except Exception:  # noqa: BLE001 (not an image PIL knows)
        return None


def read_image(path: str) -> tuple[bytes, str]:
    """An image file's bytes and real extension (Skip if missing or not an image)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise Skip("image_missing") from None
    except OSError:
        raise Skip("image_unreadable") from None
    ext = image_ext(data)
    if ext is None:
        raise Skip("image_unreadable")
    return data, ext


def wds_json(item: Item, key: str) -> dict:
    """The `.json` of a sample: the record without its mask file, masks as COCO RLE per box."""
    record = {k: v for k, v in item.record.items() if k not in ("mask_file", "mask_rle")}
    entities = [
        {"entity": name, "bbox": [float(v) for v in box],
         "bbox_pixels": pixel_box(box, item.width, item.height)}
        for name, box in item.boxes
    ]  # fmt: skip
    return {
        **record,
        "caption": item.caption,
        "key": key,
        "image": item.image,
        "width": item.width,
        "height": item.height,
        "entities": entities,
        "mask_scores": item.scores,
        "mask_rle": item.rles,
        "mask_format": "rle",
    }


def _octal(value: int, width: int) -> bytes:
    """A tar number field: zero-padded octal and a NUL, `width` bytes in all."""
    return b"%0*o\0" % (width - 1, value)


# The fixed parts of a member header (POSIX ustar): mode 0444, uid/gid 0, mtime 0, no owner
# names or device numbers (NULs, as tarfile writes them for a regular file).
_MODE_IDS = _octal(0o444, 8) + _octal(0, 8) + _octal(0, 8)
_MTIME = _octal(0, 12)
# after the checksum: type, link name, magic, then NULs to the end of the block
_TAIL = (b"0" + b"\0" * 100 + b"ustar\x0000").ljust(_BLOCK - 156, b"\0")
_TAIL_SUM = sum(_TAIL) + 8 * 32  # the checksum field itself counts as eight spaces
_MAX_SIZE = 8**11 - 1  # what 11 octal digits hold


def tar_header(name: str, size: int) -> bytes:
    """A regular member's tar header (owner 0, mode 0444, mtime 0): tarfile's bytes, faster."""
    raw = name.encode("ascii", errors="replace")
    if len(raw) > 100 or size > _MAX_SIZE or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, b"\0") + _MODE_IDS + _octal(size, 12) + _MTIME
    return head + b"%06o\0 " % (sum(head) + _TAIL_SUM) + _TAIL


class _ShardWriter:
    """Samples into `shard-NNNNNN.tar` files of `size` samples, each written atomically."""

    def __init__(self, outdir: Path, size: int) -> None:
        """A writer of `size`-sample shards into `outdir`; nothing is opened yet."""
        self.outdir, self.size = outdir, size
        self.shards = 0
        self.samples = 0
        self.bytes = 0
        self._context: AbstractContextManager | None = None
        self._handle: IO[bytes] | None = None
        self._in_shard = 0
        self._written = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """Write one sample (its members `(extension, bytes)`), opening a shard when due."""
        if self._handle is None:
            self._open()
        write = self._handle.write
        for ext, data in members:
            header = tar_header(f"{key}.{ext}", len(data))
            pad = -len(data) % _BLOCK
            write(header)
            write(data)  # large images pass the buffer without a copy
            write(_PADDING[:pad])
            self._written += len(header) + len(data) + pad
        self.samples += 1
        self._in_shard += 1
        if self._in_shard >= self.size:
            self.close()

    def _open(self) -> None:
        """Start the next shard."""
        self._context = atomic_write(self.outdir / SHARD_NAME.format(self.shards), "wb")
        self._handle = self._context.__enter__()
        self._in_shard = self._written = 0

    def close(self) -> None:
        """Finish the open shard (end-of-archive blocks, padded to a tar record), if any."""
        if self._handle is None:
            return
        end = 2 * _BLOCK
        end += -(self._written + end) % _RECORD
        self._handle.write(b"\0" * end)
        context, self._context, self._handle = self._context, None, None
        context.__exit__(None, None, None)
        self.bytes += self._written + end
        self.shards += 1

    def abort(self, err: BaseException) -> None:
        """Drop the open shard's temp file."""
        if self._context is not None:
            context, self._context, self._handle = self._context, None, None
            context.__exit__(type(err), err, err.__traceback__)


def shard_files(outdir: PathLike) -> list[Path]:
    """The `shard-NNNNNN.tar` files of a folder, in order."""
    folder = Path(outdir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SHARD.match(p.name))]
    return [path for _, path in sorted(found)]


def _duplicate(input: PathLike, key: str, before: int) -> bool:
    """Whether one of the first `before` records of the input has WebDataset key `key`."""
    for index, record in enumerate(iter_jsonl(input)):
        if index >= before:
            return False
        try:
            if wds_key(record) == key:
                return True
        except Skip:
            continue
    return False


def _wds_work(record: dict) -> tuple[str, str, bytes, bytes, int, int] | Skip:
    """(key, image extension, image bytes, json bytes, boxes, texts cleaned) of a record's
    sample, or a Skip."""
    try:
        item = prepare(record, masks=True)
        key = wds_key(record)
        data, ext = read_image(item.image)
    except Skip as skip:
        return skip.about(record)
    text = dumps_record(wds_json(item, key)).encode("utf-8")
    return key, ext, data, text, len(item.boxes), item.cleaned


def _write_samples(input: PathLike, writer: _ShardWriter, skips: SkipLog, workers: int) -> Counter:
    """Every record's sample into the shards (or its skip into the side file); the counts.
    ExportError for a key two records share."""
    counts: Counter = Counter()
    seen: set[int] = set()  # hashes of the keys written (an exact check on a hit)
    for index, sample in enumerate(run_records(_wds_work, input, workers, "export wds")):
        if isinstance(sample, Skip):
            skips.add(sample)
            continue
        key, ext, data, text, boxes, cleaned = sample
        counts["texts_cleaned"] += cleaned
        digest = hash(key)
        if digest in seen and _duplicate(input, key, index):
            raise ExportError(
                f"{input}: record {index + 1}: WebDataset key {key!r} is also an earlier "
                "record's: records need unique source/image_id pairs (and sources that stay "
                "distinct with every character outside [A-Za-z0-9_-] replaced by '_')"
            )
        seen.add(digest)
        writer.add(key, [(ext, data), ("json", text)])
        counts["boxes"] += boxes
        counts["images_without_boxes"] += not boxes
    return counts


def export_wds(
    input: PathLike, outdir: PathLike, shard_size: int | None = None, workers: int = 1,
    skipped: PathLike | None = None, stats: PathLike | None = None,
) -> dict:  # fmt: skip
    """WebDataset tar shards (image bytes and a json per sample) of a masked JSONL, the records
    it left out (`skipped`, default `<outdir>_skipped.jsonl` beside the folder: drop lines) and
    its stats envelope (`stats`, default `<outdir>_stats.json`), which it returns; `shard_size`
    None: the schema's export.webdataset.shard_size."""
    if shard_size is None:
        shard_size = section_defaults("export.webdataset")["shard_size"]
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    skipped = skipped or skipped_path(outdir, folder=True)
    writer = _ShardWriter(outdir, shard_size)
    with atomic_write(skipped) as skip_file:
        skips = SkipLog(skip_file, WEBDATASET.name)
        try:
            counts = _write_samples(input, writer, skips, workers)
            writer.close()
        except BaseException as err:
            writer.abort(err)
            raise
    for stale in shard_files(outdir)[writer.shards :]:
        stale.unlink()
    last = writer.shards - 1
    return skips.stats(
        stats or stats_path(outdir, folder=True),
        writer.samples,
        shards=writer.shards,
        samples=writer.samples,
        boxes=counts["boxes"],
        images_without_boxes=counts["images_without_boxes"],
        texts_cleaned=counts["texts_cleaned"],
        bytes=writer.bytes,
        skipped_file=str(skipped),
        shard_size=shard_size,
        outdir=str(outdir),
        # the shards as a WebDataset brace pattern (None for an empty export)
        urls=str(outdir / f"shard-{{{0:06d}..{last:06d}}}.tar") if writer.shards else None,
    )
