"""What every export shares: a record prepared for export (image, cleaned texts, boxes, size,
masks as COCO RLE), the skips with their reasons and side file, and the record loop (progress,
worker processes).

A record an export cannot take is never dropped silently: it is counted under its reason.
Reasons: `no_image` (the record names none), `bad_box` (not four finite numbers, or inverted or
empty once clipped to [0, 1]), `image_missing`, `image_unreadable` (its size or format cannot be
read), `mask_missing` (entities but no mask file or RLE, or the file is gone),
`mask_unreadable`, `masks_not_aligned` (masks or `mask_scores` not one per box, or sizes
disagreeing with `mask_shape` or each other) and `bad_name` (WebDataset: an id or source that
cannot name a sample). A record with no entities is exported as an image without boxes
(`images_without_boxes`). Image sizes come from the masks (`mask_shape`, the RLE size or the
.npy shape) when there are any, else the record's `width`/`height` (or data-juicer's
`image_width`/`image_height`), else the image file's header (never decoded).

Each export writes its stats envelope (`core.stats.envelope`; stage `coco`, `odvg`,
`webdataset` as in `core.layout`): records read in, exported out, `dropped` by the reasons
above, then its own counts; and a side file with one drop line (`core.stats.drop_line`) per
record it left out. By default both sit beside the output: `<stem>_stats.json`,
`<stem>_skipped.jsonl`.

Every export streams the input record by record (memory flat in the input size) and writes
atomically (`io.atomic_write`).

Speed: reading `.npy` masks and encoding them as RLE (COCO, WebDataset) costs more than
copying the image; `workers` > 1 spreads that over forked processes (input order kept, a few
small batches in flight). Masks stored as RLE (`mask.mask_format: rle`) are passed through.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from groundset.core.images import image_header_size
from groundset.core.io import dumps_record, iter_jsonl
from groundset.core.layout import beside
from groundset.core.records import RecordError, cleaned_texts, image_path, record_boxes
from groundset.core.stats import drop_line, envelope, write_stats
from groundset.stages.mask import encode_rle

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
_BATCH = 16  # records per task when exporting with several worker processes


class ExportError(RuntimeError):
    """A problem that stops an export (two records with one WebDataset key)."""


class Skip(Exception):
    """A record an export cannot take, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        """Remember the reason and detail (the record it is about is named by `about`)."""
        super().__init__(reason)
        self.reason, self.detail = reason, detail
        self.record: dict = {}

    def about(self, record: dict) -> Skip:
        """This skip, naming the record it is about (its drop line in the side file)."""
        self.record = record
        return self


class SkipLog:
    """The side file of the records an export left out, one drop line each
    (`groundset.core.stats.drop_line`), and their counts by reason."""

    def __init__(self, handle: IO[str] | None, stage: str) -> None:
        """Lines go to `handle` (None: counted only), with `drop_stage` `stage`."""
        self.handle, self.stage = handle, stage
        self.counts: Counter = Counter()

    def add(self, skip: Skip) -> None:
        """Count a skipped record and write its line."""
        self.counts[skip.reason] += 1
        if self.handle is not None:
            line = drop_line(skip.record, self.stage, skip.reason, skip.detail)
            self.handle.write(dumps_record(line) + "\n")

    def stats(self, path: PathLike, records_out: int, **extras) -> dict:
        """The export's stats envelope (records read = exported + skipped), written to `path`."""
        dropped = dict(self.counts)
        stats = envelope(self.stage, records_out + sum(dropped.values()), records_out, dropped,
                         **extras)  # fmt: skip
        write_stats(path, stats)
        log.info("%s export: %s", self.stage, stats)
        return stats


def skipped_path(output: PathLike, folder: bool = False) -> Path:
    """The default side file of an export's skipped records: `<output stem>_skipped.jsonl`."""
    return beside(output, "_skipped.jsonl", folder)


def stats_path(output: PathLike, folder: bool = False) -> Path:
    """The default stats file of an export: `<output stem>_stats.json`."""
    return beside(output, "_stats.json", folder)


@dataclass
class Item:
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


def _pair(width: Any, height: Any) -> tuple[int, int] | None:
    """(width, height) when both are positive ints (one-item lists too), else None."""
    width, height = _positive_int(width), _positive_int(height)
    return (width, height) if width and height else None


def _npy_size(record: dict) -> tuple[int, int] | None:
    """(width, height) from the header of the record's .npy masks (None if none or broken)."""
    mask_file = record.get("mask_file")
    if not (mask_file and os.path.isfile(mask_file)):
        return None
    try:
        shape = np.load(mask_file, mmap_mode="r").shape  # the header only
    except Exception:  # noqa: BLE001 (numpy raises many types for broken files)
        return None  # the size comes from elsewhere; an export that needs the masks says so
    return (int(shape[2]), int(shape[1])) if len(shape) == 3 and shape[1] and shape[2] else None


def _record_size(record: dict) -> tuple[int, int] | None:
    """(width, height) the record states: its own, else data-juicer's."""
    stats = record.get("__dj__stats__") or {}
    dj = (
        _pair(stats.get("image_width"), stats.get("image_height"))
        if isinstance(stats, dict)
        else None
    )
    return _pair(record.get("width"), record.get("height")) or dj


def _header_size(image: str) -> tuple[int, int]:
    """(width, height) from the image file's header (Skip if missing or unreadable)."""
    if not os.path.isfile(image):
        raise Skip("image_missing")
    size = image_header_size(image)  # the header only, also of an image PIL calls a bomb
    if size is None:
        raise Skip("image_unreadable")
    return size


def image_size(record: dict, image: str) -> tuple[int, int]:
    """(width, height): masks' size, else the record's, else the image header (Skip if none)."""
    return _stated_size(record) or _npy_size(record) or _record_size(record) or _header_size(image)


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
        raise Skip("mask_unreadable")
    height, width = _positive_int(size[0]), _positive_int(size[1])
    counts = rle.get("counts")
    if not height or not width:
        raise Skip("mask_unreadable")
    if isinstance(counts, list):  # uncompressed RLE: run lengths
        try:
            counts = mask_utils.frPyObjects({"size": [height, width], "counts": counts},
                                            height, width)["counts"]  # fmt: skip
        except Exception:  # noqa: BLE001
            raise Skip("mask_unreadable") from None
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if not isinstance(counts, str):
        raise Skip("mask_unreadable")
    return {"size": [height, width], "counts": counts}


def _stored_rles(stored: list, count: int) -> list[dict]:
    """A record's stored RLE, compressed, one per box and all of one size (else Skip)."""
    if len(stored) != count:
        raise Skip("masks_not_aligned", f"{len(stored)} masks for {count} boxes")
    rles = [_compressed(rle) for rle in stored]
    if any(rle["size"] != rles[0]["size"] for rle in rles):
        raise Skip("masks_not_aligned", "masks of different sizes")
    return rles


def _npy_rles(path: str | None, count: int) -> list[dict]:
    """The masks of a record's .npy file as COCO RLE, one per box (else Skip)."""
    if not path:
        raise Skip("mask_missing")
    try:
        masks = np.load(path)
    except FileNotFoundError:
        raise Skip("mask_missing") from None
    except Exception as err:  # noqa: BLE001 (numpy raises many types for broken files)
        raise Skip("mask_unreadable", f"{type(err).__name__}: {err}") from None
    if masks.ndim != 3 or not masks.shape[1] or not masks.shape[2]:
        raise Skip("mask_unreadable", f"shape {list(masks.shape)}")
    if masks.shape[0] != count:
        raise Skip("masks_not_aligned", f"{masks.shape[0]} masks for {count} boxes")
    return encode_rle(masks.astype(bool, copy=False))


def _areas(rles: list[dict]) -> list[int]:
    """Pixels per mask, from the RLE runs (cheaper than summing the masks); Skip if damaged."""
    from pycocotools import mask as mask_utils

    try:
        coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
        return [int(a) for a in mask_utils.area(coded)]
    except Exception:  # noqa: BLE001 (a damaged counts string)
        raise Skip("mask_unreadable", "damaged RLE counts") from None


def record_masks(record: dict, count: int) -> tuple[list[dict], list[int], int, int]:
    """(COCO RLE per box, pixels per mask, width, height) of a record's masks; Skip if unusable."""
    stored = record.get("mask_rle")
    if isinstance(stored, list) and stored:
        rles = _stored_rles(stored, count)
    else:
        rles = _npy_rles(record.get("mask_file"), count)
    height, width = rles[0]["size"]
    areas = _areas(rles)
    stated = record.get("mask_shape")
    if stated is not None and (
        not isinstance(stated, list | tuple) or list(stated) != [count, height, width]
    ):
        raise Skip("masks_not_aligned", f"mask_shape {stated}, masks {[count, height, width]}")
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


def prepare(record: dict, masks: bool) -> Item:
    """A record's image, boxes, scores, size (masks too when `masks`); Skip if not exportable."""
    try:
        image = image_path(record)
    except RecordError:
        raise Skip("no_image") from None
    try:
        boxes = record_boxes(record)
    except (AttributeError, TypeError, KeyError):
        raise Skip("bad_box") from None
    if not all(_valid_box(box) for _, box in boxes):
        raise Skip("bad_box")
    if not os.path.isfile(image):
        raise Skip("image_missing")
    scores = record.get("mask_scores")
    if scores is not None and (not isinstance(scores, list) or len(scores) != len(boxes)):
        raise Skip("masks_not_aligned")
    caption, names, cleaned = cleaned_texts(record)
    boxes = [(name, box) for name, (_, box) in zip(names, boxes, strict=True)]
    texts = {"caption": caption, "cleaned": cleaned}
    if masks and boxes:
        rles, areas, width, height = record_masks(record, len(boxes))
        return Item(record, image, boxes, scores, width, height, rles, areas, **texts)
    width, height = image_size(record, image)
    return Item(record, image, boxes, scores, width, height, **texts)


def progress(records: Iterator[dict], desc: str) -> Iterator[dict]:
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
        for record in progress(iter_jsonl(input), desc):
            yield func(record)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pool.submit(int).result()  # fork the workers before the progress bar starts a thread
        pending: deque[Future] = deque()
        batch: list[dict] = []
        for record in progress(iter_jsonl(input), desc):
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
