"""Estimate a run before it starts: per stage records in and out, jobs, wall time, requests, cost.

Counts come from the URL lists themselves: rows from the parquet footers (no data read), the
pre-download filter's pass rate from the WIDTH/HEIGHT (and punsafe/pwatermark) columns of a
sample of row groups spread over the files, run through the prefilter's own rules. Everything
later is a pass rate times what reached the stage, and a time per job from a rate: measured
where an earlier run left Snakemake benchmarks (`benchmarks/**/*.tsv`), stats files and
Snakemake's records of its jobs (`.snakemake/metadata`), else the documented assumption of
ASSUMED. The wall time simulates Snakemake's local scheduler over every job of the DAG, with
the threads and resources their rules declare, on the cores and global resources of the local
profile. Every figure carries its `basis` (metadata, config, measured or assumed) and where it
comes from.
"""

from __future__ import annotations

import base64
import copy
import csv
import heapq
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from groundset.core import layout
from groundset.core.config import download_options, section_defaults, validate_config
from groundset.core.io import read_json
from groundset.core.stats import read_stats
from groundset.stages.merge import TIER_FILES
from groundset.stages.parts import plan_parts
from groundset.stages.prefilter import (
    PrefilterRules,
    check_file,
    filter_table,
    list_parquet_files,
    open_parquet,
)
from groundset.tools.summary import stage_totals

# Rates and pass rates used where no earlier run measured them, each with where it comes from
# (assumed.yaml beside this module); `--from-run DIR` replaces them by a run's own figures.
ASSUMED: dict[str, dict] = yaml.safe_load(Path(__file__).with_name("assumed.yaml").read_text())
SAMPLE_ROWS = 1_000_000  # URL-list rows read (two columns) for the prefilter's pass rate
BATCH_ROWS = section_defaults("download.prefilter")["batch_rows"]  # rows per parquet batch


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


def _prefilter_columns(path: Path, rules: PrefilterRules) -> list[str]:
    """The size and safety columns the prefilter reads that a URL-list file has."""
    with open_parquet(path) as parquet:
        names = parquet.schema_arrow.names
    wanted = ["WIDTH", "width", "HEIGHT", "height"] if rules.size_filter else []
    ceilings = (("punsafe", rules.max_punsafe), ("pwatermark", rules.max_pwatermark))
    wanted += [column for column, limit in ceilings if limit is not None]
    return [c for c in wanted if c in names]


def _sampled_drops(groups: list, columns: list[str], rules: PrefilterRules, budget: int
                   ) -> tuple[int, Counter]:  # fmt: skip
    """Rows sampled from the row groups and the prefilter's drops among them, by reason."""
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
                counts.update(filter_table(table, rules)[2])
                seen += table.num_rows
    return seen, counts


def prefilter_pass(
    files: list[Path], rules: PrefilterRules, budget: int = SAMPLE_ROWS
) -> dict[str, object]:
    """Rows, URL nulls and the prefilter's pass rate of a URL list: counts from the footers, the
    rate from the size (and safety) columns of sampled row groups, in batches."""
    groups, rows, nulls = _row_groups(files, rules.url_col)
    out = {"rows": rows, "null_urls": nulls, "sampled_rows": 0, "pass": 1.0, "dropped": {}}
    columns = _prefilter_columns(groups[0][0], rules) if groups else []
    if not columns:
        return out
    seen, counts = _sampled_drops(groups, columns, rules, budget)
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
            "parts": [],
        }
        try:
            files = list_parquet_files(source["url_list"])
            rules = PrefilterRules.from_config(config, opts)
            for path in files:  # what would stop the run (a missing column) stops the count
                check_file(path, rules, source["save_additional_columns"])
            entry.update(files=len(files), **prefilter_pass(files, rules, budget))
            entry["parts"] = [
                part.rows for part in plan_parts(source["url_list"], opts["part_rows"])
            ]
        except (OSError, ValueError) as error:
            entry["error"] = str(error)
        entry["to_download"] = round(max(0, entry["rows"] - entry["null_urls"]) * entry["pass"])
        found.append(entry)
    return found


# --- an earlier run's figures ----------------------------------------------------------


def read_benchmark(path: Path) -> dict | None:
    """Seconds, peak RSS (MB) and CPU seconds of one Snakemake benchmark file (its rows' mean)."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except OSError:
        return None
    values = [
        (float(r["s"]), float(r.get("max_rss") or 0), float(r.get("cpu_time") or 0))
        for r in rows
        if r.get("s")
    ]
    values = [v for v in values if math.isfinite(v[0])]
    if not values:
        return None
    return {
        "s": sum(v[0] for v in values) / len(values),
        "max_rss": max(v[1] for v in values),
        "cpu_time": sum(v[2] for v in values) / len(values),
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


# Per stage: the layout stage whose rule's benchmarks (named by the job's wildcards) time its
# jobs, and the key of its stats that counts each job's records.
JOB_RECORDS = {
    "prefilter": (layout.PREFILTER, "records_in"),
    "download": (layout.DOWNLOAD, "records_in"),
    "manifest": (layout.MANIFEST, "records_in"),
    "score": (layout.SCORE, "records_in"),
    "merge": (layout.MERGE, "records_in"),
    "dedup": (layout.DEDUP, "records_in"),
    "caption": (layout.CAPTION_CHUNK, "requested"),
    "mask": (layout.MASK_CHUNK, "computed"),
    "export emu3": (layout.EMU3_PART, "tokenized"),
    "export coco": (layout.COCO, "records_out"),
    "export odvg": (layout.ODVG, "records_out"),
    "export webdataset": (layout.WEBDATASET, "records_out"),
}


def _job_records(run: Path, stage: str) -> tuple[list[tuple[float, float]], float, float]:
    """(records, seconds) of each benchmarked job of a stage, the peak RSS (MB) and the CPU
    seconds of those jobs."""
    kind, key = JOB_RECORDS[stage]
    folder = run / "benchmarks"
    paths = sorted((folder / kind.rule).rglob("*.tsv")) or sorted(folder.glob(f"{kind.rule}.tsv"))
    jobs, peak, cpu = [], 0.0, 0.0
    for path in paths:
        timing = read_benchmark(path)
        # the job's wildcards: benchmarks/<rule>/<source>[/<download part>]/<job>.tsv
        names = dict.fromkeys(("shard", "chunk", "part", "download_part"), path.stem)
        names["source"] = path.parent.name
        if kind.per == "shard":
            names.update(source=path.parent.parent.name, download_part=path.parent.name)
        stats_path = run / kind.path("stats", **names)
        records = read_stats(stats_path).get(key, 0) if stats_path.exists() else 0
        if timing is not None and records:
            jobs.append((float(records), timing["s"]))
            peak = max(peak, timing["max_rss"])
            cpu += timing["cpu_time"]
    return jobs, peak, cpu


def _pass_counts(run: Path) -> dict[str, tuple[float, float, bool]]:
    """(records in, records out, stand-in) per stage of a run, its stats envelopes summed (the
    merge once per tier, the exports as `export <format>`); select and merge inherit the stand-in
    filter models of the scores they read."""
    stages = [(stage.name, stage) for stage in layout.STAGES]
    stages += [(f"export {fmt}", stage) for fmt, stage in layout.EXPORTS.items()]
    models = (run / layout.STAND_IN_MODELS).exists()
    counts = {}
    for name, stage in stages:
        totals = stage_totals(run, stage)
        if totals is None:
            continue
        total = totals[0]
        stand_in = total["stand_in"] or (models and name in ("select", "merge"))
        counts[name] = (total["records_in"], total["records_out"], stand_in)
        for tier in TIER_FILES if name == "merge" else ():  # the merge's pass is its tiers'
            counts[f"merge:{tier}"] = (
                total["records_in"],
                total["per_tier"].get(tier, 0),
                stand_in,
            )
    return counts


def measure_run(run: str | os.PathLike) -> dict[str, dict]:
    """Per stage of an earlier run: start-up and seconds per record fitted to its benchmarked
    jobs, their mean size, time and CPU load (CPU s / s), peak RSS, pass rate (out/in of its
    stats files), and whether stand-ins made them."""
    run = Path(run)
    counts = _pass_counts(run)
    caption_stats = run / layout.CAPTION.stats
    served = caption_stats.exists() and read_json(caption_stats).get("rate_per_second", 0) is None
    found: dict[str, dict] = {}
    for stage in dict.fromkeys([*JOB_RECORDS, *counts]):
        records_in, records_out, stand_in = counts.get(stage, (0, 0, False))
        entry: dict = {"stand_in": stand_in}
        if stage in JOB_RECORDS:
            jobs, peak, cpu = _job_records(run, stage)
            fit = _fit(jobs)
            if fit is not None:
                seconds = sum(s for _, s in jobs)
                entry.update(jobs=len(jobs), max_rss_mb=round(peak, 1) or None)
                entry.update(start_s=fit[0], per_record_s=fit[1], cpu_load=cpu / seconds)
                entry.update(
                    mean_s=seconds / len(jobs), mean_records=sum(n for n, _ in jobs) / len(jobs)
                )
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


def recorded_jobs(run: Path) -> list[dict]:
    """Each job Snakemake recorded in a run's `.snakemake/metadata`: its rule, start and end
    (epoch s), and `ready`, when the last of its inputs was written (None: none recorded)."""
    folder = run / ".snakemake" / "metadata"
    paths = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
    jobs: dict[tuple, dict] = {}
    ends: dict[str, float] = {}
    for path in paths:
        name = "".join(part.lstrip("@") for part in path.relative_to(folder).parts)
        try:
            meta = read_json(path)
            output = base64.urlsafe_b64decode(name).decode()
            start, end = float(meta["starttime"]), float(meta["endtime"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        ends[output] = end
        job = jobs.setdefault(
            (meta.get("rule"), meta.get("job_hash")),
            {"rule": meta.get("rule"), "start": start, "end": end, "input": meta.get("input")},
        )
        job["start"], job["end"] = min(job["start"], start), max(job["end"], end)
    for job in jobs.values():
        before = [ends[p] for p in job.pop("input") or [] if p in ends]
        job["ready"] = max(before) if before else None
    return sorted(jobs.values(), key=lambda job: job["start"])


def rule_seconds(jobs: list[dict]) -> dict[str, float]:
    """Seconds per job of each rule of recorded jobs: the mean of their records; for jobs
    recorded as ending where they began (a `run:` job's record starts in its subprocess),
    the shortest time from a job's last input to its end."""
    recorded: dict[str, list[float]] = {}
    implied: dict[str, list[float]] = {}
    for job in jobs:
        took = job["end"] - job["start"]
        if took >= 0.05:
            recorded.setdefault(job["rule"], []).append(took)
        elif job["ready"] is not None:
            implied.setdefault(job["rule"], []).append(max(0.0, job["end"] - job["ready"]))
    found = {rule: min(values) for rule, values in implied.items()}
    found.update({rule: sum(values) / len(values) for rule, values in recorded.items()})
    return found


def recorded_wall(jobs: list[dict]) -> float | None:
    """Seconds from the first recorded job's start to the last one's end (None: no jobs)."""
    if not jobs:
        return None
    return max(job["end"] for job in jobs) - min(job["start"] for job in jobs)


# --- Snakemake's scheduling ------------------------------------------------------------

# The global resources of profiles/local/config.yaml (`resources:`); vlm_api and vlm_server come
# from the config as common.smk sets them, the cores from --cores (the local profile: all).
LOCAL_RESOURCES: dict[str, int | None] = {"mem_mb": 16000, "gpu": 1}
# mem_mb of the light rules (workflow/rules/*.smk; one thread each) and what the workflow
# profile (profiles/default: set-resources) asks of the heavy ones.
LIGHT_MEM_MB = {
    "build_stand_in_models": 2000,
    "caption_preflight": 500,
    "plan_parts": 500,
    "prefilter_urls": 2000,
    "build_manifest": 1000,
    "index_shards": 500,
    "select_shard": 500,
    "merge_tiers": 1000,
    "index_chunks": 500,
    "gather_captions": 500,
    "gather_masks": 500,
    "gather_emu3": 500,
    "export_odvg": 1000,
    "entity_stats": 1000,
    "draw_sample": 2000,
    "validate_outputs": 1000,
    "stage_counts": 500,
}
PROFILE_MEM_MB = {"score_shard": 32000, "mask_chunk": 32000, "emu3_part": 32000}
# What each rule's jobs wait for (their inputs in workflow/rules/*.smk): (rule, n) waits for
# that rule's jobs whose key is the first n parts of its own ((source, part), (source, part,
# shard), (chunk,)), n = 0 for all of them. In the order the scheduler prefers ready jobs: the DAG's,
# but the rules without inputs last (Snakemake prefers jobs with bigger inputs).
AFTER: dict[str, tuple[tuple[str, int], ...]] = {
    "prefilter_urls": (),
    "download_part": (("prefilter_urls", 2),),
    "build_manifest": (("download_part", 2),),
    "index_shards": (("build_manifest", 2),),
    "score_shard": (("index_shards", 2), ("build_stand_in_models", 0)),
    "select_shard": (("score_shard", 3),),
    "merge_tiers": (("select_shard", 0), ("plan_parts", 0)),
    "dedup_records": (("merge_tiers", 0),),
    "index_chunks": (("dedup_records", 0), ("caption_preflight", 0)),
    "caption_chunk": (("index_chunks", 0),),
    "mask_chunk": (("caption_chunk", 1),),
    "gather_captions": (("caption_chunk", 0), ("index_chunks", 0)),
    "gather_masks": (("mask_chunk", 0), ("index_chunks", 0)),
    "emu3_part": (("gather_masks", 0),),
    "gather_emu3": (("emu3_part", 0),),
    "export_coco": (("gather_masks", 0),),
    "export_odvg": (("gather_masks", 0),),
    "export_wds": (("gather_masks", 0),),
    "entity_stats": (("gather_masks", 0),),
    "draw_sample": (("gather_masks", 0),),
    "validate_outputs": tuple(
        (rule, 0)
        for rule in (
            "build_manifest",
            "merge_tiers",
            "dedup_records",
            "gather_captions",
            "gather_masks",
            "gather_emu3",
            "export_coco",
            "export_odvg",
            "export_wds",
        )
    ),
    "stage_counts": (("validate_outputs", 0), ("gather_emu3", 0), ("entity_stats", 0)),
    "build_stand_in_models": (),
    "caption_preflight": (),
    "plan_parts": (),
}
# The bookkeeping rules between the stages: no stage row of their own, one job each (or one per
# job of the rule named), the ASSUMED figure for their time where no run measured it.
OTHER_RULES: dict[str, tuple[str | None, str]] = {
    "build_stand_in_models": (None, "stand_in_models_s"),
    "caption_preflight": (None, "bookkeeping_job_s"),
    "index_shards": ("build_manifest", "bookkeeping_job_s"),
    "plan_parts": (None, "bookkeeping_job_s"),
    "index_chunks": (None, "bookkeeping_job_s"),
    "gather_captions": (None, "bookkeeping_job_s"),
    "gather_masks": (None, "bookkeeping_job_s"),
    "gather_emu3": ("emu3_part", "bookkeeping_job_s"),
    "entity_stats": (None, "bookkeeping_job_s"),
    "draw_sample": (None, "bookkeeping_job_s"),
    "validate_outputs": (None, "bookkeeping_job_s"),
    "stage_counts": (None, "bookkeeping_job_s"),
}


def rule_needs(config: dict) -> dict[str, tuple[int, dict[str, int]]]:
    """Threads and resources of each rule's jobs for this config, as workflow/rules/*.smk and
    the workflow profile (profiles/default) declare them."""
    filt, caption, mask = config["filter"], config["caption"], config["mask"]
    serve, emu3 = caption["serve"], config["export"]["emu3"]
    needs = {rule: (1, {"mem_mb": mem}) for rule, mem in LIGHT_MEM_MB.items()}
    # threads: each source's processes_count; download.max_parallel parts at once
    needs["download_part"] = (1, {"mem_mb": 8000, "download_parts": 1})
    needs["score_shard"] = (filt["np"], {"mem_mb": 16000, "gpu": filt["gpus"]})
    needs["dedup_records"] = ((caption.get("dedup") or {}).get("threads", 1), {"mem_mb": 4000})
    if serve.get("command"):
        served = {"mem_mb": serve["mem_mb"], "vlm_server": 1, "gpu": serve["gpus"]}
        needs["caption_chunk"] = (serve["cpus"], served)
    else:
        needs["caption_chunk"] = (1, {"mem_mb": 2000, "vlm_api": 1})
    needs["mask_chunk"] = (mask["decode_workers"], {"mem_mb": 16000, "gpu": mask["gpus"]})
    gpus = emu3["gpus"] if emu3["tokenize"] else 0
    needs["emu3_part"] = (emu3["decode_workers"], {"mem_mb": 16000, "gpu": gpus})
    needs["export_coco"] = needs["export_wds"] = (2, {"mem_mb": 2000})
    for rule, mem in PROFILE_MEM_MB.items():
        needs[rule][1]["mem_mb"] = mem
    return needs


@dataclass
class Job:
    """One job of a simulated run: its rule, start-up and work seconds, what it holds, and the
    jobs (their indices) it waits for."""

    rule: str
    start_s: float
    work_s: float = 0.0
    threads: int = 1
    resources: dict[str, int] = field(default_factory=dict)
    after: tuple[int, ...] = ()
    parallel: float = 1.0  # cores its work keeps busy with all its threads

    def seconds(self, threads: int) -> float:
        """Its run time with `threads` threads granted: fewer than its work uses slow it down."""
        busy = min(self.parallel, self.threads)
        return self.start_s + self.work_s * max(1.0, busy / max(1, threads))


def holds(job: Job, cores: int, limits: dict[str, int | None]) -> tuple:
    """(threads, resources) a job holds while it runs: threads scaled down to the cores and
    resources capped at what is there, as Snakemake does; unlimited resources are not held."""
    held = tuple(
        sorted(
            (name, min(amount, limit))
            for name, amount in job.resources.items()
            if amount > 0 and (limit := limits.get(name)) is not None
        )
    )
    return min(max(1, job.threads), cores), held


class _Scheduler:
    """Snakemake's local scheduling, simulated: a job starts as soon as the jobs it waits for
    have ended and its threads and resources are free, the earliest planned first."""

    def __init__(
        self, jobs: list[Job], cores: int, limits: dict[str, int | None], max_jobs: int | None
    ) -> None:
        """Jobs, the cores and resources there are, and the most jobs at once (None: any)."""
        self.jobs, self.cores, self.limits, self.max_jobs = jobs, cores, limits, max_jobs
        self.free = {"cores": cores, **{k: v for k, v in limits.items() if v is not None}}
        self.children: list[list[int]] = [[] for _ in jobs]
        self.waiting = [len(set(job.after)) for job in jobs]
        for index, job in enumerate(jobs):
            for parent in set(job.after):
                self.children[parent].append(index)
        self.ready: dict[tuple, list[int]] = {}  # by what the jobs hold: their indices, a heap
        self.running: list[tuple[float, int]] = []
        self.spans = [(0.0, 0.0)] * len(jobs)
        self.now = 0.0
        for index, waits in enumerate(self.waiting):
            if not waits:
                self._ready(index)

    def _ready(self, index: int) -> None:
        """Queue a job whose inputs are there."""
        key = holds(self.jobs[index], self.cores, self.limits)
        heapq.heappush(self.ready.setdefault(key, []), index)

    def _fits(self, key: tuple) -> bool:
        """Whether a job holding `key` can start now."""
        threads, held = key
        if self.max_jobs is not None and len(self.running) >= self.max_jobs:
            return False
        return threads <= self.free["cores"] and all(self.free[n] >= a for n, a in held)

    def _start_ready(self) -> None:
        """Start queued jobs, the earliest planned that fits first, until none fits."""
        while True:
            for key in sorted(self.ready, key=lambda k: self.ready[k][0]):
                if self._fits(key):
                    break
            else:
                return
            index = heapq.heappop(self.ready[key])
            if not self.ready[key]:
                del self.ready[key]
            self._take(key, -1)
            end = self.now + self.jobs[index].seconds(key[0])
            self.spans[index] = (self.now, end)
            heapq.heappush(self.running, (end, index))

    def _take(self, key: tuple, sign: int) -> None:
        """Take (-1) or give back (+1) what a job holds."""
        threads, held = key
        self.free["cores"] += sign * threads
        for name, amount in held:
            self.free[name] += sign * amount

    def run(self) -> list[tuple[float, float]]:
        """(start, end) of every job."""
        while self.ready or self.running:
            self._start_ready()
            if not self.running:
                raise ValueError("jobs wait for each other or need more than there is")
            self.now, index = heapq.heappop(self.running)
            self._take(holds(self.jobs[index], self.cores, self.limits), +1)
            for child in self.children[index]:
                self.waiting[child] -= 1
                if not self.waiting[child]:
                    self._ready(child)
        return self.spans


def schedule(
    jobs: list[Job],
    cores: int,
    limits: dict[str, int | None] | None = None,
    max_jobs: int | None = None,
) -> list[tuple[float, float]]:
    """(start, end) of each job when Snakemake runs them on `cores` with the global resources
    `limits` (None: unlimited) and at most `max_jobs` at once (--jobs; None: no limit)."""
    return _Scheduler(jobs, max(1, cores), limits or {}, max_jobs).run()


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of these (start, end) spans that overlap at one time."""
    events = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return max(most, 1) if spans else 0


def _split(records: int, size: int) -> list[int]:
    """Records per job when `records` are cut into jobs of `size`."""
    if records <= 0:
        return []
    full, rest = divmod(records, size)
    return [size] * full + ([rest] if rest else [])


class _Plan:
    """The rows and jobs of an estimate as they are worked out, with an earlier run's figures."""

    def __init__(
        self, config: dict, measured: dict[str, dict], run: Path | None, rule_s: dict[str, float]
    ) -> None:
        """Start an empty plan (`rule_s`: seconds per job of each rule the run recorded)."""
        self.measured = measured
        self.run = run
        self.rule_s = rule_s
        self.needs = rule_needs(config)
        self.stages: list[dict] = []
        self.used: set[str] = set()
        self.planned: list[tuple[Job, tuple, dict | None]] = []  # job, key, its stage's row

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
        threads: int = 1,
    ) -> dict:
        """Start-up and seconds per record of a job: measured, else from the assumed rate (of
        `threads` threads: fewer granted slow it down)."""
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
                "parallel": entry.get("cpu_load") or 1.0,
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
            "parallel": float(threads),
        }

    def job_seconds(self, rule: str, name: str) -> float:
        """Seconds of one job of `rule`: the run's Snakemake records, else ASSUMED[name]."""
        if rule in self.rule_s:
            return self.rule_s[rule]
        self.used.add(name)
        return ASSUMED[name]["value"]

    def add(
        self,
        stage: str,
        records_in: int,
        passed: dict,
        sizes: list[int],
        timing: dict,
        rule: str,
        keys: list[tuple] | None = None,
        durations: list[float] | None = None,
        threads: list[int] | None = None,
        **extra: object,
    ) -> dict:
        """One stage's row and its jobs of `rule`, of `sizes` records each (or of `durations`),
        one per key of `keys` (default: their number), `threads` each (default: the rule's)."""
        if durations is None:
            durations = [timing["start_s"] + n * timing["per_record_s"] for n in sizes]
        keys = [(i,) for i in range(len(durations))] if keys is None else keys
        declared, resources = self.needs[rule]
        threads = threads or [declared] * len(durations)
        row = {
            "stage": stage,
            "records_in": int(records_in),
            "records_out": int(round(records_in * passed["value"])),
            "pass_rate": passed,
            "jobs": len(durations),
            "at_once": 0,
            "threads": max(threads, default=declared),
            "rate": {k: v for k, v in timing.items() if k != "max_rss_mb"},
            "wall_s": 0.0,
            "job_hours": 0.0,
            "gpu_hours": None,
            "max_rss_mb": timing.get("max_rss_mb"),
            "requests": None,
            "cost": None,
            "notes": [],
        }
        row.update(extra)
        self.stages.append(row)
        start, parallel = timing["start_s"], timing.get("parallel", 1.0)
        for key, seconds, n in zip(keys, durations, threads, strict=True):
            work = max(0.0, seconds - start)
            job = Job(rule, seconds - work, work, n, dict(resources), parallel=parallel)
            self.planned.append((job, key, row))
        return row

    def _add_other(self, config: dict) -> None:
        """The bookkeeping jobs (OTHER_RULES): one each, or one per job of the rule named."""
        keys_of: dict[str, list[tuple]] = {}
        for job, key, _ in self.planned:
            keys_of.setdefault(job.rule, []).append(key)
        for rule, (per, name) in OTHER_RULES.items():
            if rule == "build_stand_in_models" and not config["filter"]["stand_in_models"]:
                continue
            keys = keys_of.get(per, []) if per else [()]
            threads, resources = self.needs[rule]
            for key in keys:
                job = Job(rule, self.job_seconds(rule, name), 0.0, threads, dict(resources))
                self.planned.append((job, key, None))

    def _link(self) -> list[Job]:
        """The jobs in the DAG's order, each waiting for the jobs its rule's inputs come from."""
        order = {rule: i for i, rule in enumerate(AFTER)}
        self.planned.sort(key=lambda planned: order[planned[0].rule])
        by_prefix: dict[tuple[str, tuple], list[int]] = {}
        for index, (job, key, _) in enumerate(self.planned):
            for depth in range(len(key) + 1):
                by_prefix.setdefault((job.rule, key[:depth]), []).append(index)
        for job, key, _ in self.planned:
            job.after = tuple(
                index
                for rule, depth in AFTER[job.rule]
                for index in by_prefix.get((rule, key[:depth]), [])
            )
        return [job for job, _, _ in self.planned]

    def finish(
        self, config: dict, cores: int, limits: dict[str, int | None], max_jobs: int | None
    ) -> dict:
        """Simulate the run: each row's wall time (its first job's start to its last's end),
        jobs at once, job and GPU hours; the whole schedule's summary."""
        self._add_other(config)
        jobs = self._link()
        spans = schedule(jobs, cores, limits, max_jobs)
        for row in self.stages:
            mine = [i for i, (_, _, owner) in enumerate(self.planned) if owner is row]
            _fill(row, [jobs[i] for i in mine], [spans[i] for i in mine])
        other = [
            (job, span) for job, span in zip(jobs, spans, strict=True) if job.rule in OTHER_RULES
        ]
        return {
            "cores": cores,
            "resources": limits,
            "max_jobs": max_jobs,
            "jobs": len(jobs),
            "makespan_s": max((end for _, end in spans), default=0.0),
            "other_jobs": dict(Counter(job.rule for job, _ in other)),
            "other_job_s": sum(end - start for _, (start, end) in other),
        }


def _fill(row: dict, jobs: list[Job], spans: list[tuple[float, float]]) -> None:
    """A stage row's first start and last end in the simulated run, its wall time (their
    difference), jobs at once, job and GPU hours, from its jobs' spans."""
    if not spans:
        return
    took = [end - start for start, end in spans]
    row["start_s"] = min(start for start, _ in spans)
    row["end_s"] = max(end for _, end in spans)
    row["wall_s"] = row["end_s"] - row["start_s"]
    row["at_once"] = most_at_once(spans)
    row["job_hours"] = sum(took) / 3600
    gpus = [job.resources.get("gpu", 0) for job in jobs]
    if any(gpus):
        row["gpu_hours"] = sum(t * g for t, g in zip(took, gpus, strict=True)) / 3600


Shares = list[tuple[tuple[int, int], int]]  # ((source, part), records) of each download part


def _shards(total: int, shares: Shares, size: int) -> list[tuple[tuple[int, int, int], int]]:
    """((source, part, shard), records) of each job when `total` records, split between the
    download parts as `shares`, are cut into jobs of `size` per part (shards are per part)."""
    whole = sum(n for _, n in shares)
    if not whole:
        return []
    return [
        ((*key, shard), n)
        for key, share in shares
        for shard, n in enumerate(_split(round(total * share / whole), size))
    ]


def estimate(
    config: dict,
    run_dir: str | os.PathLike | None = None,
    *,
    measured: bool = True,
    jobs: int | None = None,
    gpus: int | None = None,
    cores: int | None = None,
    resources: dict[str, int | None] | None = None,
    sample_rows: int = SAMPLE_ROWS,
) -> dict:
    """Per stage: records in, expected out, jobs, wall time, API requests and cost, then totals.

    `run_dir`: an earlier run whose benchmarks, stats and Snakemake records give measured rates
    and job times (default: the config's workdir if it has benchmarks; `measured=False` uses
    none). The run is simulated as Snakemake's local scheduler runs it: on `cores` (default:
    all of this machine's, as the local profile gives) with the global resources of the local
    profile, updated by `resources` (snakemake --resources; None: unlimited) and `gpus` (the
    `gpu` resource), at most `jobs` at once (snakemake --jobs; None: no limit). Caption
    requests are one per deduplicated record: retries are not counted.
    """
    config = validate_config(copy.deepcopy(config), weights=())
    run = Path(run_dir) if run_dir is not None else default_run_dir(config)
    run = run if measured and run is not None and run.is_dir() else None
    figures = measure_run(run) if run is not None else {}
    recorded = recorded_jobs(run) if run is not None else []
    limits = global_resources(config, gpus, resources)
    if limits["vlm_api"] is not None:  # as common.smk does: the jobs share the quota
        config["caption"]["api_jobs"] = limits["vlm_api"]
    plan = _Plan(config, figures, run, rule_seconds(recorded))
    sources = url_lists(config, sample_rows)
    caption = config["caption"]
    notes: list[str] = []
    _add_prefilter(plan, sources)
    records, shares = _add_download(plan, sources)
    score = _add_score(plan, config, records, shares)
    kept = _add_select(plan, config, score["records_out"], shares, notes)
    tiered = _add_merge(plan, config, kept, notes)
    deduped = _add_dedup(plan, caption, tiered)
    chunks = _split(deduped, caption["chunk_size"])
    captioned = _add_caption(plan, caption, deduped, chunks)["records_out"]
    masked = _add_mask(plan, config["mask"], captioned, deduped, chunks)
    _add_exports(plan, config["export"], masked)
    cores = cores or os.cpu_count() or 1
    summary = plan.finish(config, cores, limits, jobs)
    result = _totals(plan, summary, masked, notes)
    if caption.get("price_per_image") is None:
        notes.append("cost: caption.price_per_image is not set")
    return {
        "sources": sources,
        "stages": plan.stages,
        **result,
        "run_dir": str(run) if run is not None else None,
        "run_wall_s": recorded_wall(recorded),
        "parallel": {"jobs": jobs, "gpus": limits["gpu"], "cores": cores},
        "assumptions": {name: ASSUMED[name] for name in sorted(plan.used)},
        "notes": notes,
    }


def _part_keys(sources: list[dict], size) -> tuple[list[tuple[int, int]], list[float]]:
    """(source, part) of every download part with rows, and its `size(source, rows)`."""
    keys = [(i, j) for i, s in enumerate(sources) for j, rows in enumerate(s["parts"]) if rows]
    return keys, [size(i, sources[i]["parts"][j]) for i, j in keys]


def _add_prefilter(plan: _Plan, sources: list[dict]) -> None:
    """The prefilter: the URL lists' own metadata, one job per download part."""
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
    keys, sizes = _part_keys(sources, lambda _, rows: rows)
    plan.add("prefilter", rows, passed, sizes, timing, "prefilter_urls", keys)


def _add_download(plan: _Plan, sources: list[dict]) -> tuple[int, Shares]:
    """The download (one img2dataset job per download part, processes_count processes each)
    and the manifest (one job per source); the records listed and each source's share."""
    to_download = sum(s["to_download"] for s in sources)
    success = plan.figure("download", "download_success")
    per_process = ASSUMED["download_rows_per_s_per_process"]["value"]
    timings = [
        plan.timing("download", per_process * s["processes"], None,
                    "download_rows_per_s_per_process", threads=s["processes"])
        for s in sources
    ]  # fmt: skip

    kept = [s["to_download"] / s["rows"] if s["rows"] else 0.0 for s in sources]  # prefilter
    keys, seconds = _part_keys(sources, lambda i, rows: timings[i]["start_s"]
                               + rows * kept[i] * timings[i]["per_record_s"])  # fmt: skip
    row = plan.add("download", to_download, success, [], timings[0] if timings else {},
                   "download_part", keys, seconds,
                   [sources[i]["processes"] for i, _ in keys])  # fmt: skip
    row["notes"] += [
        f"{s['name']}: {s['to_download']:,} rows in {len(s['parts'])} part(s), "
        f"{s['processes']} processes each"
        for s in sources
    ]
    shares = [((i, j), round(sources[i]["parts"][j] * kept[i] * success["value"]))
              for i, j in keys]  # fmt: skip
    shares = [(key, n) for key, n in shares if n]
    timing = plan.timing(
        "manifest", ASSUMED["manifest_records_per_s"]["value"], None, "manifest_records_per_s"
    )
    records = plan.add("manifest", row["records_out"], plan.figure("manifest", "manifest_pass"),
                       [n for _, n in shares], timing, "build_manifest",
                       [key for key, _ in shares])["records_out"]  # fmt: skip
    return records, shares


def _add_score(plan: _Plan, config: dict, records: int, shares: Shares) -> dict:
    """The score: one job per shard (probe + data-juicer scores), filter.np threads and
    filter.gpus GPUs each."""
    filt = config["filter"]
    name = (
        "score_images_per_s_per_decode_thread_gpu"
        if filt["gpus"] > 0
        else "score_images_per_s_per_cpu_thread"
    )
    timing = plan.timing(
        "score", ASSUMED[name]["value"] * filt["np"], "score_job_start_s", name, threads=filt["np"]
    )
    shards = _shards(records, shares, config["shard_size"])
    return plan.add("score", records, plan.figure("score", "probe_pass"), [n for _, n in shards],
                    timing, "score_shard", [key for key, _ in shards])  # fmt: skip


def _select_pass(plan: _Plan, filt: dict, notes: list[str]) -> dict:
    """The share the thresholds keep: measured, else LAION's assumed shares."""
    if "pass" in plan.measured.get("select", {}):
        return plan.figure("select", "filter_pass_aesthetics")
    aes, other = assumed("filter_pass_aesthetics"), assumed("filter_pass_other")
    plan.used.update({"filter_pass_aesthetics", "filter_pass_other"})
    if filt["aesthetics"]["min_score"] != 5:
        notes.append(
            f"filter_pass_aesthetics is LAION's share >= 5, filter.aesthetics."
            f"min_score is {filt['aesthetics']['min_score']}"
        )
    return _figure(
        aes["value"] * other["value"], "assumed", f"{aes['source']}; x {other['source']}"
    )


def _add_select(plan: _Plan, config: dict, scored: int, shares: Shares, notes: list[str]) -> int:
    """The select: the thresholds, one local job per shard; the records it keeps."""
    filter_pass = _select_pass(plan, config["filter"], notes)
    timing = plan.timing(
        "select", ASSUMED["select_records_per_s"]["value"], None, "select_records_per_s"
    )
    timing["start_s"] = plan.job_seconds("select_shard", "select_job_s")
    shards = _shards(scored, shares, config["shard_size"])
    sizes, keys = [n for _, n in shards], [key for key, _ in shards]
    row = plan.add("select", scored, filter_pass, sizes, timing, "select_shard", keys)
    return row["records_out"]


def _add_merge(plan: _Plan, config: dict, count: int, notes: list[str]) -> int:
    """The merge into the tiers; the records of the one captioned (caption.input)."""
    filt, caption = config["filter"], config["caption"]
    low, high = filt["aesthetics_tiers"]
    wanted = Path(caption["input"]).name
    if "pass" in plan.measured.get(f"merge:{wanted}", {}):
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
    return plan.add("merge", count, tier_pass, [count] if count else [], timing, "merge_tiers",
                    caption_input=caption["input"])["records_out"]  # fmt: skip


def _add_dedup(plan: _Plan, caption: dict, tiered: int) -> int:
    """The dedup, before any paid request; the records it keeps."""
    dedup = caption.get("dedup") or {}
    if dedup.get("enabled", True):
        dedup_pass = plan.figure("dedup", "dedup_drop")
        if dedup_pass["basis"] == "assumed":  # the assumption is the share dropped
            dedup_pass = {**dedup_pass, "value": 1 - dedup_pass["value"]}
        per_thread = ASSUMED["dedup_images_per_s_per_thread"]["value"]
        threads = dedup.get("threads", 1)
        timing = plan.timing(
            "dedup", per_thread * threads, None, "dedup_images_per_s_per_thread", threads=threads
        )
    else:
        dedup_pass = _figure(1.0, "config", "caption.dedup.enabled: false")
        timing = _figure(None, "config", "caption.dedup.enabled: false")
        timing.update(start_s=0.0, per_record_s=0.0, records_per_s=None)
    sizes = [tiered] if tiered else []
    return plan.add("dedup", tiered, dedup_pass, sizes, timing, "dedup_records")["records_out"]


def _add_mask(plan: _Plan, mask: dict, captioned: int, deduped: int, chunks: list[int]) -> int:
    """The masks: one job per caption chunk, mask.gpus GPUs each; the records masked."""
    if mask["gpus"] > 0:
        per_second = ASSUMED["mask_images_per_s_per_gpu"]["value"] * mask["gpus"]
        name, threads = "mask_images_per_s_per_gpu", 1
    else:
        threads = mask["decode_workers"]
        per_second = ASSUMED["mask_images_per_s_per_cpu_thread"]["value"] * threads
        name = "mask_images_per_s_per_cpu_thread"
    timing = plan.timing("mask", per_second, None, name, threads=threads)
    share = captioned / deduped if deduped else 0.0
    sized = [(chunk, m) for chunk, m in enumerate(round(n * share) for n in chunks) if m]
    row = plan.add("mask", captioned, plan.figure("mask", "mask_pass"), [m for _, m in sized],
                   timing, "mask_chunk", [(chunk,) for chunk, _ in sized],
                   model=mask["model_config"])  # fmt: skip
    if "hiera_l" not in mask["model_config"] and timing["basis"] == "assumed":
        row["notes"].append("the assumed rate is hiera-large's; smaller models run faster")
    return row["records_out"]


def _add_caption(plan: _Plan, caption: dict, deduped: int, chunks: list[int]) -> dict:
    """The caption row and jobs: on servers of our own (a start-up each) or against an API
    (the quota shared by the api_jobs jobs at once), one request per deduplicated record."""
    caption_pass = plan.figure("caption", "caption_pass")
    serve = caption["serve"]
    if serve.get("command"):
        served = plan.measured.get("caption", {}).get("served", False)
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
            "caption_chunk",
            mode=f"{serve['instances']} server(s) of {serve['gpus']} "
            f"GPU(s) serving {caption['model']}",
        )
    else:
        # each of the api_jobs jobs at once paces itself at the quota / api_jobs
        timing = api_timing(caption, plan)
        per_job = timing["per_record_s"] * caption["api_jobs"]
        timing["start_s"] = _api_start(plan.measured.get("caption") or {}, per_job)
        row = plan.add(
            "caption",
            deduped,
            caption_pass,
            chunks,
            {**timing, "per_record_s": per_job},
            "caption_chunk",
            mode=f"API ({caption['backend']}, {caption['model']})",
        )
        row["rate"] = timing
    price = caption.get("price_per_image")
    row["requests"] = deduped
    row["cost"] = None if price is None else deduped * price
    row["notes"].append("requests: one per deduplicated record; retries are not counted")
    return row


def _add_exports(plan: _Plan, export: dict, masked: int) -> None:
    """The export rows and jobs of the masked records, one per format of export.formats."""
    every = _figure(1.0, "config", "every masked record")
    if "emu3" in export["formats"]:
        emu3 = export["emu3"]
        key = "emu3_images_per_s_per_gpu" if emu3["tokenize"] else "emu3_prompts_per_s"
        timing = plan.timing("export emu3", ASSUMED[key]["value"], None, key)
        measured_pass = "pass" in plan.measured.get("export emu3", {})
        plan.add(
            "export emu3",
            masked,
            plan.figure("export emu3", "") if measured_pass else every,
            _split(masked, math.ceil(masked / emu3["parts"]) or 1),
            timing,
            "emu3_part",
        )
    for fmt, key, rule in (
        ("coco", "export_records_per_s", "export_coco"),
        ("odvg", "export_records_per_s", "export_odvg"),
        ("webdataset", "webdataset_images_per_s", "export_wds"),
    ):
        if fmt in export["formats"]:
            name = f"export {fmt}"
            timing = plan.timing(name, ASSUMED[key]["value"], None, key)
            passed = plan.figure(name, "") if "pass" in plan.measured.get(name, {}) else every
            plan.add(name, masked, passed, [masked] if masked else [], timing, rule)


def global_resources(
    config: dict, gpus: int | None, resources: dict[str, int | None] | None
) -> dict[str, int | None]:
    """The global resources of a local run: the local profile's, vlm_api, vlm_server and
    download_parts as common.smk sets them from the config, then `resources` and `gpus`."""
    serve = config["caption"]["serve"]
    limits = {
        **LOCAL_RESOURCES,
        "vlm_api": config["caption"]["api_jobs"],
        "vlm_server": serve["instances"],
        "download_parts": config["download"]["max_parallel"],
        **(resources or {}),
    }
    if gpus is not None:
        limits["gpu"] = gpus
    return limits


def _totals(plan: _Plan, summary: dict, masked: int, notes: list[str]) -> dict:
    """The estimate's totals and schedule: the simulated run plus Snakemake's own planning."""
    plan.used.update({"snakemake_plan_s", "snakemake_plan_s_per_job"})
    planning = (
        ASSUMED["snakemake_plan_s"]["value"]
        + ASSUMED["snakemake_plan_s_per_job"]["value"] * summary["jobs"]
    )
    stages = plan.stages
    costs = [s["cost"] for s in stages if s["cost"] is not None]
    total = {
        "wall_s": summary["makespan_s"] + planning,
        "job_hours": sum(s["job_hours"] for s in stages) + summary["other_job_s"] / 3600,
        "gpu_hours": sum(s["gpu_hours"] or 0.0 for s in stages),
        "requests": sum(s["requests"] or 0 for s in stages),
        "cost": sum(costs) if costs else None,
        "records_out": masked,
    }
    notes.append(
        "wall: a stage's first job's start to its last job's end in a simulation of Snakemake's "
        "local scheduler (threads, resources, what each job waits for; stages overlap); total: "
        f"the simulated run plus Snakemake's planning ({duration(planning)})"
    )
    return {"total": total, "schedule": {**summary, "planning_s": planning}}


def _api_start(entry: dict, per_job: float) -> float:
    """Start-up of an API caption job: what a run's measured jobs took beyond their requests
    at `per_job` seconds each (0 without a run, or one that served its own model)."""
    if "mean_s" not in entry or entry.get("served"):
        return 0.0
    return max(0.0, entry["mean_s"] - entry["mean_records"] * per_job)


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


def _schedule_lines(result: dict) -> list[str]:
    """What the simulated run had, its job time, and the earlier run it measured."""
    total, schedule = result["total"], result["schedule"]
    given = ", ".join(
        f"{name}={'unlimited' if limit is None else limit}"
        for name, limit in schedule["resources"].items()
    )
    other = sum(schedule["other_jobs"].values())
    earlier = result["run_dir"] or "no earlier run"
    if result.get("run_wall_s") is not None:
        earlier += f" (its jobs ran {duration(result['run_wall_s'])}, first start to last end)"
    return [
        f"simulated on {schedule['cores']} cores, {given}, jobs at once "
        f"{schedule['max_jobs'] or 'any'}: {schedule['jobs']} jobs ({other} bookkeeping, "
        f"{duration(schedule['other_job_s'])}), Snakemake's planning "
        f"{duration(schedule['planning_s'])}",
        f"job time {total['job_hours']:,.1f} h, GPU time {total['gpu_hours']:,.1f} h; "
        f"measured from: {earlier}",
    ]


def _source_lines(result: dict) -> list[str]:
    """The estimate's table of sources."""
    head = f"{'source':<28} {'files':>5} {'rows':>14} {'to download':>14} {'prefilter pass':>15}"
    lines = [head, "-" * len(head)]
    for source in result["sources"]:
        lines.append(
            f"{source['name']:<28} {source['files']:>5} {source['rows']:>14,} "
            f"{source['to_download']:>14,} {source['pass']:>15.3f}"
        )
        if source.get("error"):
            lines.append(f"  error: {source['error']}")
    return lines


def _stage_line(stage: dict) -> str:
    """One stage's line of the estimate's table."""
    rate = stage["rate"].get("records_per_s")
    shown = "-" if rate is None else f"{rate:,.3g}/s"
    cost = "-" if stage["cost"] is None else f"{stage['cost']:,.2f}"
    requests = "-" if stage["requests"] is None else f"{stage['requests']:,}"
    return (
        f"{stage['stage']:<18} {stage['records_in']:>13,} {stage['records_out']:>13,} "
        f"{stage['pass_rate']['value']:>6.3f} {_basis(stage['pass_rate']):<9} "
        f"{stage['jobs']:>6} {stage['at_once']:>7} {duration(stage['wall_s']):>9} "
        f"{shown + ' (' + _basis(stage['rate']) + ')':<22} {requests:>10} {cost:>10}"
    )


def _stage_table(result: dict) -> list[str]:
    """The estimate's table of stages and its total line."""
    head = (
        f"{'stage':<18} {'in':>13} {'out':>13} {'pass':>6} {'(basis)':<9} {'jobs':>6} "
        f"{'at once':>7} {'wall':>9} {'rate (basis)':<22} {'requests':>10} {'cost':>10}"
    )
    lines = [head, "-" * len(head), *map(_stage_line, result["stages"]), "-" * len(head)]
    total = result["total"]
    cost = "-" if total["cost"] is None else f"{total['cost']:,.2f}"
    lines.append(
        f"{'total':<18} {'':>13} {total['records_out']:>13,} {'':>6} {'':<9} {'':>6} {'':>7} "
        f"{duration(total['wall_s']):>9} {'':<22} {total['requests']:>10,} {cost:>10}"
    )
    return lines


def _figure_lines(result: dict) -> list[str]:
    """The notes, and the assumed and measured figures the estimate used."""
    lines = [f"  {stage['stage']}: {note}" for stage in result["stages"]
             for note in [stage.get("mode"), *(stage.get("notes") or [])] if note]  # fmt: skip
    lines += [f"  note: {note}" for note in result["notes"]]
    if result["assumptions"]:
        lines += ["", "assumed figures (src/groundset/tools/assumed.yaml):"]
        for name, entry in result["assumptions"].items():
            lines.append(f"  {name} = {entry['value']:,} {entry['unit']}")
            lines.append(f"      {entry['source']}")
    measured = [
        f"  {stage['stage']} {what}: {figure['source']}"
        for stage in result["stages"]
        for what, figure in (("rate", stage["rate"]), ("pass rate", stage["pass_rate"]))
        if figure.get("basis") == "measured"
    ]
    return lines + (["", "measured figures:", *measured] if measured else [])


def format_estimate(result: dict) -> str:
    """A readable table of `estimate`'s result: sources, stages, totals, what was assumed."""
    lines = [*_source_lines(result), "", *_stage_table(result), *_schedule_lines(result)]
    return "\n".join(lines + _figure_lines(result))
