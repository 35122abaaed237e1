"""Counts per stage of a run, read from the stats files the stages write."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from .filter import OPS
from .io import read_json


def _per_source(folder: Path, pattern: str) -> dict[str, dict]:
    """Stats files `folder/<source><suffix>` keyed by source."""
    prefix, suffix = pattern.split("*")
    found = {}
    for path in sorted(folder.glob(pattern)):
        found[path.name[len(prefix) : len(path.name) - len(suffix)]] = read_json(path)
    return found


def collect(workdir: str | os.PathLike) -> dict[str, dict]:
    """Per source: rows in the URL list, kept by the prefilter, downloaded, in the manifest, shards."""
    workdir = Path(workdir)
    pre = _per_source(workdir / "url_lists", "*_stats.json")
    down = _per_source(workdir / "downloads", "*_stats.json")
    man = _per_source(workdir / "manifest", "*_stats.json")
    summary: dict[str, dict] = {}
    for source in sorted(set(pre) | set(down) | set(man)):
        row: dict = {}
        if source in pre:
            row["url_rows"] = pre[source]["rows_in"]
            row["prefilter_dropped"] = {k: v for k, v in pre[source]["dropped"].items() if v}
            row["to_download"] = pre[source]["rows_out"]
        if source in down:
            row["downloaded"] = down[source]["successes"]
            row["failed_download"] = down[source]["failed_to_download"]
            row["failed_decode"] = down[source]["failed_to_resize"]
        if source in man:
            row["manifest_records"] = man[source]["records"]
        index = workdir / "shards" / source / "index.json"
        if index.exists():
            row["shards"] = len(read_json(index)["shards"])
        probe_drops: Counter = Counter()
        removed: Counter = Counter()
        filtered = 0
        for path in sorted((workdir / "filtered" / source).glob("shard_*_stats.json")):
            stats = read_json(path)
            probe_drops.update(stats["probe"].get("dropped", {}))
            removed.update(stats["removed_by_filter"])
            filtered += stats["records_out"]
        if filtered or removed:
            row["unreadable_images"] = dict(probe_drops)
            row["filter_removed"] = {
                op.removeprefix("image_").removesuffix("_filter"): removed[op]
                for op in OPS
                if op in removed
            }
            row["filter_kept"] = filtered
        summary[source] = row
    if (workdir / "models" / "stand_in" / "models.json").exists():
        summary["WARNING"] = {
            "stand_in_models": "filter scores come from tiny RANDOM stand-in models "
            "(filter.stand_in_models: true); configure real models for real data"
        }
    merged = workdir / "merged" / "merge_stats.json"
    if merged.exists():
        summary["merged tiers"] = read_json(merged)["records"]
    captioned = workdir / "captioned" / "caption_stats.json"
    if captioned.exists():
        stats = read_json(captioned)
        summary["captioning"] = {
            "model": f"{stats['model']} via {stats['backend']}",
            "records": stats["records"],
            "captioned": stats["captioned"],
            "entities": stats["entities"],
            "boxes": stats["boxes"],
            "requests": stats["attempts"],
            "not_captioned": stats["error_reasons"],
        }
        if stats.get("stand_in"):
            summary["WARNING"] = {
                **summary.get("WARNING", {}),
                "stand_in_captions": "captions and boxes are PLACEHOLDERS from groundset's "
                "loopback stand-in server, not a model; set DASHSCOPE_API_KEY (or caption.base_url "
                "for a vLLM server) for real ones (README: Captioning)",
            }
    masked = workdir / "masked" / "mask_stats.json"
    if masked.exists():
        stats = read_json(masked)
        summary["masks"] = {
            "model": f"SAM2 {stats['model_config'].rsplit('/', 1)[-1]}",
            "records": stats["records"],
            "masked": stats["masked"],
            "entities": stats["entities"],
            "entities_dropped": stats["entities_dropped"],
            "dropped": stats["drop_reasons"],
            "bytes_per_image": f"{stats['bytes_per_masked_image']:.0f} ({stats['mask_format']})",
        }
        if stats.get("random_weights"):
            summary["WARNING"] = {
                **summary.get("WARNING", {}),
                "random_sam2": "masks come from SAM2 with RANDOM weights (mask.checkpoint: null); "
                "set mask.checkpoint to sam2.1_hiera_large.pt for real masks",
            }
    return summary


def format_summary(summary: dict[str, dict]) -> str:
    """A short human-readable table of `collect`'s result."""
    lines = []
    for source, row in summary.items():
        if source == "WARNING":
            continue
        lines.append(f"{source}:")
        for key, value in row.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
            lines.append(f"  {key:<19} {value}")
    if "WARNING" in summary:
        bar = "!" * 78
        lines += ["", bar]
        lines += [f"!! {name}: {text}" for name, text in summary["WARNING"].items()]
        lines.append(bar)
    return "\n".join(lines) if lines else "no stats found"
