"""Statistics of a grounded JSONL (the seed's qwen_stat.py and more), streamed in flat memory.

Entities per image, top entity names, box area and aspect distributions, mask scores and the
data-juicer filter scores from `__dj__stats__`: fixed-bin histograms filled record by record,
written as JSON and as PNG plots.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from groundset.core.io import atomic_save, iter_jsonl, write_json
from groundset.core.records import entity_boxes

TOP_NAMES = 50
HISTOGRAMS = {
    # name: (bin edges, what it counts)
    "entities_per_image": (
        np.arange(0, 22) - 0.5,
        "entities (boxes) per image; the last bin holds 20+",
    ),
    "box_area": (np.linspace(0, 1, 21), "box area as a fraction of the image"),
    "box_aspect": (np.logspace(-2, 2, 25, base=2.0), "box width / height (pixels), log scale"),
    "mask_score": (np.linspace(0, 1, 21), "SAM2 score per entity"),
    "image_aesthetics_scores": (np.linspace(0, 10, 41), "LAION aesthetic score (0-10)"),
    "image_nsfw_score": (np.linspace(0, 0.001, 21), "NSFW score"),
    "image_watermark_prob": (np.linspace(0, 1, 21), "watermark probability"),
    "aspect_ratios": (np.linspace(0.5, 2.0, 31), "image aspect ratio (width / height)"),
}


class Histograms:
    """Fixed-bin histograms filled value by value; values are buffered and binned in blocks
    (vectorized), so memory stays bounded (one block) however large the file."""

    BLOCK = 1 << 16

    def __init__(self):
        self.counts = {
            name: np.zeros(len(edges) - 1, dtype=np.int64)
            for name, (edges, _) in HISTOGRAMS.items()
        }
        self.n = Counter()
        self._pending: dict[str, list[float]] = {name: [] for name in HISTOGRAMS}

    def add(self, name: str, values) -> None:
        """Count values into histogram `name` (values outside the edges go to the end bins)."""
        pending = self._pending[name]
        pending.extend(values)
        if len(pending) >= self.BLOCK:
            self._flush(name)

    def _flush(self, name: str) -> None:
        """Bin the buffered values of one histogram."""
        pending = self._pending[name]
        if not pending:
            return
        edges = HISTOGRAMS[name][0]
        values = np.clip(np.asarray(pending, dtype=np.float64), edges[0], edges[-1])
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
        self.counts[name] += np.bincount(index, minlength=len(edges) - 1)
        self.n[name] += values.size
        pending.clear()

    def flush(self) -> None:
        """Bin everything still buffered."""
        for name in HISTOGRAMS:
            self._flush(name)


_SCORE_HISTOGRAMS = (
    "image_aesthetics_scores",
    "image_nsfw_score",
    "image_watermark_prob",
    "aspect_ratios",
)  # filled from `__dj__stats__`


def _add_boxes(hist: Histograms, names: Counter, record: dict, stats: dict) -> int:
    """Count a record's boxes into the box histograms and `names`; returns how many boxes."""
    width = (stats.get("image_width") or [record.get("width") or 0])[0] or 0
    height = (stats.get("image_height") or [record.get("height") or 0])[0] or 0
    per_image = 0
    for entity in record.get("entities") or []:
        boxes_of_entity = entity_boxes(entity)
        names[str(entity.get("entity", "")).strip().lower()] += len(boxes_of_entity)
        for x1, y1, x2, y2 in boxes_of_entity:
            per_image += 1
            hist.add("box_area", [(x2 - x1) * (y2 - y1)])
            if width and height and y2 > y1:
                hist.add("box_aspect", [((x2 - x1) * width) / ((y2 - y1) * height)])
    return per_image


def _add_record(hist: Histograms, names: Counter, record: dict) -> int:
    """Count one record into the histograms and `names`; returns its boxes."""
    stats = record.get("__dj__stats__") or {}
    per_image = _add_boxes(hist, names, record, stats)
    hist.add("entities_per_image", [min(per_image, 20)])
    hist.add("mask_score", record.get("mask_scores") or [])
    for name in _SCORE_HISTOGRAMS:
        hist.add(name, stats.get(name) or [])
    return per_image


def _histogram_table(hist: Histograms) -> dict:
    """The filled histograms as JSON: edges, counts, values and what each counts."""
    return {
        name: {
            "edges": [round(float(e), 6) for e in HISTOGRAMS[name][0]],
            "counts": hist.counts[name].tolist(),
            "values": hist.n[name],
            "about": HISTOGRAMS[name][1],
        }  # fmt: skip
        for name in HISTOGRAMS
    }


def collect_stats(path: str | os.PathLike) -> dict:
    """Counts, top entity names and histograms of a captioned or masked JSONL (one pass)."""
    hist = Histograms()
    names: Counter = Counter()
    records = images_with_entities = boxes = 0
    for record in iter_jsonl(path):
        records += 1
        per_image = _add_record(hist, names, record)
        boxes += per_image
        images_with_entities += per_image > 0
    hist.flush()
    return {
        "input": str(path),
        "records": records,
        "images_with_entities": images_with_entities,
        "boxes": boxes,
        "entities_per_image_mean": round(boxes / records, 3) if records else 0.0,
        "distinct_entity_names": len(names),
        "top_entities": names.most_common(TOP_NAMES),
        "histograms": _histogram_table(hist),
    }


def plot_stats(stats: dict, outdir: str | os.PathLike) -> list[Path]:
    """One PNG per non-empty histogram plus the top entity names; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, hist in stats["histograms"].items():
        if not hist["values"]:
            continue
        edges = np.asarray(hist["edges"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.stairs(hist["counts"], edges, fill=True)
        if name == "box_aspect":
            ax.set_xscale("log", base=2)
        ax.set_title(hist["about"])
        ax.set_ylabel("count")
        written.append(_save(fig, outdir / f"{name}.png"))
        plt.close(fig)
    if stats["top_entities"]:
        top = stats["top_entities"][:25][::-1]
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(top) + 1))
        ax.barh([name or "(empty)" for name, _ in top], [count for _, count in top])
        ax.set_title("most frequent entities (boxes)")
        written.append(_save(fig, outdir / "top_entities.png"))
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    """Save a figure atomically (a full disk names the file)."""
    fig.tight_layout()
    atomic_save(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    return path


def write_stats(
    path: str | os.PathLike, stats_out: str | os.PathLike, plots_dir: str | os.PathLike
) -> dict:
    """The statistics of a grounded JSONL as JSON (`stats_out`), its PNG plots into `plots_dir`."""
    stats = collect_stats(path)
    plots = plot_stats(stats, plots_dir)
    stats["plots"] = [p.name for p in plots]
    write_json(stats_out, stats)
    return stats
