"""What a run guarantees across thread counts, batch compositions and machines (README:
Reproducibility), and the comparison of two runs' outputs by that guarantee.

The same config on the same machine and thread count gives byte-identical outputs. Across
thread counts, batches and CPUs, model scores may differ in their last digits (bf16/fp32 GEMMs
reduce in another order): data-juicer's model scores agree within SCORE_RTOL (relative), the
SAM2 figures groundset stores rounded to 4 decimals within one unit of the last place
(ROUNDED_ATOL). Everything else (records, their order, captions, boxes, counts) is identical.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

SCORE_RTOL = 1e-4
ROUNDED_ATOL = 1e-4
# data-juicer's model scores (`__dj__stats__`), full float precision
MODEL_SCORES = frozenset({"image_aesthetics_scores", "image_nsfw_score", "image_watermark_prob"})
# SAM2's outputs per box, stored rounded to 4 decimals
ROUNDED_SCORES = frozenset(
    {"mask_scores", "mask_inside_fraction", "mask_area_ratio", "mask_box_iou"}
)


def scores_agree(key: str, a: float, b: float) -> bool:
    """Whether two values of a model score named `key` agree within the stated bound."""
    if key in MODEL_SCORES:
        return math.isclose(a, b, rel_tol=SCORE_RTOL, abs_tol=1e-12)
    return abs(a - b) <= ROUNDED_ATOL + 1e-12


def _number(value: Any) -> bool:
    """Whether a JSON value is a number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dict_differences(a: dict, b: dict, where: str, score: str | None) -> list[str]:
    """`differences` of two objects: their keys, then each value (under its score key, if one)."""
    if a.keys() != b.keys():
        return [f"{where or '.'}: keys {sorted(a.keys() ^ b.keys())} in one only"]
    return [
        line
        for key in a
        for line in differences(
            a[key],
            b[key],
            f"{where}.{key}",
            key if key in MODEL_SCORES | ROUNDED_SCORES else score,
        )
    ]


def _list_differences(a: list, b: list, where: str, score: str | None) -> list[str]:
    """`differences` of two arrays: their lengths, then item by item."""
    if len(a) != len(b):
        return [f"{where}: {len(a)} items vs {len(b)}"]
    return [line for i, (x, y) in enumerate(zip(a, b, strict=True))
            for line in differences(x, y, f"{where}[{i}]", score)]  # fmt: skip


def differences(a: Any, b: Any, where: str = "", score: str | None = None) -> list[str]:
    """Where two JSON values differ beyond the guarantee: numbers under a model-score key
    within its bound, everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return _dict_differences(a, b, where, score)
    if isinstance(a, list) and isinstance(b, list):
        return _list_differences(a, b, where, score)
    if score is not None and _number(a) and _number(b):
        return [] if scores_agree(score, a, b) else [f"{where}: {a!r} vs {b!r} (beyond the bound)"]
    return [] if a == b and type(a) is type(b) else [f"{where}: {a!r} vs {b!r}"]


def load_output(path: str | os.PathLike) -> list:
    """A JSON file as a list of one value, a JSONL file as its list of records."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        return [json.loads(text)]
    return [json.loads(line) for line in text.splitlines() if line.strip()]
