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

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import IO

from groundset.core.io import atomic_write, dumps_record, write_json
from groundset.core.layout import COCO
from groundset.core.records import provenance, record_key
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
    stats_path,
)

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
        **provenance(record),
    }


def _coco_work(record: dict) -> Item | Skip:
    """A record prepared for COCO (masks as RLE), or why it is skipped (runs in a worker)."""
    try:
        return prepare(record, masks=True)
    except Skip as skip:
        return skip.about(record)


class _Categories:
    """The category table: name -> {id, raw_names, annotations}, ids in order of first use."""

    def __init__(self) -> None:
        """An empty table."""
        self.table: dict[str, dict] = {}

    def add(self, name: str, raw: str) -> int:
        """The id of category `name` (added if new), counting one annotation of raw name `raw`."""
        category = self.table.get(name)
        if category is None:
            category = {"id": len(self.table) + 1, "raw_names": set(), "annotations": 0}
            self.table[name] = category
        category["raw_names"].add(raw)
        category["annotations"] += 1
        return category["id"]

    def entries(self) -> list[dict]:
        """The COCO `categories` entries."""
        return [{"id": c["id"], "name": name} for name, c in self.table.items()]

    def mapping(self) -> dict:
        """The category mapping file's content: each category and the raw names it gathers."""
        return {"categories": [
            {"id": c["id"], "name": name, "raw_names": sorted(c["raw_names"]),
             "annotations": c["annotations"]}
            for name, c in self.table.items()
        ]}  # fmt: skip


def _annotation(item: Item, i: int, ids: tuple[int, int, int]) -> dict:
    """The COCO annotation of box `i` of an item (`ids`: annotation, image, category)."""
    x1, y1, x2, y2 = pixel_box(item.boxes[i][1], item.width, item.height)
    annotation = {
        "id": ids[0],
        "image_id": ids[1],
        "category_id": ids[2],
        "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)],
        "area": item.areas[i],
        "iscrowd": 0,
        "segmentation": item.rles[i],
    }
    if item.scores is not None:
        annotation["score"] = item.scores[i]
    return annotation


class _CocoWriter:
    """Images straight into the output, annotations spooled beside it, and their counts."""

    def __init__(self, out: IO[str], spool: IO[str]) -> None:
        """A writer into the open output and spool files (the output's head is written)."""
        self.out, self.spool = out, spool
        self.categories = _Categories()
        self.counts: Counter = Counter()
        self.dropped: Counter = Counter()  # annotations left out, by reason
        info = {"description": "groundset COCO instances export", "version": "1.0"}
        out.write('{"info": ' + dumps_record(info) + ', "licenses": [], "images": [\n')

    def add(self, item: Item) -> None:
        """One image and its annotations."""
        self.counts["images"] += 1
        image_id = self.counts["images"]
        self.out.write(("" if image_id == 1 else ",\n") + dumps_record(_coco_image(item, image_id)))
        self.counts["images_without_boxes"] += not item.boxes
        self.counts["texts_cleaned"] += item.cleaned
        kept, reasons = coco_kept(item)
        self.dropped.update(reasons)
        raw_names = item.raw_names
        for i in kept:
            category_id = self.categories.add(category_name(item.boxes[i][0]), raw_names[i])
            self.counts["annotations"] += 1
            number = self.counts["annotations"]
            annotation = _annotation(item, i, (number, image_id, category_id))
            self.spool.write(("" if number == 1 else ",\n") + dumps_record(annotation))

    def finish(self, mapping_path: PathLike) -> None:
        """The annotations and categories after the images, and the category mapping file."""
        self.out.write('\n], "annotations": [\n')
        self.spool.seek(0)
        shutil.copyfileobj(self.spool, self.out, 1 << 20)
        entries = ",\n".join(map(dumps_record, self.categories.entries()))
        self.out.write('\n], "categories": [\n' + entries + "\n]}\n")
        write_json(mapping_path, self.categories.mapping())


def export_coco(
    input: PathLike, output: PathLike, categories: PathLike | None = None, workers: int = 1,
    skipped: PathLike | None = None, stats: PathLike | None = None,
) -> dict:  # fmt: skip
    """A COCO instances JSON of a masked JSONL, its category mapping, the records it left out
    (`skipped`, default `<stem>_skipped.jsonl`: drop lines) and its stats envelope (`stats`,
    default `<stem>_stats.json`), which it returns."""
    output = Path(output)
    mapping_path = Path(categories) if categories is not None else categories_path(output)
    skipped = skipped or skipped_path(output)
    with (
        atomic_write(skipped) as skip_file,
        atomic_write(output) as out,
        tempfile.TemporaryFile(
            "w+", encoding="utf-8", dir=output.parent, prefix=f".{output.name}.", suffix=".spool"
        ) as spool,
    ):
        skips = SkipLog(skip_file, COCO.name)
        writer = _CocoWriter(out, spool)
        for item in run_records(_coco_work, input, workers, "export coco"):
            if isinstance(item, Skip):
                skips.add(item)
            else:
                writer.add(item)
        writer.finish(mapping_path)
    counts = writer.counts
    return skips.stats(
        stats or stats_path(output),
        counts["images"],
        images=counts["images"],
        annotations=counts["annotations"],
        categories=len(writer.categories.table),
        images_without_boxes=counts["images_without_boxes"],
        texts_cleaned=counts["texts_cleaned"],
        annotations_skipped=dict(writer.dropped),
        skipped_file=str(skipped),
        output=str(output),
        categories_file=str(mapping_path),
    )
