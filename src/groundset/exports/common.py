"""Exports of the masked JSONL for other tools: COCO instances, ODVG grounding, WebDataset shards.

All three stream the input record by record (memory flat in the input size) and write
atomically (`io.atomic_write`). A record one of them cannot export is never dropped silently:
it is counted under `skipped` {reason: n} of the returned stats. Reasons: `no_image` (the
record names none), `bad_box` (not four finite numbers, or inverted or empty once clipped to
[0, 1]), `image_missing`, `image_unreadable` (its size or format cannot be read), `mask_missing` (entities but no
mask file or RLE, or the file is gone), `mask_unreadable`, `masks_not_aligned` (masks or
`mask_scores` not one per box, or sizes disagreeing with `mask_shape` or each other) and
`bad_name` (WebDataset: an id or source that cannot name a sample).
A record with no entities is exported as an image without boxes (`images_without_boxes`).
Image sizes come from the masks (`mask_shape`, the RLE size or the .npy shape) when there are
any, else the record's `width`/`height` (or data-juicer's `image_width`/`image_height`), else
the image file's header (never decoded).

COCO (`export_coco`): `images` (ids from 1, `file_name` the record's image path as it is,
`width`, `height`, `key`, `source`, `url`, `caption`), `annotations` (ids from 1; `bbox`
[x, y, w, h] in pixels from the normalized box, clipped to the image; `segmentation` the stored
mask as compressed COCO RLE, `size` [H, W]; `area` its pixel count; `iscrowd` 0; `score` the
SAM2 score), `categories` (ids from 1 in order of first use; names lower-case, stripped, inner
whitespace collapsed). An annotation whose stored mask is empty is left out (an instance of
area 0 breaks COCO evaluation) and counted in `annotations_skipped` as `empty_mask`; an
entity whose name normalizes to nothing as `empty_name`; its image stays. Beside the file,
`<stem>_categories.json` maps each category to the raw entity names it gathers:
{"categories": [{"id", "name", "raw_names", "annotations"}]}. Images are written straight
into the output and annotations spooled to an anonymous temp file beside it, so only the
category table is held in memory.

ODVG (`export_odvg`): one line per image, as Open-GroundingDino and MM-Grounding-DINO read it:
{"filename", "height", "width", "grounding": {"caption", "regions": [{"bbox" [x1, y1, x2, y2]
in pixels clipped to the image, "phrase" (the entity name, stripped), "tokens_positive"
[[start, end]]}]}}, with caption[start:end].lower() == phrase.lower(). A phrase is looked up
in the caption case-insensitively, a whole-word occurrence first, then anywhere (e.g. "dog"
inside "dogs"); every box of one phrase points at the same span. Missing phrase policy: a
phrase the caption (as captioned) does not contain is appended once, after ". " (after a space
when the caption already ends in ".", "!" or "?"; as the whole caption when it is empty), and
its regions point at the appended text: every region keeps a valid span, the caption stays
true (it only gains the names of what is in the image) and no box is lost. Stats count
distinct phrases per image: `phrases_found` in the caption as it was, `phrases_appended`.
A region whose entity name is blank is left out (`regions_skipped` `empty_phrase`).
(Open-GroundingDino joins `filename` to its dataset root, which keeps an absolute path as it
is, and builds its prompt from the phrases; MM-Grounding-DINO reads `caption` and
`tokens_positive`.)

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

Speed: reading `.npy` masks and encoding them as RLE (COCO, WebDataset) costs more than
copying the image; `workers` > 1 spreads that over forked processes (input order kept, a few
small batches in flight). Masks stored as RLE (`mask.mask_format: rle`) are passed through.

`check_exports` recounts the masked JSONL with the exporters' own rules and compares the
images and boxes each export holds, streaming them.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import tarfile
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from groundset.core.io import atomic_write, dumps_record, iter_jsonl, write_json
from groundset.core.records import (
    RecordError,
    cleaned_texts,
    image_path,
    record_boxes,
    record_key,
    record_relpath,
)
from groundset.stages.mask import encode_rle
from groundset.tools.validate import image_header_size

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
_BATCH = 16  # records per task when exporting with several worker processes


class ExportError(RuntimeError):
    """A problem that stops an export (two records with one WebDataset key)."""


class _Skip(Exception):
    """A record an export cannot take, with the reason it is counted under."""

    def __init__(self, reason: str) -> None:
        """Remember the reason (the record it is about is named by `about`)."""
        super().__init__(reason)
        self.reason = reason
        self.record: dict = {}

    def about(self, record: dict) -> _Skip:
        """This skip, naming the record (key, source, image_id, image, url) for the side file."""
        try:
            key: str | None = record_key(record)
        except RecordError:
            key = None
        try:
            image: str | None = image_path(record)
        except RecordError:
            image = None
        self.record = {"key": key, "source": record.get("source"),
                       "image_id": record.get("image_id"), "image": image,
                       "url": record.get("url")}  # fmt: skip
        return self


class _SkipLog:
    """The side file of the records an export left out, one line each with `drop_reason`, and
    their counts by reason."""

    def __init__(self, handle: IO[str] | None, stage: str) -> None:
        """Lines go to `handle` (None: counted only), tagged with `drop_stage` `stage`."""
        self.handle, self.stage = handle, stage
        self.counts: Counter = Counter()

    def add(self, skip: _Skip) -> None:
        """Count a skipped record and write its line."""
        self.counts[skip.reason] += 1
        if self.handle is not None:
            line = {**skip.record, "drop_stage": self.stage, "drop_reason": skip.reason}
            self.handle.write(dumps_record(line) + "\n")


def skipped_path(output: PathLike) -> Path:
    """The default side file of an export's skipped records: `<output stem>_skipped.jsonl`."""
    output = Path(output)
    return output.with_name(f"{output.stem if output.suffix else output.name}_skipped.jsonl")


@dataclass
class _Item:
    """A record as the exporters see it: image, cleaned caption and boxes (records.clean_name,
    clean_caption), size, and masks when asked for."""

    record: dict
    image: str
    boxes: list[tuple[str, list[float]]]  # (cleaned entity name, normalized box)
    scores: list[float] | None
    width: int
    height: int
    rles: list[dict] = field(default_factory=list)  # compressed COCO RLE per box (str counts)
    areas: list[int] = field(default_factory=list)  # pixels per mask
    caption: str = ""  # cleaned
    cleaned: int = 0  # texts (caption, names) the cleaning changed

    @property
    def raw_names(self) -> list[str]:
        """The entity name of each box as the record has it."""
        return [name for name, _ in record_boxes(self.record)]


# --- records, sizes and masks (shared by every export and the check) ------------------------


def category_name(name: str) -> str:
    """An entity name as a category: lower-case, stripped, inner whitespace collapsed."""
    return " ".join(str(name).split()).lower()


def pixel_box(box: list[float], width: int, height: int) -> list[float]:
    """A normalized [x1, y1, x2, y2] box in pixels, clipped to the image (2 decimals)."""
    x1, y1, x2, y2 = box
    w, h = float(width), float(height)
    return [
        round(min(max(x1 * w, 0.0), w), 2),
        round(min(max(y1 * h, 0.0), h), 2),
        round(min(max(x2 * w, 0.0), w), 2),
        round(min(max(y2 * h, 0.0), h), 2),
    ]


def _positive_int(value: Any) -> int | None:
    """`value` as a positive int (a one-item list as data-juicer stores it), else None."""
    if isinstance(value, list | tuple):
        value = value[0] if len(value) == 1 else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value > 0 and float(value).is_integer() else None


def _stated_size(record: dict) -> tuple[int, int] | None:
    """(width, height) from `mask_shape` or the first RLE's size, without reading a file."""
    shape = record.get("mask_shape")
    if isinstance(shape, list | tuple) and len(shape) == 3:
        height, width = _positive_int(shape[1]), _positive_int(shape[2])
        if height and width:
            return width, height
    rles = record.get("mask_rle")
    if isinstance(rles, list) and rles and isinstance(rles[0], dict):
        size = rles[0].get("size")
        if isinstance(size, list | tuple) and len(size) == 2:
            height, width = _positive_int(size[0]), _positive_int(size[1])
            if height and width:
                return width, height
    return None


def image_size(record: dict, image: str) -> tuple[int, int]:
    """(width, height): masks' size, else the record's, else the image header (_Skip if none)."""
    stated = _stated_size(record)
    if stated:
        return stated
    mask_file = record.get("mask_file")
    if mask_file and os.path.isfile(mask_file):
        try:
            shape = np.load(mask_file, mmap_mode="r").shape  # the header only
            if len(shape) == 3 and shape[1] and shape[2]:
                return int(shape[2]), int(shape[1])
        except Exception:  # noqa: BLE001 (numpy raises many types for broken files)
            pass  # the size comes from elsewhere; an export that needs the masks says so
    width, height = _positive_int(record.get("width")), _positive_int(record.get("height"))
    if width and height:
        return width, height
    stats = record.get("__dj__stats__") or {}
    if isinstance(stats, dict):
        width = _positive_int(stats.get("image_width"))
        height = _positive_int(stats.get("image_height"))
        if width and height:
            return width, height
    if not os.path.isfile(image):
        raise _Skip("image_missing")
    size = image_header_size(image)  # the header only, also of an image PIL calls a bomb
    if size is None:
        raise _Skip("image_unreadable")
    return size


def _plain_rle(rle: Any) -> bool:
    """Whether `rle` is already {"size": [H, W], "counts": str}, as `mask.encode_rle` stores it."""
    if type(rle) is not dict or len(rle) != 2 or type(rle.get("counts")) is not str:
        return False
    size = rle.get("size")
    return (
        type(size) is list
        and len(size) == 2
        and type(size[0]) is type(size[1]) is int
        and size[0] > 0
        and size[1] > 0
    )


def _compressed(rle: Any) -> dict:
    """One stored RLE as {"size": [H, W], "counts": str} (uncompressed counts compressed)."""
    from pycocotools import mask as mask_utils

    if _plain_rle(rle):
        return rle
    size = rle.get("size") if isinstance(rle, dict) else None
    if not (isinstance(size, list | tuple) and len(size) == 2):
        raise _Skip("mask_unreadable")
    height, width = _positive_int(size[0]), _positive_int(size[1])
    counts = rle.get("counts")
    if not height or not width:
        raise _Skip("mask_unreadable")
    if isinstance(counts, list):  # uncompressed RLE: run lengths
        try:
            counts = mask_utils.frPyObjects({"size": [height, width], "counts": counts},
                                            height, width)["counts"]  # fmt: skip
        except Exception:  # noqa: BLE001
            raise _Skip("mask_unreadable") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str):
        raise _Skip("mask_unreadable")
    return {"size": [height, width], "counts": counts}


def record_masks(record: dict, count: int) -> tuple[list[dict], list[int], int, int]:
    """(COCO RLE per box, pixels per mask, width, height) of a record's masks; _Skip if unusable."""
    from pycocotools import mask as mask_utils

    stored = record.get("mask_rle")
    if isinstance(stored, list) and stored:
        if len(stored) != count:
            raise _Skip("masks_not_aligned")
        rles = [_compressed(rle) for rle in stored]
        height, width = rles[0]["size"]
        if any(rle["size"] != [height, width] for rle in rles):
            raise _Skip("masks_not_aligned")
    else:
        path = record.get("mask_file")
        if not path:
            raise _Skip("mask_missing")
        try:
            masks = np.load(path)
        except FileNotFoundError:
            raise _Skip("mask_missing") from None
        except Exception:  # noqa: BLE001 (numpy raises many types for broken files)
            raise _Skip("mask_unreadable") from None
        if masks.ndim != 3 or not masks.shape[1] or not masks.shape[2]:
            raise _Skip("mask_unreadable")
        if masks.shape[0] != count:
            raise _Skip("masks_not_aligned")
        height, width = int(masks.shape[1]), int(masks.shape[2])
        rles = encode_rle(masks.astype(bool, copy=False))
    try:  # pixel counts from the RLE runs (cheaper than summing the masks)
        coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
        areas = [int(a) for a in mask_utils.area(coded)]
    except Exception:  # noqa: BLE001 (a damaged counts string)
        raise _Skip("mask_unreadable") from None
    stated = record.get("mask_shape")
    if stated is not None and (
        not isinstance(stated, list | tuple) or list(stated) != [count, height, width]
    ):
        raise _Skip("masks_not_aligned")
    return rles, areas, width, height


def _valid_box(box: Any) -> bool:
    """Whether `box` is four finite numbers that, clipped to [0, 1], still have x1 < x2 and
    y1 < y2 (an inverted or empty box would give a negative or zero pixel size)."""
    if not (
        type(box) in (list, tuple)
        and len(box) == 4
        and all(type(v) in (int, float) for v in box)
        and math.isfinite(sum(box))
    ):
        return False
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in box)
    return x1 < x2 and y1 < y2


def prepare(record: dict, masks: bool) -> _Item:
    """A record's image, boxes, scores, size (masks too when `masks`); _Skip if not exportable."""
    try:
        image = image_path(record)
    except RecordError:
        raise _Skip("no_image") from None
    try:
        boxes = record_boxes(record)
    except (AttributeError, TypeError, KeyError):
        raise _Skip("bad_box") from None
    if not all(_valid_box(box) for _, box in boxes):
        raise _Skip("bad_box")
    if not os.path.isfile(image):
        raise _Skip("image_missing")
    scores = record.get("mask_scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(boxes)):
        raise _Skip("masks_not_aligned")
    caption, names, cleaned = cleaned_texts(record)
    boxes = [(name, box) for name, (_, box) in zip(names, boxes, strict=True)]
    texts = {"caption": caption, "cleaned": cleaned}
    if masks and boxes:
        rles, areas, width, height = record_masks(record, len(boxes))
        return _Item(record, image, boxes, scores, width, height, rles, areas, **texts)
    width, height = image_size(record, image)
    return _Item(record, image, boxes, scores, width, height, **texts)


def _progress(records: Iterator[dict], desc: str) -> Iterator[dict]:
    """Records with a progress bar (every 5 s at most)."""
    return tqdm(records, desc=desc, unit="rec", mininterval=5)


def _apply(func: Callable[[dict], Any], batch: list[dict]) -> list[Any]:
    """`func` over a batch of records (in a worker process)."""
    return [func(record) for record in batch]


def _masks_in_records(input: PathLike) -> bool:
    """Whether the input's first record carries its masks as RLE (nothing to read or encode)."""
    for record in iter_jsonl(input):
        return bool(record.get("mask_rle")) and not record.get("mask_file")
    return False


def run_records(
    func: Callable[[dict], Any], input: PathLike, workers: int, desc: str
) -> Iterator[Any]:
    """`func(record)` for each input record in order; in `workers` forked processes when > 1
    and the masks are files to read and encode (with RLE in the records, one process is
    faster: passing the images between processes costs more than it saves)."""
    if workers > 1 and _masks_in_records(input):
        workers = 1
    if workers <= 1:
        for record in _progress(iter_jsonl(input), desc):
            yield func(record)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pool.submit(int).result()  # fork the workers before the progress bar starts a thread
        pending: deque[Future] = deque()
        batch: list[dict] = []
        for record in _progress(iter_jsonl(input), desc):
            batch.append(record)
            if len(batch) >= _BATCH:
                pending.append(pool.submit(_apply, func, batch))
                batch = []
                if len(pending) >= 2 * workers:
                    yield from pending.popleft().result()
        if batch:
            pending.append(pool.submit(_apply, func, batch))
        while pending:
            yield from pending.popleft().result()


# --- COCO -----------------------------------------------------------------------------------


def categories_path(output: PathLike) -> Path:
    """Where the category mapping goes by default: `coco.json` -> `coco_categories.json`."""
    output = Path(output)
    return output.with_name(output.stem + "_categories.json")


def coco_kept(item: _Item) -> tuple[list[int], Counter]:
    """Indices of the boxes that become COCO annotations, and why the others do not."""
    kept, dropped = [], Counter()
    for i, (name, _) in enumerate(item.boxes):
        if not category_name(name):
            dropped["empty_name"] += 1
        elif item.areas[i] == 0:
            dropped["empty_mask"] += 1
        else:
            kept.append(i)
    return kept, dropped


def _coco_image(item: _Item, image_id: int) -> dict:
    """The COCO `images` entry of an item."""
    record = item.record
    return {
        "id": image_id,
        "file_name": item.image,
        "width": item.width,
        "height": item.height,
        "key": record_key(record),
        "source": record.get("source"),
        "url": record.get("url"),
        "caption": item.caption,
    }


def _coco_work(record: dict) -> _Item | _Skip:
    """A record prepared for COCO (masks as RLE), or why it is skipped (runs in a worker)."""
    try:
        return prepare(record, masks=True)
    except _Skip as skip:
        return skip.about(record)


def export_coco(
    input: PathLike, output: PathLike, categories: PathLike | None = None, workers: int = 1,
    skipped: PathLike | None = None,
) -> dict:  # fmt: skip
    """A COCO instances JSON of a masked JSONL, its category mapping and the records it left
    out (`skipped`, default `<stem>_skipped.jsonl`, with `drop_reason`); returns the counts."""
    output = Path(output)
    mapping_path = Path(categories) if categories is not None else categories_path(output)
    table: dict[str, dict] = {}  # category name -> {id, raw_names, annotations}
    counts: Counter = Counter()
    dropped: Counter = Counter()
    with (
        atomic_write(skipped or skipped_path(output)) as skip_file,
        atomic_write(output) as out,
        tempfile.TemporaryFile(
            "w+", encoding="utf-8", dir=output.parent, prefix=f".{output.name}.", suffix=".spool"
        ) as spool,
    ):
        info = {"description": "groundset COCO instances export", "version": "1.0"}
        out.write('{"info": ' + dumps_record(info) + ', "licenses": [], "images": [\n')
        skips = _SkipLog(skip_file, "export_coco")
        for item in run_records(_coco_work, input, workers, "export coco"):
            if isinstance(item, _Skip):
                skips.add(item)
                continue
            counts["images"] += 1
            image_id = counts["images"]
            out.write(("" if image_id == 1 else ",\n") + dumps_record(_coco_image(item, image_id)))
            counts["images_without_boxes"] += not item.boxes
            counts["texts_cleaned"] += item.cleaned
            kept, reasons = coco_kept(item)
            dropped.update(reasons)
            raw_names = item.raw_names
            for i in kept:
                raw, (name, box) = raw_names[i], item.boxes[i]
                name = category_name(name)
                category = table.get(name)
                if category is None:
                    category = {"id": len(table) + 1, "raw_names": set(), "annotations": 0}
                    table[name] = category
                category["raw_names"].add(raw)
                category["annotations"] += 1
                x1, y1, x2, y2 = pixel_box(box, item.width, item.height)
                counts["annotations"] += 1
                annotation = {
                    "id": counts["annotations"],
                    "image_id": image_id,
                    "category_id": category["id"],
                    "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": item.areas[i],
                    "iscrowd": 0,
                    "segmentation": item.rles[i],
                }
                if item.scores is not None:
                    annotation["score"] = item.scores[i]
                spool.write(
                    ("" if counts["annotations"] == 1 else ",\n") + dumps_record(annotation)
                )
        out.write('\n], "annotations": [\n')
        spool.seek(0)
        shutil.copyfileobj(spool, out, 1 << 20)
        entries = [{"id": c["id"], "name": name} for name, c in table.items()]
        out.write('\n], "categories": [\n' + ",\n".join(map(dumps_record, entries)) + "\n]}\n")
        mapping = [
            {"id": c["id"], "name": name, "raw_names": sorted(c["raw_names"]),
             "annotations": c["annotations"]}
            for name, c in table.items()
        ]  # fmt: skip
        write_json(mapping_path, {"categories": mapping})
    stats = {
        "images": counts["images"],
        "annotations": counts["annotations"],
        "categories": len(table),
        "images_without_boxes": counts["images_without_boxes"],
        "texts_cleaned": counts["texts_cleaned"],
        "skipped": dict(skips.counts),
        "skipped_file": str(skipped or skipped_path(output)),
        "annotations_skipped": dict(dropped),
        "output": str(output),
        "categories_file": str(mapping_path),
    }
    log.info("coco export: %s", stats)
    return stats


# --- ODVG -----------------------------------------------------------------------------------


def odvg_phrase(name: str) -> str:
    """The phrase of an entity in ODVG (its name, stripped)."""
    return str(name).strip()


def find_phrase(caption: str, phrase: str) -> tuple[int, int] | None:
    """(start, end) of `phrase` in `caption`, case-insensitive, a whole word first; or None."""
    escaped = re.escape(phrase)
    for pattern in (rf"(?<!\w){escaped}(?!\w)", escaped):
        for match in re.finditer(pattern, caption, re.IGNORECASE):
            start, end = match.span()
            if caption[start:end].lower() == phrase.lower():
                return start, end
    return None


def append_phrase(caption: str, phrase: str) -> tuple[str, tuple[int, int]]:
    """The caption with a missing phrase appended (the module's policy), and its span."""
    if not caption.strip():
        return phrase, (0, len(phrase))
    caption = caption.rstrip()
    caption += " " if caption.endswith((".", "!", "?")) else ". "
    return caption + phrase, (len(caption), len(caption) + len(phrase))


def ground(item: _Item, caption: str) -> tuple[str, list[dict], Counter]:
    """The caption (missing phrases appended) and ODVG regions of an item, with counts."""
    counts: Counter = Counter()
    spans: dict[str, tuple[int, int]] = {}
    regions = []
    original = caption  # phrases are looked up in the caption as it came, never in appended text
    for name, box in item.boxes:
        phrase = odvg_phrase(name)
        if not phrase:
            counts["empty_phrase"] += 1
            continue
        span = spans.get(phrase.lower())
        if span is None:
            span = find_phrase(original, phrase)
            if span is None:
                caption, span = append_phrase(caption, phrase)
                counts["phrases_appended"] += 1
            else:
                counts["phrases_found"] += 1
            spans[phrase.lower()] = span
        regions.append({
            "bbox": pixel_box(box, item.width, item.height),
            "phrase": phrase,
            "tokens_positive": [list(span)],
        })  # fmt: skip
    return caption, regions, counts


def export_odvg(input: PathLike, output: PathLike, skipped: PathLike | None = None) -> dict:
    """An ODVG grounding JSONL (one line per image) of a masked JSONL and the records it left out
    (`skipped`, default `<stem>_skipped.jsonl`, with `drop_reason`); returns the counts."""
    counts: Counter = Counter()
    with atomic_write(skipped or skipped_path(output)) as skip_file, atomic_write(output) as out:
        skips = _SkipLog(skip_file, "export_odvg")
        for record in _progress(iter_jsonl(input), "export odvg"):
            try:
                item = prepare(record, masks=False)
            except _Skip as skip:
                skips.add(skip.about(record))
                continue
            caption, regions, found = ground(item, item.caption)
            counts.update(found)
            counts["texts_cleaned"] += item.cleaned
            counts["images"] += 1
            counts["regions"] += len(regions)
            counts["images_without_boxes"] += not item.boxes
            line = {
                "filename": item.image,
                "height": item.height,
                "width": item.width,
                "grounding": {"caption": caption, "regions": regions},
            }
            out.write(dumps_record(line) + "\n")
    stats = {
        **{k: counts[k] for k in ("images", "regions", "phrases_found", "phrases_appended")},
        "images_without_boxes": counts["images_without_boxes"],
        "texts_cleaned": counts["texts_cleaned"],
        "skipped": dict(skips.counts),
        "skipped_file": str(skipped or skipped_path(output)),
        "regions_skipped": {k: counts[k] for k in ("empty_phrase",) if counts[k]},
        "output": str(output),
    }
    log.info("odvg export: %s", stats)
    return stats


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
        raise _Skip("bad_name") from None
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
    """An image file's bytes and real extension (_Skip if missing or not an image)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise _Skip("image_missing") from None
    except OSError:
        raise _Skip("image_unreadable") from None
    ext = image_ext(data)
    if ext is None:
        raise _Skip("image_unreadable")
    return data, ext


def wds_json(item: _Item, key: str) -> dict:
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
        except _Skip:
            continue
    return False


def _wds_work(record: dict) -> tuple[str, str, bytes, bytes, int, int] | _Skip:
    """(key, image extension, image bytes, json bytes, boxes, texts cleaned) of a record's
    sample, or a _Skip."""
    try:
        item = prepare(record, masks=True)
        key = wds_key(record)
        data, ext = read_image(item.image)
    except _Skip as skip:
        return skip.about(record)
    text = dumps_record(wds_json(item, key)).encode("utf-8")
    return key, ext, data, text, len(item.boxes), item.cleaned


def export_wds(
    input: PathLike, outdir: PathLike, shard_size: int = 10000, workers: int = 1,
    skipped: PathLike | None = None,
) -> dict:  # fmt: skip
    """WebDataset tar shards (image bytes and a json per sample) of a masked JSONL and the records
    it left out (`skipped`, default `<outdir>_skipped.jsonl` beside the folder, with
    `drop_reason`); the counts."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, not {shard_size}")
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    skipped = skipped or skipped_path(outdir)
    writer = _ShardWriter(outdir, shard_size)
    counts: Counter = Counter()
    seen: set[int] = set()  # hashes of the keys written (an exact check on a hit)
    with atomic_write(skipped) as skip_file:
        skips = _SkipLog(skip_file, "export_wds")
        try:
            for index, sample in enumerate(run_records(_wds_work, input, workers, "export wds")):
                if isinstance(sample, _Skip):
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
            writer.close()
        except BaseException as err:
            writer.abort(err)
            raise
    for stale in shard_files(outdir)[writer.shards :]:
        stale.unlink()
    last = writer.shards - 1
    stats = {
        "shards": writer.shards,
        "samples": writer.samples,
        "boxes": counts["boxes"],
        "images_without_boxes": counts["images_without_boxes"],
        "texts_cleaned": counts["texts_cleaned"],
        "bytes": writer.bytes,
        "skipped": dict(skips.counts),
        "skipped_file": str(skipped),
        "shard_size": shard_size,
        "outdir": str(outdir),
        # the shards as a WebDataset brace pattern (None for an empty export)
        "urls": str(outdir / f"shard-{{{0:06d}..{last:06d}}}.tar") if writer.shards else None,
    }
    log.info("webdataset export: %s", stats)
    return stats


# --- checks ---------------------------------------------------------------------------------

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


class _JsonScanner:
    """Values of a JSON document read in chunks: one array item at a time, never the whole."""

    def __init__(self, handle: IO[str], chunk: int = 1 << 20) -> None:
        """A scanner over an open text file, read `chunk` characters at a time."""
        self.handle, self.chunk = handle, chunk
        self.buffer, self.pos, self.eof = "", 0, False

    def _fill(self) -> bool:
        """Read the next chunk into the buffer; False at the end of the file."""
        data = self.handle.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buffer = self.buffer[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end)."""
        while True:
            self.pos = _SPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self._fill():
                return ""

    def take(self, expected: str) -> str:
        """Consume the next character, which must be one of `expected`."""
        char = self.peek()
        if not char or char not in expected:
            raise ValueError(f"expected one of {expected!r}, found {char or 'the end'!r}")
        self.pos += 1
        return char

    def value(self) -> Any:
        """The next JSON value."""
        while True:
            self.peek()
            try:
                value, end = _DECODER.raw_decode(self.buffer, self.pos)
            except json.JSONDecodeError:
                if self._fill():
                    continue
                raise
            if end == len(self.buffer) and not self.eof and self._fill():
                continue  # a number may go on in the next chunk
            self.pos = end
            return value

    def object_items(self) -> Iterator[tuple[str, bool, Any]]:
        """(key, is array item, value) of a top-level object, array values item by item."""
        self.take("{")
        if self.peek() == "}":
            return
        while True:
            key = self.value()
            self.take(":")
            if self.peek() == "[":
                self.take("[")
                if self.peek() == "]":
                    self.take("]")
                else:
                    while True:
                        yield key, True, self.value()
                        if self.take(",]") == "]":
                            break
            else:
                yield key, False, self.value()
            if self.take(",}") == "}":
                return


def _expected(masked: PathLike, coco: bool, odvg: bool, wds: bool) -> dict[str, Counter]:
    """What each export should hold, recounted from the masked JSONL by the exports' rules."""
    want = {name: Counter() for name in ("coco", "odvg", "wds")}
    names: set[str] = set()
    for record in _progress(iter_jsonl(masked), "check exports"):
        if odvg:
            try:
                item = prepare(record, masks=False)
                want["odvg"]["images"] += 1
                want["odvg"]["boxes"] += sum(bool(odvg_phrase(n)) for n, _ in item.boxes)
            except _Skip:
                pass
        if not (coco or wds):
            continue
        try:
            item = prepare(record, masks=True)
        except _Skip:
            continue
        if coco:
            kept, _ = coco_kept(item)
            want["coco"]["images"] += 1
            want["coco"]["boxes"] += len(kept)
            names.update(category_name(item.boxes[i][0]) for i in kept)
        if wds:
            try:
                wds_key(record)
                with open(item.image, "rb") as handle:
                    head = handle.read(1 << 16)
            except (_Skip, OSError):
                continue
            if image_ext(head) is not None:
                want["wds"]["images"] += 1
                want["wds"]["boxes"] += len(item.boxes)
    want["coco"]["categories"] = len(names)
    return want


def _coco_problems(path: Path, want: Counter) -> list[str]:
    """How a COCO export's images, annotations and categories differ from what is expected."""
    got: Counter = Counter()
    try:
        with open(path, encoding="utf-8") as handle:
            for key, _, _ in _JsonScanner(handle).object_items():
                got[key] += 1
    except (OSError, ValueError) as err:
        return [f"coco {path}: cannot be read: {err}"]
    problems = []
    for section, expected in (("images", want["images"]), ("annotations", want["boxes"]),
                              ("categories", want["categories"])):  # fmt: skip
        if got[section] != expected:
            problems.append(f"coco {path}: {got[section]} {section}, the masked records give "
                            f"{expected}")  # fmt: skip
    return problems


def _odvg_problems(path: Path, want: Counter) -> list[str]:
    """How an ODVG export's lines and regions differ from what is expected, and bad spans."""
    images = regions = bad = 0
    first_bad = None
    try:
        for lineno, line in enumerate(iter_jsonl(path), start=1):
            images += 1
            grounding = line.get("grounding") or {}
            caption = grounding.get("caption") or ""
            for region in grounding.get("regions") or []:
                regions += 1
                phrase = str(region.get("phrase", ""))
                spans = region.get("tokens_positive") or []
                if not spans or any(caption[s:e].lower() != phrase.lower() for s, e in spans):
                    bad += 1
                    first_bad = first_bad or lineno
    except (OSError, ValueError, TypeError, AttributeError) as err:
        return [f"odvg {path}: cannot be read: {err}"]
    problems = []
    if images != want["images"]:
        problems.append(f"odvg {path}: {images} images, the masked records give {want['images']}")
    if regions != want["boxes"]:
        problems.append(f"odvg {path}: {regions} regions, the masked records give {want['boxes']}")
    if bad:
        problems.append(f"odvg {path}: {bad} regions whose tokens_positive do not span their "
                        f"phrase (first on line {first_bad})")  # fmt: skip
    return problems


def _wds_problems(outdir: Path, want: Counter) -> list[str]:
    """How shards' samples and boxes differ from what is expected; samples missing a member."""
    samples = boxes = incomplete = 0
    try:
        for shard in shard_files(outdir):
            members: dict[str, set[str]] = {}
            with tarfile.open(shard, "r|") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if members and key not in members:  # samples are contiguous
                        incomplete += _incomplete(members)
                        members.clear()
                    members.setdefault(key, set()).add(ext)
                    if ext == "json":
                        sample = json.load(tar.extractfile(member))
                        samples += 1
                        boxes += len(sample.get("entities") or [])
            incomplete += _incomplete(members)
    except (OSError, tarfile.TarError, ValueError) as err:
        return [f"webdataset {outdir}: cannot be read: {err}"]
    problems = []
    if samples != want["images"]:
        problems.append(f"webdataset {outdir}: {samples} samples, the masked records give "
                        f"{want['images']}")  # fmt: skip
    if boxes != want["boxes"]:
        problems.append(f"webdataset {outdir}: {boxes} boxes, the masked records give "
                        f"{want['boxes']}")  # fmt: skip
    if incomplete:
        problems.append(f"webdataset {outdir}: {incomplete} samples without both an image "
                        "and a json")  # fmt: skip
    return problems


def _incomplete(members: dict[str, set[str]]) -> int:
    """Samples among `members` ({key: extensions}) that lack the json or the image."""
    return sum(1 for exts in members.values() if "json" not in exts or len(exts) < 2)


def check_exports(
    masked: PathLike,
    coco: PathLike | None = None,
    odvg: PathLike | None = None,
    wds_dir: PathLike | None = None,
) -> list[str]:
    """Problems of exports against their masked JSONL (images, boxes recounted); [] if none."""
    problems = []
    paths = {"coco": coco, "odvg": odvg, "wds": wds_dir}
    for name, path in paths.items():
        if path is None:
            continue
        exists = Path(path).is_dir() if name == "wds" else Path(path).is_file()
        if not exists:
            problems.append(f"{name} export {path} does not exist")
            paths[name] = None
    if not any(paths.values()):
        return problems
    want = _expected(masked, bool(paths["coco"]), bool(paths["odvg"]), bool(paths["wds"]))
    if paths["coco"]:
        problems += _coco_problems(Path(paths["coco"]), want["coco"])
    if paths["odvg"]:
        problems += _odvg_problems(Path(paths["odvg"]), want["odvg"])
    if paths["wds"]:
        problems += _wds_problems(Path(paths["wds"]), want["wds"])
    return problems
