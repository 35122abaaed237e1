"""ODVG grounding export of the masked JSONL (`groundset.exports.common` for the skips).

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
"""

from __future__ import annotations

import re
from collections import Counter

from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.layout import ODVG
from groundset.core.records import provenance
from groundset.exports.common import (
    Item,
    PathLike,
    Skip,
    SkipLog,
    pixel_box,
    prepare,
    progress,
    skipped_path,
    stats_path,
)

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


def ground(item: Item, caption: str) -> tuple[str, list[dict], Counter]:
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


def export_odvg(
    input: PathLike, output: PathLike, skipped: PathLike | None = None,
    stats: PathLike | None = None,
) -> dict:  # fmt: skip
    """An ODVG grounding JSONL (one line per image) of a masked JSONL, the records it left out
    (`skipped`, default `<stem>_skipped.jsonl`: drop lines) and its stats envelope (`stats`,
    default `<stem>_stats.json`), which it returns."""
    counts: Counter = Counter()
    skipped = skipped or skipped_path(output)
    with atomic_write(skipped) as skip_file, atomic_write(output) as out:
        skips = SkipLog(skip_file, ODVG.name)
        for record in progress(iter_jsonl(input), "export odvg"):
            try:
                item = prepare(record, masks=False)
            except Skip as skip:
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
                **provenance(item.record),
            }
            out.write(dumps_record(line) + "\n")
    return skips.stats(
        stats or stats_path(output),
        counts["images"],
        **{k: counts[k] for k in ("images", "regions", "phrases_found", "phrases_appended")},
        images_without_boxes=counts["images_without_boxes"],
        texts_cleaned=counts["texts_cleaned"],
        skipped_file=str(skipped),
        regions_skipped={k: counts[k] for k in ("empty_phrase",) if counts[k]},
        output=str(output),
    )
