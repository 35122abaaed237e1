"""Counts per stage of a run: a loop over the stage table (`core.layout.STAGES`, `EXPORTS`),
summing each stage's stats envelopes (per source where a stage runs per source or shard)."""

from __future__ import annotations

import functools
import html
import os
from collections.abc import Collection
from pathlib import Path

from groundset.core import layout
from groundset.core.io import atomic_write, read_json, write_json
from groundset.core.stats import add_counts, read_stats
from groundset.stages.merge import TIER_FILES
from groundset.stages.parts import read_plan

# What the summary's banner says where a stage's stats say a stand-in ran (`stand_in`).
STAND_IN_WARNINGS = (
    ("sample_server", "download",
     "images come from the bundled sample's loopback server (sources[].serve_dir), not from "
     "their URLs; leave serve_dir unset for a real download"),
    ("stand_in_captions", "caption",
     "captions and boxes are PLACEHOLDERS from groundset's loopback stand-in server, not a "
     "model; set DASHSCOPE_API_KEY, caption.base_url (a vLLM server) or caption.serve.command "
     "(servers on your GPUs) for real ones (README: Captioning)"),
    ("random_sam2", "mask",
     "masks come from SAM2 with RANDOM weights (mask.random_weights: true, no checkpoint); set "
     "mask.checkpoint to sam2.1_hiera_large.pt for real masks"),
    ("random_emu3_tokenizer", "emu3 export",
     "Emu3 visual tokens come from a tiny RANDOM tokenizer (export.emu3.random_weights: true, "
     "no tokenizer); set export.emu3.tokenizer to BAAI/Emu3-VisionTokenizer for real ones"),
)  # fmt: skip
STAND_IN_MODELS_WARNING = (
    "filter scores come from tiny RANDOM stand-in models (filter.stand_in_models: true); "
    "configure real models for real data"
)


@functools.cache
def _plan(workdir: Path, source: str) -> frozenset[str] | None:
    """The download parts of a source's current plan (None: none written yet)."""
    plan = workdir / layout.PARTS.format(source=source)
    return frozenset(p.name for p in read_plan(plan)) if plan.exists() else None


@functools.cache
def _index(workdir: Path, source: str, part: str) -> frozenset[str] | None:
    """The shards of a download part's current index (None: not indexed yet)."""
    index = workdir / layout.SHARD_INDEX.format(source=source, download_part=part)
    shards = read_json(index)["shards"] if index.exists() else None
    return None if shards is None else frozenset(str(entry["shard"]) for entry in shards)


def _current(workdir: Path, path: Path, stage: layout.Stage) -> str | None:
    """The source of a per-part or per-shard stats file when its part is in the source's current
    plan and its shard in the part's current index (a file removed from a URL list, a smaller
    shard_size leave older files behind), else None."""
    source, *rest = path.relative_to(workdir).parts[1:]
    part, name = (rest[0], rest[1]) if stage.per == "shard" else (rest[0].split("_")[0], "")
    shard = name.removeprefix("shard_").split("_")[0]
    parts, shards = _plan(workdir, source), _index(workdir, source, part) if name else None
    current = (parts is None or part in parts) and (shards is None or shard in shards)
    return source if current else None


def stats_files(workdir: Path, stage: layout.Stage) -> dict[str, list[Path]]:
    """A stage's stats files by source ("" for a stage over every source)."""
    if stage.per not in ("shard", "download_part"):
        path = workdir / stage.stats
        return {"": [path]} if path.exists() else {}
    _plan.cache_clear()  # the plans and indexes as they are now
    _index.cache_clear()
    found: dict[str, list[Path]] = {}
    for path in sorted(workdir.glob(stage.stats.format(source="*", download_part="*", shard="*"))):
        if (source := _current(workdir, path, stage)) is not None:
            found.setdefault(source, []).append(path)
    return found


def row(name: str, stats: dict) -> dict:
    """One line of the counts table from a (summed) stats envelope."""
    dropped = stats["dropped"]
    return {"stage": name, "in": stats["records_in"], "kept": stats["records_out"],
            "dropped": sum(dropped.values()), "reasons": {r: n for r, n in dropped.items() if n}}  # fmt: skip


def tier_rows(stats: dict) -> list[dict]:
    """The merge's further tiers, each a line of what the tier before it passed on."""
    counts = stats.get("per_tier", {})
    rows, before = [], stats["records_out"]
    for name in TIER_FILES[1:]:
        kept = counts.get(name, 0)
        rows.append(row(f"{Path(name).stem} tier", {"records_in": before, "records_out": kept,
                                                    "dropped": {"below_tier": before - kept}}))  # fmt: skip
        before = kept
    return rows


def stage_table(formats: Collection[str] | None) -> list[tuple[str, layout.Stage]]:
    """(table name, stage) of every stage, then the exports of `formats` (None: all)."""
    stages = [(stage.name, stage) for stage in layout.STAGES]
    chosen = [(f"{fmt} export", stage) for fmt, stage in layout.EXPORTS.items()
              if formats is None or fmt in formats]  # fmt: skip
    return stages + chosen


def stage_totals(workdir: Path, stage: layout.Stage) -> tuple[dict, dict[str, dict]] | None:
    """A stage's envelopes summed over all (with the last one's extras, `stand_in` if any
    says so) and per source ("" for a stage over every source); None before it ran."""
    files = stats_files(workdir, stage)
    total, extras, per_source = {"records_in": 0, "records_out": 0, "dropped": {}}, {}, {}
    for source, paths in files.items():
        per_source[source] = {"records_in": 0, "records_out": 0, "dropped": {}}
        for path in paths:
            stats = read_stats(path)
            add_counts(per_source[source], stats)
            extras = {**stats, "stand_in": bool(extras.get("stand_in") or stats.get("stand_in"))}
        add_counts(total, per_source[source])
    return ({**extras, **total}, per_source) if files else None


def _add_stage(summary: dict, name: str, totals: tuple[dict, dict[str, dict]]) -> None:
    """One stage's table line, its per-source lines (and the merge's tiers)."""
    total, per_source = totals
    for source, counts in ((s, c) for s, c in per_source.items() if s):
        summary["sources"].setdefault(source, []).append(row(name, counts))
    summary["stages"].append(row(name, total))
    if name == "merge":
        summary["stages"] += tier_rows(total)


def caption_model(stats: dict) -> str:
    """Who answered the caption requests of a run, as the summary names it."""
    if stats.get("stand_in"):
        return "stand-in (PLACEHOLDER captions, no model)"
    if not stats.get("model"):
        return "none (no record reached captioning)"
    return f"{stats['model']} via {stats['backend']}"


def mask_model(stats: dict) -> str:
    """The SAM2 model of a run's masks, as the summary names it."""
    name = (stats.get("model_config") or "none").rsplit("/", 1)[-1]
    return f"SAM2 {name}" + (" (RANDOM weights)" if stats.get("random_weights") else "")


def _add_models(summary: dict, extras: dict[str, dict]) -> None:
    """The models and stand-ins the stages' stats name."""
    if "caption" in extras:
        summary["models"]["caption"] = caption_model(extras["caption"])
    if "mask" in extras:
        summary["models"]["mask"] = mask_model(extras["mask"])
    for name, stage, text in STAND_IN_WARNINGS:
        if extras.get(stage, {}).get("stand_in"):
            summary["warnings"][name] = text


def collect(workdir: str | os.PathLike, formats: Collection[str] | None = None) -> dict:
    """Counts of every stage of a run from its stats envelopes: `stages` (one line each, all
    sources summed), `sources` (the lines of the stages run per source), `models`, `warnings`
    (the stand-ins that ran). `formats`: the exports to count (export.formats; None: every
    export found, also one a config no longer asks for)."""
    workdir = Path(workdir)
    summary: dict = {"stages": [], "sources": {}, "models": {}, "warnings": {}}
    extras: dict[str, dict] = {}
    for name, stage in stage_table(formats):
        totals = stage_totals(workdir, stage)
        if totals is not None:
            _add_stage(summary, name, totals)
            extras[name] = totals[0]
    if (workdir / layout.STAND_IN_MODELS).exists():
        summary["warnings"]["stand_in_models"] = STAND_IN_MODELS_WARNING
    _add_models(summary, extras)
    return summary


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
    rows = summary["stages"]
    write_json(json_path, {"stages": rows, "warnings": summary["warnings"]})
    with atomic_write(html_path) as handle:
        handle.write(stage_table_html(rows, summary["warnings"]))
    return rows


def _line(r: dict, width: int, indent: str = "") -> str:
    """One line of the text table (its first column `width` wide)."""
    reasons = ", ".join(f"{k}={v:,}" for k, v in r["reasons"].items()) or "-"
    return f"{indent + r['stage']:<{width}}{r['in']:>12,}{r['kept']:>12,}{r['dropped']:>10,}  {reasons}"


def format_summary(summary: dict) -> str:
    """`collect`'s result as a text table: each stage, under it its per-source lines."""
    if not summary["stages"]:
        return "no stats found"
    per_source: dict[str, list[dict]] = {}
    for source, r in ((s, r) for s, rows in summary["sources"].items() for r in rows):
        per_source.setdefault(r["stage"], []).append({**r, "stage": source})
    names = [r["stage"] for r in summary["stages"]] + [f"  {s}" for s in summary["sources"]]
    width = max(len(name) for name in names) + 2
    lines = [f"{'stage':<{width}}{'in':>12}{'kept':>12}{'dropped':>10}  reasons"]
    for r in summary["stages"]:
        lines.append(_line(r, width))
        if len(per_source.get(r["stage"], [])) > 1:
            lines += [_line(s, width, "  ") for s in per_source[r["stage"]]]
    lines += [f"{name} model: {text}" for name, text in summary["models"].items()]
    if summary["warnings"]:
        bar = "!" * 78
        lines += ["", bar, *(f"!! {k}: {t}" for k, t in summary["warnings"].items()), bar]
    return "\n".join(lines)
