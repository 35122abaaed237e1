"""Emu3 location-control prompts: caption + header + one entity line per box, and back.

Pure functions, no I/O and no config: the template (`export.emu3.prompt`: header, entity) is
the caller's. Names and captions are cleaned first (`records.clean_name`, `clean_caption`, the
rule every export follows), so a prompt always parses back to exactly its record's entities and
boxes, whatever the model said; `template_problem` refuses a template that cannot.
"""

from __future__ import annotations

import re
import string

from groundset.core.records import clean_caption, clean_name, cleaned_texts, record_boxes

COORDINATES = ("x1", "y1", "x2", "y2")


def grid(value: float) -> int:
    """A normalized coordinate on the 0-1000 integer grid."""
    return min(1000, max(0, round(float(value) * 1000)))


def prompt_parts(record: dict, header: str) -> tuple[str, list[tuple]]:
    """What a record's prompt says: its cleaned caption, and (cleaned name, x1, y1, x2, y2 on
    the 0-1000 grid) per box, in order."""
    boxes = [(clean_name(name), *(grid(v) for v in box)) for name, box in record_boxes(record)]
    return clean_caption(record.get("caption"), header), boxes


def texts_cleaned(record: dict, header: str) -> int:
    """How many of a record's texts (caption, entity names per box) the cleaning changes."""
    return cleaned_texts(record, header)[2]


def format_prompt(record: dict, header: str, entity: str) -> str:
    """The cleaned caption, the header, then one entity line per box."""
    caption, boxes = prompt_parts(record, header)
    fields = ("name", *COORDINATES)
    return (
        caption
        + header
        + "".join(entity.format(**dict(zip(fields, b, strict=True))) for b in boxes)
    )


def _line_pattern(entity: str) -> re.Pattern:
    """A regex of one entity line of the template (a name lazily up to the next literal)."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(entity):
        parts.append(re.escape(literal))
        if name == "name":
            parts.append(r"(?P<name>[^\n]*?)")
        elif name:
            parts.append(rf"(?P<{name}>\d+)")
    return re.compile("".join(parts))


def _lines(text: str, pos: int, line: re.Pattern) -> list[tuple] | None:
    """The entity lines of `text` from `pos` to its end, or None if anything else is there."""
    boxes = []
    while pos < len(text):
        match = line.match(text, pos)
        if match is None or match.end() == pos:
            return None
        boxes.append((match["name"], *(int(match[k]) for k in COORDINATES)))
        pos = match.end()
    return boxes


def parse_prompt(text: str, header: str, entity: str) -> tuple[str, list[tuple]] | None:
    """(caption, [(name, x1, y1, x2, y2)]) of a prompt `format_prompt` wrote, or None if the
    text is not one-line caption + header + entity lines (the location syntax is broken)."""
    line = _line_pattern(entity)
    start = text.find(header)
    while start >= 0 and "\n" not in text[:start]:  # the first header after the caption
        boxes = _lines(text, start + len(header), line)
        if boxes is not None:
            return text[:start], boxes
        start = text.find(header, start + 1) if header else -1
    return None


# Names and captions a template must carry through (the adversarial ones of the tests too).
_PROBE = {
    "caption": "Two dogs; one [left] says: box.",
    "entities": [{"entity": "dog", "bboxes": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 1.0]]},
                 {"entity": "red ball", "bbox": [0.0, 0.0, 1.0, 1.0]}],
}  # fmt: skip


def template_problem(header: str, entity: str) -> str | None:
    """Why a prompt template cannot be written and read back (None if it can)."""
    try:
        text = format_prompt(_PROBE, header, entity)
    except (KeyError, IndexError, ValueError) as err:
        return f"use only {{name}}, {{x1}}, {{y1}}, {{x2}}, {{y2}} ({err})"
    missing = [f"{{{k}}}" for k in ("name", *COORDINATES) if f"{{{k}}}" not in entity]
    if missing:
        return f"the entity line lacks {', '.join(missing)}"
    if parse_prompt(text, header, entity) != prompt_parts(_PROBE, header):
        return "its prompts cannot be read back (make the header and the entity line start with text a caption cannot hold, e.g. a newline)"
    return None
