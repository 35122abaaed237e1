"""Estimate a run before it starts: per stage records in and out, jobs, wall time, requests, cost.

Counts come from the URL lists themselves: rows from the parquet footers (no data read), the
pre-download filter's pass rate from the WIDTH/HEIGHT (and punsafe/pwatermark) columns of a
sample of row groups spread over the files, run through the prefilter's own rules. Everything
later is a pass rate times what reached the stage, and a time per job from the config's jobs
and resources and a rate: measured where an earlier run left Snakemake benchmarks
(`benchmarks/**/*.tsv`) and stats files, else the documented assumption of ASSUMED. Every
figure carries its `basis` (metadata, config, measured or assumed) and where it comes from.
"""

from __future__ import annotations

import copy
import csv
import heapq
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import download_options, validate_config
from .io import read_json
from .merge import TIER_FILES
from .prefilter import PrefilterRules, filter_table, list_parquet_files, open_parquet

# Rates and pass rates used where no earlier run measured them. Each says where it comes from;
# `groundset estimate --from-run DIR` replaces them by a run's own figures.
ASSUMED: dict[str, dict] = {
    "download_success": {
        "value": 0.68,
        "unit": "of URL rows downloaded",
        "source": "img2dataset issue #400 (2024, LAION-400M: 67-68% per worker); its author in "
        "img2dataset #439: '75% success may be normal'; salesforce/LAVIS #498: 60-70%",
    },
    "download_rows_per_s_per_process": {
        "value": 17.5,
        "unit": "URL rows/s per img2dataset process",
        "source": "img2dataset dataset_examples/laion-high-resolution.md: 280 samples/s with "
        "processes_count 16 on one 32-core 2 Gbps machine (>= 1024 px images are bandwidth-bound; "
        "256 px LAION-400M runs 1300/s, laion400m.md)",
    },
    "prefilter_rows_per_s": {
        "value": 250_000.0,
        "unit": "rows/s per job",
        "source": "assumed: arrow compute over batches and a parquet rewrite (negligible next to "
        "the download)",
    },
    "manifest_records_per_s": {
        "value": 2_000.0,
        "unit": "records/s per job",
        "source": "assumed: one sidecar JSON read per image on a shared filesystem "
        "(bench/bench_manifest.py measures yours)",
    },
    "manifest_pass": {
        "value": 1.0,
        "unit": "of downloads in the manifest",
        "source": "assumed: every success has its image and sidecar",
    },
    "probe_pass": {
        "value": 0.995,
        "unit": "of manifest records decodable",
        "source": "assumed: img2dataset already fails what it cannot decode (failed_to_resize); "
        "the probe catches truncated or odd files, rare",
    },
    "score_images_per_s_per_cpu_thread": {
        "value": 0.42,
        "unit": "images/s per filter.np thread, no GPU",
        "source": "README 'Speed' (bench/bench_filter.py): score + select 0.84 images/s with "
        "real-size models on a 2-core CPU (AMX bf16)",
    },
    "score_images_per_s_per_decode_thread_gpu": {
        "value": 9.5,
        "unit": "images/s per filter.np thread with filter.gpus > 0",
        "source": "README 'Speed': after start-up the op scores ~19 images/s on 2 cores when "
        "decoding dominates (tiny models); on a GPU the models are not the bound, decoding is",
    },
    "score_job_start_s": {
        "value": 15.0,
        "unit": "s per score job",
        "source": "README 'Speed': both jobs spend ~15 s starting (imports)",
    },
    "filter_pass_aesthetics": {
        "value": 0.26,
        "unit": "of scored images with aesthetics >= 5",
        "source": "LAION-Aesthetics V2: 600M of LAION-2B-en's 2.32B score >= 5 (laion.ai)",
    },
    "filter_pass_other": {
        "value": 0.8,
        "unit": "of images passing the NSFW and watermark ceilings",
        "source": "assumed: no published figure for these models and thresholds; measure with "
        "a small run",
    },
    "select_records_per_s": {
        "value": 20_000.0,
        "unit": "records/s per job",
        "source": "assumed: one JSON parse and write per record",
    },
    "tier_high_of_low": {
        "value": 0.02,
        "unit": "of the first tier in the second",
        "source": "LAION-Aesthetics V2: 12M score >= 6 against 600M >= 5 (laion.ai)",
    },
    "merge_records_per_s": {
        "value": 20_000.0,
        "unit": "records/s",
        "source": "assumed: one JSON parse and write per record",
    },
    "dedup_drop": {
        "value": 0.3,
        "unit": "of records dropped as duplicates",
        "source": "Webster et al. 2023, On the De-duplication of LAION-2B (arXiv:2303.12733): "
        "~30% likely duplicated (CLIP features; a 4-bit pHash finds fewer: an upper bound)",
    },
    "dedup_images_per_s_per_thread": {
        "value": 50.0,
        "unit": "images/s per caption.dedup.threads",
        "source": "assumed: a reduced-scale JPEG decode and a perceptual hash per image",
    },
    "caption_answer_latency_s": {
        "value": 1.5,
        "unit": "s per answer",
        "source": "README 'Pacing' (the 1.5 s answer latency it plans for; bench_caption serve)",
    },
    "caption_pass": {
        "value": 0.95,
        "unit": "of requests giving a grounded caption",
        "source": "assumed: refusals, moderation (DataInspectionFailed), unparseable answers "
        "and captions without a valid box",
    },
    "serve_images_per_s": {
        "value": 10.0,
        "unit": "images/s per server",
        "source": "README 'Captioning on your own GPUs': ~10 images/s per GPU (vLLM, 7B model)",
    },
    "serve_start_s": {
        "value": 120.0,
        "unit": "s per caption job (its server's start)",
        "source": "README: vLLM loads a 7B model in 1-3 minutes",
    },
    "mask_images_per_s_per_gpu": {
        "value": 38.8,
        "unit": "images/s per mask job GPU",
        "source": "README 'Masks' (bench/bench_mask.py): SAM2 hiera-large on an H200, "
        "1536x1024 images, 3 boxes each",
    },
    "mask_images_per_s_per_cpu_thread": {
        "value": 0.02,
        "unit": "images/s per mask.decode_workers thread, no GPU",
        "source": "measured for this module: bench/bench_mask.py --model large --device cpu, "
        "0.04 images/s on 2 busy cores",
    },
    "mask_pass": {
        "value": 0.99,
        "unit": "of captioned records keeping an entity",
        "source": "assumed: the default quality floors are 0 (only vanished images drop)",
    },
    "emu3_images_per_s_per_gpu": {
        "value": 20.0,
        "unit": "images/s per emu3_part GPU",
        "source": "assumed: no measurement here (bench/bench_emu3.py --tokenizer measures one)",
    },
    "emu3_prompts_per_s": {
        "value": 5_000.0,
        "unit": "records/s with tokenize: false",
        "source": "assumed: prompts and lists only",
    },
    "export_records_per_s": {
        "value": 5_000.0,
        "unit": "records/s (COCO, ODVG)",
        "source": "assumed: one JSON parse and write per record",
    },
    "webdataset_images_per_s": {
        "value": 200.0,
        "unit": "images/s (image bytes copied into tars)",
        "source": "assumed: ~1 MB per image at ~200 MB/s of disk",
    },
}
SAMPLE_ROWS = 1_000_000  # URL-list rows read (two columns) for the prefilter's pass rate
BATCH_ROWS = 65_536


def assumed(name: str) -> dict:
    """An assumed figure as a basis-carrying value."""
    entry = ASSUMED[name]
    return {"value": entry["value"], "basis": "assumed", "source": f"{name}: {entry['source']}"}


def _figure(value: float, basis: str, source: str) -> dict:
    """A figure with where it comes from."""
    return {"value": value, "basis": basis, "source": source}


# --- the URL lists ---------------------------------------------------------------------


def _row_groups(files: list[Path], url_col: str) -> tuple[list[tuple[Path, int, int]], int, int]:
    """Every row group of the files as (file, group, rows), total rows and URL nulls, all from
    the footers."""
    groups, rows, nulls = [], 0, 0
    for path in files:
        with open_parquet(path) as parquet:
            meta = parquet.metadata
            names = parquet.schema_arrow.names
            rows += meta.num_rows
            url = names.index(url_col) if url_col in names else None
            for group in range(meta.num_row_groups):
                row_group = meta.row_group(group)
                groups.append((path, group, row_group.num_rows))
                if url is not None and row_group.num_columns > url:
                    stats = row_group.column(url).statistics
                    if stats is not None and stats.has_null_count:
                        nulls += stats.null_count
    return groups, rows, nulls


def _sample(groups: list[tuple[Path, int, int]], budget: int) -> list[tuple[Path, int, int]]:
    """Row groups spread evenly over the list whose rows add up to about `budget` (all if fewer)."""
    total = sum(rows for _, _, rows in groups)
    if total <= budget or not groups:
        return groups
    wanted = max(1, min(len(groups), math.ceil(budget / (total / len(groups)))))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(groups) - 1, wanted)})
    return [groups[i] for i in picks]


def prefilter_pass(
    files: list[Path], rules: PrefilterRules, budget: int = SAMPLE_ROWS
) -> dict[str, object]:
    """Rows, URL nulls and the prefilter's pass rate of a URL list: counts from the footers, the
    rate from the size (and safety) columns of sampled row groups, in batches."""
    groups, rows, nulls = _row_groups(files, rules.url_col)
    out = {"rows": rows, "null_urls": nulls, "sampled_rows": 0, "pass": 1.0, "dropped": {}}
    if not groups:
        return out
    with open_parquet(groups[0][0]) as parquet:
        names = parquet.schema_arrow.names
    wanted = ["WIDTH", "width", "HEIGHT", "height"] if rules.size_filter else []
    ceilings = (("punsafe", rules.max_punsafe), ("pwatermark", rules.max_pwatermark))
    wanted += [column for column, limit in ceilings if limit is not None]
    columns = [c for c in wanted if c in names]
    if not columns:
        return out
    seen, counts = 0, Counter()
    by_file: dict[Path, list[int]] = {}
    for path, group, _ in _sample(groups, budget):
        by_file.setdefault(path, []).append(group)
    for path, chosen in by_file.items():
        with open_parquet(path) as parquet:
            present = [c for c in columns if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(BATCH_ROWS, row_groups=chosen, columns=present):
                table = pa.Table.from_batches([batch])
                # the URL is not read: its nulls come from the footers; any value stands in
                table = table.append_column(rules.url_col, pa.repeat("u", table.num_rows))
                counts.update(filter_table(table, rules)[1])
                seen += table.num_rows
    dropped = sum(counts.values())
    out["sampled_rows"] = seen
    out["dropped"] = {k: round(v / seen, 6) for k, v in counts.items() if v} if seen else {}
    out["pass"] = (seen - dropped) / seen if seen else 1.0
    return out


def url_lists(config: dict, budget: int = SAMPLE_ROWS) -> list[dict]:
    """Per source: its files, rows, URL nulls and the prefilter's pass rate (or its error)."""
    found = []
    for source in config["sources"]:
        opts = download_options(config, source)
        entry = {
            "name": source["name"],
            "url_list": source["url_list"],
            "files": 0,
            "rows": 0,
            "null_urls": 0,
            "sampled_rows": 0,
            "pass": 1.0,
            "dropped": {},
            "processes": opts["processes_count"],
        }
        try:
            files = list_parquet_files(source["url_list"])
            rules = PrefilterRules.from_config(config, opts)
            entry.update(files=len(files), **prefilter_pass(files, rules, budget))
        except (OSError, ValueError) as error:
            entry["error"] = str(error)
        entry["to_download"] = round(max(0, entry["rows"] - entry["null_urls"]) * entry["pass"])
        found.append(entry)
    return found


# --- an earlier run's figures ----------------------------------------------------------


def read_benchmark(path: Path) -> dict | None:
    """Seconds and peak RSS (MB) of one Snakemake benchmark file (the mean of its rows)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except OSError:
        return None
    values = [(float(r["s"]), float(r.get("max_rss") or 0)) for r in rows if r.get("s")]
    values = [(s, rss) for s, rss in values if math.isfinite(s)]
    if not values:
        return None
    return {
        "s": sum(s for s, _ in values) / len(values),
        "max_rss": max(rss for _, rss in values),
    }


def _fit(jobs: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(start-up s, s per record) of jobs as (records, seconds): a line when the sizes differ
    and it makes sense, else no start-up and the mean time per record."""
    jobs = [(n, s) for n, s in jobs if n > 0 and s > 0]
    if not jobs:
        return None
    sizes = [n for n, _ in jobs]
    if len(set(sizes)) >= 2:
        slope, start = np.polyfit(sizes, [s for _, s in jobs], 1)
        if slope > 0 and start >= 0:
            return float(start), float(slope)
    return 0.0, sum(s for _, s in jobs) / sum(sizes)


# Per stage of a run: the rule whose benchmarks time its jobs, and the stats file and keys that
# give each job's records (`{job}`: the benchmark file's stem, `{group}`: its folder's name).
JOB_RECORDS = {
    "prefilter": ("prefilter_urls", "url_lists/{job}_stats.json", ("rows_in",)),
    "download": ("download_images", "downloads/{job}_stats.json", ("count",)),
    "manifest": ("build_manifest", "manifest/{job}_stats.json", ("records",)),
    "score": ("score_shard", "scored/{group}/shard_{job}_stats.json", ("records_in",)),
    "merge": ("merge_tiers", "merged/merge_stats.json", ("records_in",)),
    "dedup": ("dedup_records", "dedup/dedup_stats.json", ("records_in", "records")),
    "caption": ("caption_chunk", "captioned/chunk_{job}_stats.json", ("requested",)),
    "mask": ("mask_chunk", "masked/chunk_{job}_stats.json", ("computed",)),
    "export emu3": ("emu3_part", "export/emu3/list/parts/stats_{job}.json", ("tokenized",)),
    "export coco": ("export_coco", "export/coco/coco_stats.json", ("images",)),
    "export odvg": ("export_odvg", "export/odvg/odvg_stats.json", ("images",)),
    "export webdataset": ("export_wds", "export/wds_stats.json", ("samples",)),
}


def _value(stats: dict, *path: str) -> float:
    """A number inside a stats document (0 where the path is missing)."""
    for part in path:
        stats = stats.get(part) if isinstance(stats, dict) else None
    return stats if isinstance(stats, int | float) else 0


def _total(run: Path, pattern: str, *path: str) -> float:
    """A number summed over the stats files of a run matching `pattern`."""
    return sum(_value(read_json(p), *path) for p in sorted(run.glob(pattern)))


def _job_records(run: Path, stage: str) -> tuple[list[tuple[float, float]], float]:
    """(records, seconds) of each benchmarked job of a stage, and the peak RSS (MB)."""
    rule, pattern, keys = JOB_RECORDS[stage]
    folder = run / "benchmarks"
    paths = sorted((folder / rule).rglob("*.tsv")) or sorted(folder.glob(f"{rule}.tsv"))
    jobs, peak = [], 0.0
    for path in paths:
        timing = read_benchmark(path)
        stats_path = run / pattern.format(job=path.stem, group=path.parent.name)
        stats = read_json(stats_path) if stats_path.exists() else {}
        records = next((_value(stats, key) for key in keys if _value(stats, key)), 0)
        if timing is not None and records:
            jobs.append((float(records), timing["s"]))
            peak = max(peak, timing["max_rss"])
    return jobs, peak


def _pass_counts(run: Path) -> dict[str, tuple[float, float]]:
    """(records in, records out) per stage of a run, from its stats files."""
    successes = _total(run, "downloads/*_stats.json", "successes")
    shards = "filtered/*/shard_*_stats.json"
    merged = run / "merged" / "merge_stats.json"
    merge = read_json(merged) if merged.exists() else {}
    dedup_file = run / "dedup" / "dedup_stats.json"
    dedup = read_json(dedup_file) if dedup_file.exists() else {}
    dedup_in = _value(dedup, "records_in") or _value(dedup, "records")
    dedup_out = _value(dedup, "records_out") or _value(dedup, "kept")
    if not dedup_out and dedup_in:
        dedup_out = dedup_in - _value(dedup, "dropped")
    one = {
        "caption": ("captioned/caption_stats.json", "records", "captioned"),
        "mask": ("masked/mask_stats.json", "records", "masked"),
        "export emu3": ("export/emu3/emu3_stats.json", "records", "exported"),
    }
    counts = {
        "prefilter": (
            _total(run, "url_lists/*_stats.json", "rows_in"),
            _total(run, "url_lists/*_stats.json", "rows_out"),
        ),
        "download": (_total(run, "downloads/*_stats.json", "count"), successes),
        "manifest": (successes, _total(run, "manifest/*_stats.json", "records")),
        "score": (
            _total(run, shards, "probe", "records_in"),
            _total(run, shards, "probe", "records_out"),
        ),
        "select": (_total(run, shards, "records_in"), _total(run, shards, "records_out")),
        "dedup": (dedup_in, dedup_out),
    }
    for name in TIER_FILES:
        counts[f"merge:{name}"] = (_value(merge, "records_in"), _value(merge, "records", name))
    for stage, (pattern, records_in, records_out) in one.items():
        counts[stage] = (_total(run, pattern, records_in), _total(run, pattern, records_out))
    masked = _total(run, "masked/mask_stats.json", "masked")
    for stage, (pattern, key) in {
        "export coco": ("export/coco/coco_stats.json", "images"),
        "export odvg": ("export/odvg/odvg_stats.json", "images"),
        "export webdataset": ("export/wds_stats.json", "samples"),
    }.items():
        if (run / pattern).exists():
            counts[stage] = (masked, _total(run, pattern, key))
    return counts


def _stand_ins(run: Path) -> dict[str, bool]:
    """Per stage, whether the run's figures come from stand-ins (random or placeholder models)."""

    def flag(path: str, key: str) -> bool:
        """Whether the stats file `path` of the run sets `key`."""
        stats = run / path
        return stats.exists() and bool(read_json(stats).get(key))

    models = (run / "models" / "stand_in" / "models.json").exists()
    captions = flag("captioned/caption_stats.json", "stand_in")
    return {
        "score": models,
        "select": models,
        "merge": models,
        **{f"merge:{name}": models for name in TIER_FILES},
        "caption": captions,
        "mask": flag("masked/mask_stats.json", "random_weights"),
        "export emu3": flag("export/emu3/emu3_stats.json", "stand_in_tokenizer"),
    }


def measure_run(run: str | os.PathLike) -> dict[str, dict]:
    """Per stage of an earlier run: start-up and seconds per record fitted to its benchmarked
    jobs, peak RSS, pass rate (out/in of its stats files), and whether stand-ins made them."""
    run = Path(run)
    counts = _pass_counts(run)
    stand_ins = _stand_ins(run)
    caption_stats = run / "captioned" / "caption_stats.json"
    served = caption_stats.exists() and read_json(caption_stats).get("rate_per_second", 0) is None
    found: dict[str, dict] = {}
    for stage in dict.fromkeys([*JOB_RECORDS, *counts]):
        entry: dict = {"stand_in": stand_ins.get(stage, False)}
        if stage in JOB_RECORDS:
            jobs, peak = _job_records(run, stage)
            fit = _fit(jobs)
            if fit is not None:
                entry.update(jobs=len(jobs), max_rss_mb=round(peak, 1) or None)
                entry.update(start_s=fit[0], per_record_s=fit[1])
        records_in, records_out = counts.get(stage, (0, 0))
        if records_in > 0:
            entry["pass"] = records_out / records_in
        if stage == "caption":
            entry["served"] = served
        if "pass" in entry or "per_record_s" in entry:
            found[stage] = entry
    return found


def default_run_dir(config: dict) -> Path | None:
    """The config's workdir when it holds benchmarks of an earlier run, else None."""
    workdir = Path(config.get("workdir") or "results")
    return workdir if (workdir / "benchmarks").is_dir() else None


# --- scheduling ------------------------------------------------------------------------


def wall_time(durations: list[float], slots: int | None) -> float:
    """Seconds until all jobs end, longest first onto the first free slot (None: all at once)."""
    if not durations:
        return 0.0
    if slots is None or slots >= len(durations):
        return max(durations)
    free = [0.0] * max(1, slots)
    for seconds in sorted(durations, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + seconds)
    return max(free)


def _cap(*limits: int | None) -> int | None:
    """The smallest of the limits that are set (None: unlimited)."""
    given = [limit for limit in limits if limit is not None]
    return max(1, min(given)) if given else None


def _split(records: int, size: int) -> list[int]:
    """Records per job when `records` are cut into jobs of `size`."""
    if records <= 0:
        return []
    full, rest = divmod(records, size)
    return [size] * full + ([rest] if rest else [])


class _Plan:
    """The rows of an estimate as they are worked out, with an earlier run's figures."""

    def __init__(
        self, measured: dict[str, dict], run: Path | None, jobs: int | None, gpus: int | None
    ) -> None:
        """Start an empty plan."""
        self.measured = measured
        self.run = run
        self.jobs = jobs
        self.gpus = gpus
        self.stages: list[dict] = []
        self.used: set[str] = set()

    def figure(self, stage: str, default: str) -> dict:
        """A stage's pass rate measured by an earlier run, else the assumption `default`."""
        entry = self.measured.get(stage) or {}
        if "pass" in entry:
            note = " (stand-ins: not representative)" if entry.get("stand_in") else ""
            return _figure(entry["pass"], "measured", f"{self.run}: {stage} stats files{note}")
        self.used.add(default)
        return assumed(default)

    def timing(
        self,
        stage: str,
        per_second: float,
        start: str | None,
        name: str,
        use_measured: bool = True,
    ) -> dict:
        """Start-up and seconds per record of a job: measured, else from the assumed rate."""
        entry = self.measured.get(stage) or {}
        if "per_record_s" in entry and use_measured:
            note = " (stand-ins: not representative)" if entry.get("stand_in") else ""
            return {
                "start_s": entry["start_s"],
                "per_record_s": entry["per_record_s"],
                "records_per_s": 1.0 / entry["per_record_s"],
                "basis": "measured",
                "source": f"{self.run}/benchmarks: {entry['jobs']} {stage} job(s){note}",
                "max_rss_mb": entry.get("max_rss_mb"),
            }
        self.used.add(name)
        start_s = 0.0
        if start is not None:
            self.used.add(start)
            start_s = ASSUMED[start]["value"]
        return {
            "start_s": start_s,
            "per_record_s": 1.0 / per_second,
            "records_per_s": per_second,
            "basis": "assumed",
            "source": f"{name}: {ASSUMED[name]['source']}",
        }

    def add(
        self,
        stage: str,
        records_in: int,
        passed: dict,
        sizes: list[int],
        timing: dict,
        slots: int | None,
        gpus_per_job: int = 0,
        durations: list[float] | None = None,
        **extra: object,
    ) -> dict:
        """One stage's row: jobs of `sizes` records each (or of `durations`), `slots` at once."""
        if durations is None:
            durations = [timing["start_s"] + n * timing["per_record_s"] for n in sizes]
        sizes = sizes or [0] * len(durations)
        at_once = _cap(slots, self.jobs, len(sizes) or 1)
        if gpus_per_job and self.gpus is not None:
            at_once = _cap(at_once, self.gpus // gpus_per_job)
        wall = wall_time(durations, at_once)
        row = {
            "stage": stage,
            "records_in": int(records_in),
            "records_out": int(round(records_in * passed["value"])),
            "pass_rate": passed,
            "jobs": len(sizes),
            "at_once": min(at_once or len(sizes), len(sizes)),
            "rate": {k: v for k, v in timing.items() if k != "max_rss_mb"},
            "wall_s": wall,
            "job_hours": sum(durations) / 3600,
            "gpu_hours": sum(durations) * gpus_per_job / 3600 if gpus_per_job else None,
            "max_rss_mb": timing.get("max_rss_mb"),
            "requests": None,
            "cost": None,
            "notes": [],
        }
        row.update(extra)
        self.stages.append(row)
        return row


def _by_source(total: int, shares: list[int], size: int) -> list[int]:
    """Records per job when `total` records, split between sources as `shares`, are cut into
    jobs of `size` per source (shards are per source)."""
    whole = sum(shares)
    if not whole:
        return []
    return [n for share in shares for n in _split(round(total * share / whole), size)]


def estimate(
    config: dict,
    run_dir: str | os.PathLike | None = None,
    *,
    measured: bool = True,
    jobs: int | None = None,
    gpus: int | None = None,
    sample_rows: int = SAMPLE_ROWS,
) -> dict:
    """Per stage: records in, expected out, jobs, wall time, API requests and cost, then totals.

    `run_dir`: an earlier run whose benchmarks and stats give measured rates (default: the
    config's workdir if it has benchmarks; `measured=False` uses none). `jobs`: jobs at once
    per stage (snakemake --jobs; None: every job of a stage at once), `gpus`: GPUs at once
    (None: as many as the jobs ask). Caption requests are one per deduplicated record: retries
    are not counted.
    """
    config = validate_config(copy.deepcopy(config), weights=())
    run = Path(run_dir) if run_dir is not None else default_run_dir(config)
    run = run if measured else None
    figures = measure_run(run) if run is not None and run.is_dir() else {}
    plan = _Plan(figures, run, jobs, gpus)
    sources = url_lists(config, sample_rows)
    filt, caption, mask, export = (
        config["filter"],
        config["caption"],
        config["mask"],
        config["export"],
    )
    notes: list[str] = []

    # prefilter: the URL lists' own metadata, one job per source
    rows = sum(s["rows"] for s in sources)
    to_download = sum(s["to_download"] for s in sources)
    sampled = sum(s["sampled_rows"] for s in sources)
    passed = _figure(
        to_download / rows if rows else 1.0,
        "metadata",
        f"URL-list footers (rows, URL nulls); WIDTH/HEIGHT of {sampled:,} sampled rows",
    )
    timing = plan.timing(
        "prefilter", ASSUMED["prefilter_rows_per_s"]["value"], None, "prefilter_rows_per_s"
    )
    plan.add("prefilter", rows, passed, [s["rows"] for s in sources if s["rows"]], timing, None)

    # download: one img2dataset job per source, processes_count processes each
    success = plan.figure("download", "download_success")
    per_process = ASSUMED["download_rows_per_s_per_process"]["value"]
    timings = [
        plan.timing(
            "download", per_process * s["processes"], None, "download_rows_per_s_per_process"
        )
        for s in sources
    ]
    durations = [
        t["start_s"] + s["to_download"] * t["per_record_s"]
        for s, t in zip(sources, timings, strict=True)
        if s["to_download"]
    ]
    row = plan.add(
        "download",
        to_download,
        success,
        [],
        timings[0] if timings else {},
        None,
        durations=durations,
    )
    row["notes"] += [
        f"{s['name']}: {s['to_download']:,} rows, {s['processes']} processes" for s in sources
    ]
    shares = [round(s["to_download"] * success["value"]) for s in sources]

    # manifest: one job per source
    timing = plan.timing(
        "manifest", ASSUMED["manifest_records_per_s"]["value"], None, "manifest_records_per_s"
    )
    records = plan.add(
        "manifest",
        row["records_out"],
        plan.figure("manifest", "manifest_pass"),
        [n for n in shares if n],
        timing,
        None,
    )["records_out"]

    # score: one job per shard (probe + data-juicer scores), filter.np threads, filter.gpus GPUs
    name = (
        "score_images_per_s_per_decode_thread_gpu"
        if filt["gpus"] > 0
        else "score_images_per_s_per_cpu_thread"
    )
    timing = plan.timing("score", ASSUMED[name]["value"] * filt["np"], "score_job_start_s", name)
    sizes = _by_source(records, shares, config["shard_size"])
    score = plan.add(
        "score",
        records,
        plan.figure("score", "probe_pass"),
        sizes,
        timing,
        None,
        filt["gpus"],
        threads=filt["np"],
    )

    # select: the thresholds, one local job per shard
    if "pass" in figures.get("select", {}):
        filter_pass = plan.figure("select", "filter_pass_aesthetics")
    else:
        aes, other = assumed("filter_pass_aesthetics"), assumed("filter_pass_other")
        plan.used.update({"filter_pass_aesthetics", "filter_pass_other"})
        filter_pass = _figure(
            aes["value"] * other["value"], "assumed", f"{aes['source']}; x {other['source']}"
        )
        if filt["aesthetics"]["min_score"] != 5:
            notes.append(
                f"filter_pass_aesthetics is LAION's share >= 5, filter.aesthetics."
                f"min_score is {filt['aesthetics']['min_score']}"
            )
    timing = plan.timing(
        "select", ASSUMED["select_records_per_s"]["value"], None, "select_records_per_s"
    )
    sizes = _by_source(score["records_out"], shares, config["shard_size"])
    kept = plan.add("select", score["records_out"], filter_pass, sizes, timing, None)

    # merge: the tiers; the caption input is one of them
    low, high = filt["aesthetics_tiers"]
    wanted = Path(caption["input"]).name
    if "pass" in figures.get(f"merge:{wanted}", {}):
        tier_pass = plan.figure(f"merge:{wanted}", "tier_high_of_low")
    elif wanted == TIER_FILES[1] and high > low:
        tier_pass = plan.figure("", "tier_high_of_low")
    else:
        tier_pass = _figure(1.0, "config", f"caption.input {caption['input']}: every kept record")
        if wanted != TIER_FILES[1] and low > filt["aesthetics"]["min_score"]:
            notes.append(
                f"tier {low} is above filter.aesthetics.min_score: fewer than counted "
                "reach the caption input"
            )
    timing = plan.timing(
        "merge", ASSUMED["merge_records_per_s"]["value"], None, "merge_records_per_s"
    )
    count = kept["records_out"]
    tiered = plan.add(
        "merge",
        count,
        tier_pass,
        [count] if count else [],
        timing,
        None,
        caption_input=caption["input"],
    )["records_out"]

    # dedup: before any paid request
    dedup = caption.get("dedup") or {}
    if dedup.get("enabled", True):
        dedup_pass = plan.figure("dedup", "dedup_drop")
        if dedup_pass["basis"] == "assumed":  # the assumption is the share dropped
            dedup_pass = {**dedup_pass, "value": 1 - dedup_pass["value"]}
        per_thread = ASSUMED["dedup_images_per_s_per_thread"]["value"]
        timing = plan.timing(
            "dedup", per_thread * dedup.get("threads", 1), None, "dedup_images_per_s_per_thread"
        )
    else:
        dedup_pass = _figure(1.0, "config", "caption.dedup.enabled: false")
        timing = _figure(None, "config", "caption.dedup.enabled: false")
        timing.update(start_s=0.0, per_record_s=0.0, records_per_s=None)
    deduped = plan.add("dedup", tiered, dedup_pass, [tiered] if tiered else [], timing, None)[
        "records_out"
    ]

    # caption: one request per deduplicated record, chunk_size records per job
    chunks = _split(deduped, caption["chunk_size"])
    caption_pass = plan.figure("caption", "caption_pass")
    serve = caption["serve"]
    if serve.get("command"):
        served = figures.get("caption", {}).get("served", False)
        timing = plan.timing(
            "caption",
            ASSUMED["serve_images_per_s"]["value"],
            "serve_start_s",
            "serve_images_per_s",
            use_measured=served,
        )
        row = plan.add(
            "caption",
            deduped,
            caption_pass,
            chunks,
            timing,
            serve["instances"],
            serve["gpus"],
            mode=f"{serve['instances']} server(s) of {serve['gpus']} "
            f"GPU(s) serving {caption['model']}",
        )
    else:
        row = plan.add(
            "caption",
            deduped,
            caption_pass,
            [],
            api_timing(caption, plan),
            None,
            durations=[deduped * api_timing(caption, plan)["per_record_s"]] if deduped else [],
            mode=f"API ({caption['backend']}, {caption['model']})",
        )
        row["jobs"] = len(chunks)
        row["at_once"] = min(caption["api_jobs"], len(chunks))
    price = caption.get("price_per_image")
    row["requests"] = deduped
    row["cost"] = None if price is None else deduped * price
    row["notes"].append("requests: one per deduplicated record; retries are not counted")
    captioned = row["records_out"]

    # mask: one job per caption chunk, mask.gpus GPUs each
    if mask["gpus"] > 0:
        per_second = ASSUMED["mask_images_per_s_per_gpu"]["value"] * mask["gpus"]
        name = "mask_images_per_s_per_gpu"
    else:
        per_second = ASSUMED["mask_images_per_s_per_cpu_thread"]["value"] * mask["decode_workers"]
        name = "mask_images_per_s_per_cpu_thread"
    timing = plan.timing("mask", per_second, None, name)
    share = captioned / deduped if deduped else 0.0
    sizes = [m for m in (round(n * share) for n in chunks) if m]
    row = plan.add(
        "mask",
        captioned,
        plan.figure("mask", "mask_pass"),
        sizes,
        timing,
        None,
        mask["gpus"],
        model=mask["model_config"],
    )
    if "hiera_l" not in mask["model_config"] and timing["basis"] == "assumed":
        row["notes"].append("the assumed rate is hiera-large's; smaller models run faster")
    masked = row["records_out"]

    # exports of the masked records
    every = _figure(1.0, "config", "every masked record")
    if "emu3" in export["formats"]:
        emu3 = export["emu3"]
        key = "emu3_images_per_s_per_gpu" if emu3["tokenize"] else "emu3_prompts_per_s"
        timing = plan.timing("export emu3", ASSUMED[key]["value"], None, key)
        measured_pass = "pass" in figures.get("export emu3", {})
        plan.add(
            "export emu3",
            masked,
            plan.figure("export emu3", "") if measured_pass else every,
            _split(masked, math.ceil(masked / emu3["parts"]) or 1),
            timing,
            None,
            emu3["gpus"] if emu3["tokenize"] else 0,
        )
    for fmt, key in (
        ("coco", "export_records_per_s"),
        ("odvg", "export_records_per_s"),
        ("webdataset", "webdataset_images_per_s"),
    ):
        if fmt in export["formats"]:
            name = f"export {fmt}"
            timing = plan.timing(name, ASSUMED[key]["value"], None, key)
            passed = plan.figure(name, "") if "pass" in figures.get(name, {}) else every
            plan.add(name, masked, passed, [masked] if masked else [], timing, None)

    stages = plan.stages
    costs = [s["cost"] for s in stages if s["cost"] is not None]
    total = {
        "wall_s": sum(s["wall_s"] for s in stages),
        "job_hours": sum(s["job_hours"] for s in stages),
        "gpu_hours": sum(s["gpu_hours"] or 0.0 for s in stages),
        "requests": sum(s["requests"] or 0 for s in stages),
        "cost": sum(costs) if costs else None,
        "records_out": masked,
    }
    notes.append(
        "total wall time: the stages one after another (an upper bound: Snakemake "
        "overlaps shards and chunks of different stages)"
    )
    if caption.get("price_per_image") is None:
        notes.append("cost: caption.price_per_image is not set")
    return {
        "sources": sources,
        "stages": stages,
        "total": total,
        "run_dir": str(run) if run is not None else None,
        "parallel": {"jobs": jobs, "gpus": gpus},
        "assumptions": {name: ASSUMED[name] for name in sorted(plan.used)},
        "notes": notes,
    }


def api_timing(caption: dict, plan: _Plan) -> dict:
    """Seconds per caption request against an API: the quota (less its headroom), unless the
    jobs' requests in flight cannot fill it (api_jobs x concurrency / answer latency)."""
    latency = ASSUMED["caption_answer_latency_s"]["value"]
    in_flight = caption["api_jobs"] * caption["concurrency"] / latency
    quota = caption["rate_per_second"]
    paced = None if quota is None else quota * (1 - caption["rate_headroom"])
    if paced is not None and paced <= in_flight:
        source = (
            f"caption.rate_per_second {quota} x (1 - rate_headroom {caption['rate_headroom']}), "
            f"shared by {caption['api_jobs']} job(s)"
        )
        return {
            "start_s": 0.0,
            "per_record_s": 1 / paced,
            "records_per_s": paced,
            "basis": "config",
            "source": source,
        }
    plan.used.add("caption_answer_latency_s")
    source = (
        f"caption.api_jobs {caption['api_jobs']} x concurrency {caption['concurrency']} "
        f"/ caption_answer_latency_s {latency} s"
    )
    return {
        "start_s": 0.0,
        "per_record_s": 1 / in_flight,
        "records_per_s": in_flight,
        "basis": "assumed",
        "source": source,
    }


# --- text ------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """Seconds as a short duration: 45s, 12m 5s, 3h 20m, 4d 7h."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _basis(figure: dict | None) -> str:
    """A figure's basis as the table shows it."""
    return "-" if not figure else str(figure.get("basis"))


def format_estimate(result: dict) -> str:
    """A readable table of `estimate`'s result: sources, stages, totals, what was assumed."""
    lines = []
    head = f"{'source':<28} {'files':>5} {'rows':>14} {'to download':>14} {'prefilter pass':>15}"
    lines += [head, "-" * len(head)]
    for source in result["sources"]:
        lines.append(
            f"{source['name']:<28} {source['files']:>5} {source['rows']:>14,} "
            f"{source['to_download']:>14,} {source['pass']:>15.3f}"
        )
        if source.get("error"):
            lines.append(f"  error: {source['error']}")
    lines.append("")
    head = (
        f"{'stage':<18} {'in':>13} {'out':>13} {'pass':>6} {'(basis)':<9} {'jobs':>6} "
        f"{'at once':>7} {'wall':>9} {'rate (basis)':<22} {'requests':>10} {'cost':>10}"
    )
    lines += [head, "-" * len(head)]
    for stage in result["stages"]:
        rate = stage["rate"].get("records_per_s")
        shown = "-" if rate is None else f"{rate:,.3g}/s"
        cost = "-" if stage["cost"] is None else f"{stage['cost']:,.2f}"
        requests = "-" if stage["requests"] is None else f"{stage['requests']:,}"
        lines.append(
            f"{stage['stage']:<18} {stage['records_in']:>13,} {stage['records_out']:>13,} "
            f"{stage['pass_rate']['value']:>6.3f} {_basis(stage['pass_rate']):<9} "
            f"{stage['jobs']:>6} {stage['at_once']:>7} {duration(stage['wall_s']):>9} "
            f"{shown + ' (' + _basis(stage['rate']) + ')':<22} {requests:>10} {cost:>10}"
        )
    total = result["total"]
    cost = "-" if total["cost"] is None else f"{total['cost']:,.2f}"
    lines.append("-" * len(head))
    lines.append(
        f"{'total':<18} {'':>13} {total['records_out']:>13,} {'':>6} {'':<9} {'':>6} {'':>7} "
        f"{duration(total['wall_s']):>9} {'':<22} {total['requests']:>10,} {cost:>10}"
    )
    lines.append(
        f"job time {total['job_hours']:,.1f} h, GPU time {total['gpu_hours']:,.1f} h; "
        f"parallel: jobs {result['parallel']['jobs'] or 'all'}, "
        f"GPUs {result['parallel']['gpus'] or 'as asked'}; measured from: "
        f"{result['run_dir'] or 'no earlier run'}"
    )
    for stage in result["stages"]:
        for note in [stage.get("mode"), *(stage.get("notes") or [])]:
            if note:
                lines.append(f"  {stage['stage']}: {note}")
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result["assumptions"]:
        lines += ["", "assumed figures (ASSUMED in groundset/estimate.py):"]
        for name, entry in result["assumptions"].items():
            lines.append(f"  {name} = {entry['value']:,} {entry['unit']}")
            lines.append(f"      {entry['source']}")
    measured = [
        f"  {stage['stage']} {what}: {figure['source']}"
        for stage in result["stages"]
        for what, figure in (("rate", stage["rate"]), ("pass rate", stage["pass_rate"]))
        if figure.get("basis") == "measured"
    ]
    if measured:
        lines += ["", "measured figures:", *measured]
    return "\n".join(lines)
