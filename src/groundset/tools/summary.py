"""Counts per stage of a run, read from the stats files the stages write."""

from __future__ import annotations

import html
import os
from collections import Counter
from collections.abc import Collection
from pathlib import Path

from groundset.core.io import atomic_write, read_json, write_json
from groundset.stages.filter.shard import OPS
from groundset.stages.merge import TIER_FILES


def _per_source(folder: Path, pattern: str) -> dict[str, dict]:
    """Stats files `folder/<source><suffix>` keyed by source."""
    prefix, suffix = pattern.split("*")
    found = {}
    for path in sorted(folder.glob(pattern)):
        found[path.name[len(prefix) : len(path.name) - len(suffix)]] = read_json(path)
    return found


def _warn(summary: dict, name: str, text: str) -> None:
    """Add a line to the summary's WARNING banner."""
    summary.setdefault("WARNING", {})[name] = text


def caption_model(stats: dict) -> str:
    """Who answered the caption requests of a run, as the summary names it."""
    if stats.get("stand_in"):
        return "stand-in (PLACEHOLDER captions, no model)"
    if not stats.get("model"):
        return "none (no record reached captioning)"
    return f"{stats['model']} via {stats['backend']}"


# The other trainers' formats: (export.formats name, summary name, stats file, its count of
# exported images).
EXPORT_STATS = (
    ("coco", "coco export", "export/coco/coco_stats.json", "images"),
    ("odvg", "odvg export", "export/odvg/odvg_stats.json", "images"),
    ("webdataset", "webdataset export", "export/wds_stats.json", "samples"),
)


def collect(workdir: str | os.PathLike, formats: Collection[str] | None = None) -> dict[str, dict]:
    """Counts of every stage from its stats files: per source (URL rows, prefilter, download,
    manifest, shards, filter), then tiers, dedup, captions, masks and the exports of `formats`
    (export.formats; None: every export found, also one a config no longer asks for)."""
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
        folder = workdir / "filtered" / source
        if index.exists():
            # the shards of the current index: a smaller shard_size leaves older shards' files
            shards = [entry["shard"] for entry in read_json(index)["shards"]]
            row["shards"] = len(shards)
            selected = [folder / f"shard_{shard}_stats.json" for shard in shards]
        else:
            selected = sorted(folder.glob("shard_*_stats.json"))
        probe_drops: Counter = Counter()
        removed: Counter = Counter()
        filtered = 0
        for path in selected:
            if not path.exists():
                continue  # not selected yet
            stats = read_json(path)
            probe_drops.update(stats["probe"].get("dropped", {}))
            removed.update(stats["removed_by_filter"])
            filtered += stats["records_out"]
        if filtered or removed:
            row["unreadable_images"] = dict(probe_drops)
            row["filter_removed"] = {
                op.removeprefix("image_").removesuffix("_filter"): removed[op]
                for op in (*OPS, "score_error")  # score_error: an image changed after the probe
                if op in removed
            }
            row["filter_kept"] = filtered
        summary[source] = row
    if (workdir / "models" / "stand_in" / "models.json").exists():
        _warn(
            summary,
            "stand_in_models",
            "filter scores come from tiny RANDOM stand-in models "
            "(filter.stand_in_models: true); configure real models for real data",
        )
    merged = workdir / "merged" / "merge_stats.json"
    if merged.exists():
        summary["merged tiers"] = read_json(merged)["records"]
    dedup = workdir / "dedup" / "dedup_stats.json"
    if dedup.exists():
        stats = read_json(dedup)
        summary["dedup"] = {
            "records": stats["records_in"],
            "kept": stats["kept"],
            "duplicates": {k: v for k, v in stats["dropped_by_kind"].items() if v},
            "unhashable": stats["unhashable"],
            "max_distance": stats["max_distance"] if stats["enabled"] else "off",
        }
    captioned = workdir / "captioned" / "caption_stats.json"
    if captioned.exists():
        stats = read_json(captioned)
        summary["captioning"] = {
            "model": caption_model(stats),
            "records": stats.get("records", 0),
            "captioned": stats.get("captioned", 0),
            "entities": stats.get("entities", 0),
            "boxes": stats.get("boxes", 0),
            "requests": stats.get("attempts", 0),
            "not_captioned": stats.get("error_reasons", {}),
        }
        if stats.get("stand_in"):
            _warn(
                summary,
                "stand_in_captions",
                "captions and boxes are PLACEHOLDERS from groundset's "
                "loopback stand-in server, not a model; set DASHSCOPE_API_KEY, caption.base_url "
                "(a vLLM server) or caption.serve.command (servers on your GPUs) for real ones "
                "(README: Captioning)",
            )
    masked = workdir / "masked" / "mask_stats.json"
    if masked.exists():
        stats = read_json(masked)
        summary["masks"] = {
            "model": f"SAM2 {(stats.get('model_config') or 'none').rsplit('/', 1)[-1]}",
            "records": stats.get("records", 0),
            "masked": stats.get("masked", 0),
            "entities": stats.get("entities", 0),
            "entities_dropped": stats.get("entities_dropped", 0),
            "dropped": stats.get("drop_reasons", {}),
            "bytes_per_image": f"{stats.get('bytes_per_masked_image', 0):.0f} "
            f"({stats.get('mask_format') or '-'})",
        }
        if stats.get("random_weights"):
            _warn(
                summary,
                "random_sam2",
                "masks come from SAM2 with RANDOM weights "
                "(mask.random_weights: true, no checkpoint); "
                "set mask.checkpoint to sam2.1_hiera_large.pt for real masks",
            )
    emu3 = workdir / "export" / "emu3" / "emu3_stats.json"
    if emu3.exists() and (formats is None or "emu3" in formats):
        stats = read_json(emu3)
        summary["emu3 export"] = {
            "records": stats["records"],
            "exported": stats["exported"],
            "tokenized": stats["tokenized"] if stats["tokenize"] else "no (prompts only)",
            "reused": stats["reused"],
            "train_items": stats["train_items"],
            "not_exported": stats["error_reasons"],
        }
        if stats.get("stand_in_tokenizer"):
            _warn(
                summary,
                "random_emu3_tokenizer",
                "Emu3 visual tokens come from a tiny RANDOM tokenizer "
                "(export.emu3.random_weights: true, no tokenizer); "
                "set export.emu3.tokenizer to BAAI/Emu3-VisionTokenizer for real ones",
            )
    masked_records = summary.get("masks", {}).get("masked", 0)
    for fmt, name, path, count in EXPORT_STATS:
        if (workdir / path).exists() and (formats is None or fmt in formats):
            stats = read_json(workdir / path)
            summary[name] = {
                "records": masked_records,
                "exported": stats[count],
                "boxes": stats.get("annotations", stats.get("regions", stats.get("boxes", 0))),
                "not_exported": stats.get("skipped", {}),
            }
    return summary


def _row(stage: str, records_in: int, kept: int, reasons: dict | None = None) -> dict:
    """One stage's line of the counts table."""
    reasons = {k: v for k, v in (reasons or {}).items() if v}
    return {
        "stage": stage,
        "in": records_in,
        "kept": kept,
        "dropped": records_in - kept,
        "reasons": reasons,
    }


def stage_counts(summary: dict[str, dict]) -> list[dict]:
    """Records in, kept and dropped (with reasons) per stage, all sources summed."""
    rows = []
    per_source = [
        row for name, row in summary.items() if "manifest_records" in row or "url_rows" in row
    ]

    def total(key: str) -> int:
        return sum(row.get(key, 0) for row in per_source)

    def reasons(*keys: str) -> dict:
        summed: Counter = Counter()
        for row in per_source:
            for key in keys:
                summed.update(row.get(key, {}))
        return dict(summed)

    if any("url_rows" in row for row in per_source):
        rows.append(
            _row("prefilter", total("url_rows"), total("to_download"), reasons("prefilter_dropped"))
        )
    if any("downloaded" in row for row in per_source):
        failed = {
            "failed_download": total("failed_download"),
            "failed_decode": total("failed_decode"),
        }
        rows.append(_row("download", total("to_download"), total("downloaded"), failed))
    if any("manifest_records" in row for row in per_source):
        rows.append(_row("manifest", total("downloaded"), total("manifest_records")))
    if any("filter_kept" in row for row in per_source):
        rows.append(
            _row(
                "filter",
                total("manifest_records"),
                total("filter_kept"),
                reasons("unreadable_images", "filter_removed"),
            )
        )
    if "merged tiers" in summary:
        tiers = summary["merged tiers"]
        low, high = tiers[TIER_FILES[0]], tiers[TIER_FILES[1]]
        rows.append(
            _row(
                "merge", total("filter_kept"), low, {"below_first_tier": total("filter_kept") - low}
            )
        )
        rows.append(_row("aes_6 tier", low, high, {"below_second_tier": low - high}))
    if "dedup" in summary:
        row = summary["dedup"]
        rows.append(_row("dedup", row["records"], row["kept"], row["duplicates"]))
    if "captioning" in summary:
        row = summary["captioning"]
        rows.append(_row("caption", row["records"], row["captioned"], row["not_captioned"]))
    if "masks" in summary:
        row = summary["masks"]
        rows.append(_row("mask", row["records"], row["masked"], row["dropped"]))
    if "emu3 export" in summary:
        row = summary["emu3 export"]
        rows.append(_row("emu3 export", row["records"], row["exported"], row["not_exported"]))
    for _, name, _, _ in EXPORT_STATS:
        if name in summary:
            row = summary[name]
            rows.append(_row(name, row["records"], row["exported"], row["not_exported"]))
    return rows


def stage_table_html(rows: list[dict], warnings: dict | None = None) -> str:
    """The counts table as a standalone HTML page (for the Snakemake report)."""
    cells = "".join(
        f"<tr><td>{html.escape(r['stage'])}</td><td>{r['in']:,}</td><td>{r['kept']:,}</td>"
        f"<td>{r['dropped']:,}</td><td>"
        + html.escape(", ".join(f"{k}: {v:,}" for k, v in r["reasons"].items()))
        + "</td></tr>"
        for r in rows
    )
    notes = "".join(f"<li>{html.escape(text)}</li>" for text in (warnings or {}).values())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>groundset: counts per stage</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 10px;text-align:right}"
        "td:first-child,td:last-child{text-align:left}.warn{color:#b00}</style></head><body>"
        "<h2>Records per stage</h2><table><tr><th>stage</th><th>in</th><th>kept</th>"
        f"<th>dropped</th><th>reasons</th></tr>{cells}</table>"
        + (f"<ul class='warn'>{notes}</ul>" if notes else "")
        + "</body></html>\n"
    )


def write_stage_counts(
    workdir: str | os.PathLike, json_path: str | os.PathLike, html_path: str | os.PathLike,
    formats: Collection[str] | None = None,
) -> list[dict]:  # fmt: skip
    """The counts per stage of a run (the exports of `formats`) as JSON and as an HTML table."""
    summary = collect(workdir, formats)
    rows = stage_counts(summary)
    write_json(json_path, {"stages": rows, "warnings": summary.get("WARNING", {})})
    with atomic_write(html_path) as handle:
        handle.write(stage_table_html(rows, summary.get("WARNING")))
    return rows


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
