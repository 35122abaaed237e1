"""Parse Qwen-VL grounded-caption answers into a caption and entities with normalized boxes.

Pure functions, no I/O. Accepted answers: JSON (optionally in a code fence, with prose around
it) shaped `{"caption": ..., "entities": [{"entity": ..., "bboxes": box or [box, ...]}]}`,
Qwen2.5-VL's `[{"bbox_2d": [...], "label": ...}]` lists, and Qwen-VL box tokens
(`<|object_ref_start|>name<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` and
`<ref>name</ref><box>(x1,y1),(x2,y2)</box>`). Coordinates follow a convention: `grid1000`
(Qwen2-VL, Qwen3-VL), `pixels` (Qwen2.5-VL: pixels of the model's resized input) or
`normalized` (already 0-1). Output boxes are [x1, y1, x2, y2] in [0, 1] with x1 < x2, y1 < y2.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

# The record helpers live in groundset.core.records; re-exported for older imports.

CONVENTIONS = ("grid1000", "pixels", "normalized")
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_NUMBER = r"-?\d+(?:\.\d+)?"
_PAIR = re.compile(
    rf"\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)\s*,?\s*\(\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\)"
)
_QWEN2_REF = re.compile(
    r"<\|object_ref_start\|>(?P<name>.*?)<\|object_ref_end\|>(?P<boxes>(?:\s*<\|box_start\|>.*?<\|box_end\|>)+)",
    re.S,
)
_QWEN2_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_QWEN1_REF = re.compile(r"<ref>(?P<name>.*?)</ref>(?P<boxes>(?:\s*<box>.*?</box>)+)", re.S)
_QWEN1_BOX = re.compile(r"<box>(.*?)</box>", re.S)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>|</?ref>|</?box>")
# The openings of a declined request ("I'm sorry, but I can't help with that.").
_REFUSAL = re.compile(
    r"(i['\u2019]?m sorry|i am sorry|sorry,|i apologi[sz]e|apologies,|unfortunately,? i |"
    r"i['\u2019]?m (?:not able|unable)\b|"
    r"i (?:can(?:not|['\u2019]?t)|am (?:not able|unable)|['\u2019]?m (?:not able|unable)|"
    r"won['\u2019]?t|will not|do not feel comfortable)\b|as an ai\b)",
    re.I,
)
# Why an answer yields no caption (error reasons in the caption stage's error file).
EMPTY = "empty_answer"
UNPARSEABLE = "unparseable_answer"
NO_CAPTION = "no_caption"
REFUSAL = "refusal"
ERROR_DETAILS = {  # what each reason means, in the error file's `detail`
    EMPTY: "the answer is empty",
    UNPARSEABLE: "the answer is neither the JSON asked for nor grounding tokens",
    NO_CAPTION: "the answer has no caption",
    REFUSAL: "the model declined to describe the image",
}


@dataclass
class Parsed:
    """What an answer yields: caption, entities (DESIGN.md shape), counts of what was dropped."""

    caption: str | None
    entities: list[dict] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    error: str | None = None
    repaired: Counter = field(default_factory=Counter)  # boxes kept after a fix, by kind


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL/2.5-VL's processor resizes an image to (multiples of `factor`)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize_box(
    box, convention: str, frame: tuple[int, int] | None = None, repaired: Counter | None = None
) -> list[float] | None:
    """A box as [x1, y1, x2, y2] in [0, 1] (ordered, clipped, rounded), or None if degenerate/invalid.

    `frame` is the (width, height) that `pixels` coordinates refer to. A box kept after a fix is
    counted in `repaired`: `inverted` (corners swapped into order), `clipped` (beyond the image).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown box convention {convention!r} (one of {CONVENTIONS})")
    corners = _corners(box)
    if corners is None:
        return None
    x1, y1, x2, y2 = corners
    sx, sy = _scale(convention, frame)
    fixes = []
    if x1 > x2 or y1 > y2:
        fixes.append("inverted")
    x1, x2 = sorted((x1 / sx, x2 / sx))
    y1, y2 = sorted((y1 / sy, y2 / sy))
    if min(x1, y1) < 0.0 or max(x2, y2) > 1.0:
        fixes.append("clipped")
    x1, y1, x2, y2 = (min(1.0, max(0.0, v)) for v in (x1, y1, x2, y2))
    x1, y1, x2, y2 = (round(v, 4) for v in (x1, y1, x2, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    if repaired is not None:
        repaired.update(fixes)
    return [x1, y1, x2, y2]


def _corners(box) -> tuple[float, float, float, float] | None:
    """A box's four coordinates as finite numbers, or None."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return x1, y1, x2, y2


def _scale(convention: str, frame: tuple[int, int] | None) -> tuple[float, float]:
    """What a convention's x and y coordinates are divided by to land in [0, 1]."""
    if convention == "grid1000":
        return 1000.0, 1000.0
    if convention == "pixels":
        if not frame:
            raise ValueError("pixel boxes need the frame (width, height) they refer to")
        return float(frame[0]), float(frame[1])
    return 1.0, 1.0


def extract_json(text: str):
    """The first JSON object or array in `text` (inside a code fence if there is one), or None."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        for match in re.finditer(r"[\[{]", candidate):
            try:
                value, _ = decoder.raw_decode(candidate, match.start())
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict | list):
                return value
    return None


def _boxes_of(value) -> list:
    """The boxes in a JSON entity's box field: one box, a list of boxes, or deeper nesting."""
    if isinstance(value, dict):
        value = [value.get(k) for k in ("x1", "y1", "x2", "y2")]
    if (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float | str) and not isinstance(v, bool) for v in value)
    ):
        return [value]
    if isinstance(value, list | tuple):
        return [box for item in value for box in _boxes_of(item)]
    return [value]  # unparsable: counted as a dropped box


def _entities_from_json(value) -> tuple[str | None, list[tuple[str, list]]]:
    """(caption, [(name, raw boxes)]) from a parsed JSON answer."""
    caption = None
    items = value
    if isinstance(value, dict):
        caption = value.get("caption") or value.get("description")
        items = value.get("entities") or value.get("objects") or []
    pairs = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            pairs.append(("", [None]))
            continue
        name = item.get("entity") or item.get("label") or item.get("name") or ""
        raw = next(
            (item[k] for k in ("bboxes", "bbox", "bbox_2d", "box", "boxes") if k in item), None
        )
        pairs.append((str(name).strip(), _boxes_of(raw) if raw is not None else [None]))
    return (str(caption).strip() if caption else None), pairs


def _entities_from_tokens(text: str) -> tuple[str | None, list[tuple[str, list]]]:
    """(caption, [(name, raw boxes)]) from Qwen-VL box tokens; the caption keeps the names as words."""
    pairs = []
    for ref, box in ((_QWEN2_REF, _QWEN2_BOX), (_QWEN1_REF, _QWEN1_BOX)):
        for match in ref.finditer(text):
            boxes = []
            for inner in box.findall(match["boxes"]):
                pair = _PAIR.search(inner)
                boxes.append([float(v) for v in pair.groups()] if pair else None)
            pairs.append((match["name"].strip(), boxes))
    if not pairs:
        return None, []
    caption = _QWEN2_REF.sub(lambda m: m["name"], text)
    caption = _QWEN1_REF.sub(lambda m: m["name"], caption)
    caption = re.sub(r"\s+", " ", _SPECIAL.sub("", caption)).strip()
    return caption or None, pairs


def is_refusal(text: str) -> bool:
    """Whether a caption or answer is the model declining ("I'm sorry, but I can't ...")."""
    return bool(_REFUSAL.match(text.strip().strip("\"'")))


def _read_answer(text: str, expect_json: bool) -> tuple[str | None, list, str | None]:
    """(caption, [(name, raw boxes)], error) of an answer: JSON, box tokens, or plain prose (a
    caption without entities, unless JSON was asked for or the prose is a refusal)."""
    value = extract_json(text)
    if value is not None:
        return (*_entities_from_json(value), None)
    caption, pairs = _entities_from_tokens(text)
    if pairs:
        return caption, pairs, None
    body = text.strip()
    if is_refusal(body):
        return None, [], REFUSAL
    if expect_json or body.startswith(("{", "[", "```")) or '"caption"' in body:
        return None, [], UNPARSEABLE
    return re.sub(r"\s+", " ", body) or None, [], None


def _grounded(
    pairs: list[tuple[str, list]], convention: str, frame: tuple[int, int] | None, parsed: Parsed
) -> list[dict]:
    """The entities (DESIGN.md shape) of (name, raw boxes) pairs: boxes normalized, duplicates
    merged, what is dropped and repaired counted in `parsed`."""
    merged: dict[str, list] = {}
    for name, boxes in pairs:
        if not name:
            parsed.dropped["entity_without_name"] += 1
            continue
        kept = []
        for raw in boxes:
            box = (
                normalize_box(raw, convention, frame, parsed.repaired) if raw is not None else None
            )
            if box is None:
                parsed.dropped["box_invalid_or_degenerate"] += 1
            elif box not in kept and box not in merged.get(name, []):
                kept.append(box)
        if kept:
            merged.setdefault(name, []).extend(kept)
        else:
            parsed.dropped["entity_without_box"] += 1
    return [{"entity": name, "bboxes": boxes} for name, boxes in merged.items()]


def parse_answer(
    text: str,
    convention: str = "grid1000",
    image_size: tuple[int, int] | None = None,
    frame: tuple[int, int] | None = None,
    expect_json: bool = False,
) -> Parsed:
    """Parse one model answer. `image_size` (width, height) gives the frame of `pixels` boxes via
    Qwen's smart_resize unless `frame` is given; with `expect_json` (the prompt asked for JSON),
    an answer with neither the JSON object nor grounding tokens is an error, not a caption."""
    if not isinstance(text, str) or not text.strip():
        return Parsed(None, error=EMPTY)
    if convention == "pixels" and frame is None and image_size:
        h, w = smart_resize(image_size[1], image_size[0])
        frame = (w, h)
    caption, pairs, error = _read_answer(text, expect_json)
    if error:
        return Parsed(None, error=error)
    parsed = Parsed(caption)
    parsed.entities = _grounded(pairs, convention, frame, parsed)
    if not parsed.caption:
        parsed.error = NO_CAPTION
    elif is_refusal(parsed.caption):
        parsed.caption, parsed.entities, parsed.error = None, [], REFUSAL
    return parsed
