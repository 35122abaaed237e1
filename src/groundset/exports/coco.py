"""COCO instances export of the masked JSONL (`groundset.exports.common` for the skips).

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
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from groundset.core.io import atomic_write, dumps_record, write_json
from groundset.core.records import record_key
from groundset.exports.common import (
    Item,
    PathLike,
    Skip,
    SkipLog,
    category_name,
    pixel_box,
    prepare,
    run_records,
    skipped_path,
)

log = logging.getLogger(__name__)

# --- COCO -----------------------------------------------------------------------------------


def categories_path(output: PathLike) -> Path:
    """Where the category mapping goes by default: `coco.json` -> `coco_categories.json`."""
    output = Path(output)
    return output.with_name(output.stem + "_categories.json")


def coco_kept(item: Item) -> tuple[list[int], Counter]:
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


def _coco_image(item: Item, image_id: int) -> dict:
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


def _coco_work(record: dict) -> Item | Skip:
    """A record prepared for COCO (masks as RLE), or why it is skipped (runs in a worker)."""
    try:
        return prepare(record, masks=True)
    except Skip as skip:
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
        skips = SkipLog(skip_file, "export_coco")
        for item in run_records(_coco_work, input, workers, "export coco"):
            if isinstance(item, Skip):
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
