"""What every stage asks of a record: its key, its image, its boxes, its masked layout, its files.

One rule each, shared by caption, mask, Emu3 export, statistics and drawings (a second copy is a
bug waiting to disagree). Pure functions over the DESIGN.md record shapes, no I/O.

Key: `source/image_id` (image ids repeat across sources); `image_id` for a record without a
source (the seed's own files); the image path for a record without an image id. Per-record
files: `<source>/<image_id><suffix>`, or `<image_id><suffix>` without a source (the seed's
`masks/<image_id>.npy`, `feature/<image_id>.pth`).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

# What a model says reaches every export through clean_name / clean_caption (one rule for all):
# one line each, and none of the characters that delimit Emu3's location-control lines
# (`Entity: [name]; box: [x1, y1, x2, y2].`) inside a name or a caption.
_SPACES = re.compile(r"\s+")
_NAME_DELIMITERS = str.maketrans({"[": "(", "]": ")", ";": ","})
_CAPTION_BRACKETS = str.maketrans({"[": "(", "]": ")"})
# the seed's location-control header inside a caption (the model echoing its training format)
_HEADER_TEXT = re.compile(r"(precise\s+location\s+control)\s*:", re.IGNORECASE)


class RecordError(ValueError):
    """A record that lacks what a stage needs (no image, no name for its files)."""


# Provenance the prefilter adds to every URL-list row it passes on and every record after
# carries, the exports too: the URL-list parquet file (relative to the source's url_list) and
# the row in it.
PROVENANCE = ("url_list_file", "url_list_row")


def provenance(record: dict) -> dict:
    """The record's provenance fields (those it has)."""
    return {name: record[name] for name in PROVENANCE if record.get(name) is not None}


def _describe(record: dict) -> str:
    """A short excerpt of a record for error messages."""
    return str(record)[:200]


def image_path(record: dict) -> str:
    """The record's image file (`image` is a list of one before masking, a string after)."""
    image = record.get("image")
    if isinstance(image, (list, tuple)):
        image = image[0] if image else None
    if not image:
        raise RecordError(f"record names no image: {_describe(record)}")
    return str(image)


def same_image(entry: dict, record: dict) -> bool:
    """Whether a journal entry was made for this record's image. A re-download can give an id
    to another image (img2dataset numbers what it fetched), a URL stays; entries without a URL
    (older journals, records without one) are taken as they are."""
    journaled, current = entry.get("url"), record.get("url")
    return journaled is None or current is None or journaled == current


def record_key(record: dict) -> str:
    """`source/image_id`; `image_id` without a source; the image path without an image id."""
    image_id = record.get("image_id")
    if image_id in (None, ""):
        try:
            return image_path(record)
        except RecordError:
            raise RecordError(
                f"record has neither image_id nor image: {_describe(record)}"
            ) from None
    source = record.get("source")
    return f"{source}/{image_id}" if source else str(image_id)


def _part(value: str, what: str, record: dict) -> str:
    """`value` as one path component (no separators, not `.`/`..`), or RecordError."""
    if value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise RecordError(f"{what} {value!r} cannot name a file: {_describe(record)}")
    return value


def record_relpath(record: dict, suffix: str) -> str:
    """`<source>/<image_id><suffix>`, or `<image_id><suffix>` without a source (posix, relative)."""
    image_id = record.get("image_id")
    if image_id in (None, ""):  # the manifest's rule: the image file's stem is its id
        image_id = PurePosixPath(image_path(record)).stem
    name = _part(str(image_id), "image_id", record) + suffix
    source = record.get("source")
    return f"{_part(str(source), 'source', record)}/{name}" if source else name


def mask_relpath(record: dict) -> str:
    """The record's mask file under the mask folder: `<source>/<image_id>.npy` or `<image_id>.npy`."""
    return record_relpath(record, ".npy")


def feature_relpath(record: dict) -> str:
    """The record's Emu3 feature under `feature/`: `<source>/<image_id>.pth` or `<image_id>.pth`."""
    return record_relpath(record, ".pth")


def entity_boxes(entity: dict) -> list[list[float]]:
    """The boxes of one entity, captioned (`bboxes`, a list) or masked (`bbox`, one box)."""
    return entity.get("bboxes") or ([entity["bbox"]] if entity.get("bbox") is not None else [])


def record_boxes(record: dict) -> list[tuple[str, list[float]]]:
    """(entity name, normalized box) pairs of a captioned or masked record, in order."""
    return [
        (str(entity.get("entity", "")), box)
        for entity in record.get("entities") or []
        for box in entity_boxes(entity)
    ]


def flatten_record(record: dict) -> dict:
    """The seed's masked layout: `image` a string (None if absent), one `{entity, bbox}` per box."""
    try:
        image: str | None = image_path(record)
    except RecordError:
        image = None  # the stage drops it with its own reason (image_missing)
    entities = [
        {"entity": name, "bbox": [float(v) for v in box]} for name, box in record_boxes(record)
    ]
    return {**record, "image": image, "entities": entities}


def clean_name(name: object) -> str:
    """An entity name as every export writes it: whitespace runs (newlines too) as one space,
    stripped, and the location syntax's delimiters `[`, `]`, `;` as `(`, `)`, `,`."""
    return _SPACES.sub(" ", str(name).translate(_NAME_DELIMITERS)).strip()


def cleaned_texts(record: dict, header: str | None = None) -> tuple[str, list[str], int]:
    """A record's cleaned caption, cleaned entity name per box, and how many of those texts the
    cleaning changed (what every export counts as `texts_cleaned`)."""
    raw_caption = str(record.get("caption") or "")
    raw_names = [str(name) for name, _ in record_boxes(record)]
    caption, names = clean_caption(raw_caption, header), [clean_name(n) for n in raw_names]
    changed = sum(a != b for a, b in zip(raw_names, names, strict=True))
    return caption, names, changed + (caption != raw_caption)


def clean_caption(caption: object, header: str | None = None) -> str:
    """A caption as every export writes it: one line (whitespace runs as one space), brackets as
    parentheses (no `Entity: [..]; box: [..]` text inside), the seed's location-control header
    in it without its colon, and a one-line `header` of the user's removed from it."""
    text = _SPACES.sub(" ", str(caption or "").translate(_CAPTION_BRACKETS)).strip()
    text = _HEADER_TEXT.sub(r"\1", text)
    words = header.strip() if header and "\n" not in header else ""
    if words and words in text:  # a header a caption can hold (one line): never inside one
        text = _SPACES.sub(" ", text.replace(words, " ")).strip()
    return text
