"""groundset.tools.estimate: counts from the URL lists' metadata, times from the config and rates
(assumed, or measured by an earlier run's benchmarks and stats), requests and cost."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from groundset.core.config import validate_config
from groundset.core.io import write_json
from groundset.core.stats import envelope, write_stats
from groundset.stages.prefilter import PrefilterRules
from groundset.tools.estimate import (
    AFTER,
    ASSUMED,
    LIGHT_MEM_MB,
    LOCAL_RESOURCES,
    PROFILE_MEM_MB,
    Job,
    estimate,
    format_estimate,
    measure_run,
    most_at_once,
    prefilter_pass,
    read_benchmark,
    recorded_jobs,
    recorded_wall,
    rule_needs,
    rule_seconds,
    schedule,
)

ROOT = Path(__file__).resolve().parents[1]

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def url_list(folder: Path, sizes: list[tuple[int | None, int | None]], files: int = 2) -> Path:
    """A folder of parquet files in LAION's schema with these WIDTH/HEIGHT pairs, spread over
    `files` files."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"URL": f"http://x/{i}.jpg", "TEXT": "t", "WIDTH": w, "HEIGHT": h}
        for i, (w, h) in enumerate(sizes)
    ]
    per_file = math.ceil(len(rows) / files)
    for f in range(files):
        frame = pd.DataFrame(rows[f * per_file : (f + 1) * per_file])
        for column in ("WIDTH", "HEIGHT"):
            frame[column] = frame[column].astype("Int64")
        frame.to_parquet(folder / f"part-{f:05d}.parquet", index=False)
    return folder


# 10 rows: 4 too small, 1 too wide, 1 of unknown size (kept), 4 fine -> pass 0.5
SIZES = [(800, 600)] * 4 + [(4000, 1024)] + [(None, None)] + [(2048, 1536)] * 4


def config_for(url_folder: Path, workdir: Path, **sections: object) -> dict:
    """A validated config of one source (`sections`: top-level keys, mappings merged in)."""
    config = {
        "workdir": str(workdir),
        # the test lists have no LAION extras to save (the run would refuse them otherwise)
        "sources": [{"name": "src", "url_list": str(url_folder), "save_additional_columns": []}],
        "mask": {"random_weights": True},
        "export": {"emu3": {"random_weights": True}},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return validate_config(config, weights=())


def stage(result: dict, name: str) -> dict:
    """One stage row of an estimate."""
    return next(s for s in result["stages"] if s["stage"] == name)


@pytest.fixture
def lists(tmp_path) -> Path:
    """The 10-row URL list in two files."""
    return url_list(tmp_path / "urls", SIZES)


def test_counts_come_from_the_footers_and_the_size_columns(lists, tmp_path):
    result = estimate(config_for(lists, tmp_path / "w"), measured=False)
    (source,) = result["sources"]
    assert (source["files"], source["rows"], source["sampled_rows"]) == (2, 10, 10)
    assert source["pass"] == 0.5
    assert source["dropped"] == {"too_small": 0.4, "aspect_ratio": 0.1}
    assert source["to_download"] == 5
    prefilter = stage(result, "prefilter")
    assert (prefilter["records_in"], prefilter["records_out"]) == (10, 5)
    assert prefilter["pass_rate"]["basis"] == "metadata"


def test_a_sample_of_row_groups_stands_for_a_big_list(tmp_path):
    """Only some row groups are read (two columns): the pass rate of what they hold."""
    folder = tmp_path / "big"
    folder.mkdir()
    table = pa.table(
        {
            "URL": [f"u{i}" for i in range(4000)],
            "TEXT": ["t"] * 4000,
            "WIDTH": [2048] * 2000 + [100] * 2000,
            "HEIGHT": [2048] * 4000,
        }
    )
    pq.write_table(table, folder / "a.parquet", row_group_size=1000)
    rules = PrefilterRules.from_config({})
    sampled = prefilter_pass([folder / "a.parquet"], rules, budget=2000)
    assert sampled["rows"] == 4000
    assert sampled["sampled_rows"] == 2000  # two of the four row groups, first and last
    assert sampled["pass"] == 0.5
    assert prefilter_pass([folder / "a.parquet"], rules)["sampled_rows"] == 4000


def test_assumed_rates_say_so(lists, tmp_path):
    config = config_for(lists, tmp_path / "w", download={"processes_count": 4})
    result = estimate(config, measured=False, cores=4)
    download = stage(result, "download")
    success = ASSUMED["download_success"]["value"]
    assert download["records_out"] == round(5 * success)
    assert download["pass_rate"]["basis"] == "assumed"
    assert download["pass_rate"]["source"].startswith("download_success: img2dataset")
    per_process = ASSUMED["download_rows_per_s_per_process"]["value"]
    assert download["rate"]["records_per_s"] == pytest.approx(4 * per_process)
    assert download["wall_s"] == pytest.approx(5 / (4 * per_process))
    assert "download_success" in result["assumptions"]
    assert result["run_dir"] is None
    assert all(s["rate"].get("basis") in ("assumed", "config", None) for s in result["stages"])


def test_score_jobs_follow_shard_size_and_gpus(tmp_path):
    folder = url_list(tmp_path / "urls", [(2048, 1536)] * 1000, files=1)
    config = config_for(folder, tmp_path / "w", shard_size=100, filter={"gpus": 1, "np": 4})
    result = estimate(config, measured=False, gpus=2, cores=16, resources={"mem_mb": None})
    score = stage(result, "score")
    records = stage(result, "manifest")["records_out"]
    full, rest = divmod(records, 100)
    assert score["jobs"] == full + bool(rest)
    assert score["at_once"] == 2  # two GPUs, one per job
    rate = 4 * ASSUMED["score_images_per_s_per_decode_thread_gpu"]["value"]
    start = ASSUMED["score_job_start_s"]["value"]
    one, last = start + 100 / rate, start + rest / rate
    # two at once, in order: the short last job goes where the full ones end first
    assert score["wall_s"] == pytest.approx(max(math.ceil(full / 2) * one, full // 2 * one + last))
    assert score["gpu_hours"] == pytest.approx(score["job_hours"])
    # the local profile's one GPU and 16 GB: one score job (32 GB asked, capped) at a time
    local = stage(estimate(config, measured=False, cores=16), "score")
    assert local["at_once"] == 1
    assert local["wall_s"] == pytest.approx(full * one + last)


def write_bench(path: Path, seconds: float, rss: float = 100.0) -> None:
    """A Snakemake benchmark file of one job."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCH_HEADER + f"{seconds}\t0:00:{int(seconds)}\t{rss}\t0\t0\t0\t0\t0\t0\t0\n")


def fake_run(work: Path) -> Path:
    """An earlier run's benchmarks and stats files (download 80% success at 10 rows/s, two
    score shards of 100 and 300 records taking 30 and 70 s: 10 s start-up, 0.2 s per record)."""
    write_bench(work / "benchmarks" / "download_part" / "src" / "0a0b0c0d.tsv", 100.0, rss=512.0)
    write_stats(
        work / "downloads" / "src" / "0a0b0c0d_stats.json",
        envelope("download", 1000, 800, {"failed_to_download": 200}),
    )
    write_stats(
        work / "manifest" / "src" / "0a0b0c0d_stats.json", envelope("manifest", 800, 800, {})
    )
    for shard, (records, seconds) in enumerate([(100, 30.0), (300, 70.0)]):
        write_bench(
            work / "benchmarks" / "score_shard" / "src" / "0a0b0c0d" / f"{shard}.tsv", seconds
        )
        write_stats(
            work / "scored" / "src" / "0a0b0c0d" / f"shard_{shard}_stats.json",
            envelope("score", records, records, {}),
        )
        write_stats(
            work / "filtered" / "src" / "0a0b0c0d" / f"shard_{shard}_stats.json",
            envelope("select", records, records // 4, {"x": records - records // 4}),
        )
    write_stats(work / "merged" / "merge_stats.json", merge_stats(100, 100, 10))
    return work  # fmt: skip


def merge_stats(records: int, low: int, high: int) -> dict:
    """The merge's stats envelope: `records` in, `low` in the first tier, `high` in the second."""
    tiers = {"merged_output.jsonl": low, "aes_6.jsonl": high}
    return envelope("merge", records, low, {"below_first_tier": records - low}, per_tier=tiers)


def test_an_earlier_run_gives_measured_figures(lists, tmp_path):
    run = fake_run(tmp_path / "earlier")
    figures = measure_run(run)
    assert figures["download"]["pass"] == 0.8
    assert figures["download"]["per_record_s"] == pytest.approx(0.1)
    assert figures["download"]["max_rss_mb"] == 512.0
    assert figures["score"]["start_s"] == pytest.approx(10.0)
    assert figures["score"]["per_record_s"] == pytest.approx(0.2)
    assert figures["select"]["pass"] == 0.25
    assert figures["merge:aes_6.jsonl"]["pass"] == 0.1
    result = estimate(config_for(lists, tmp_path / "w"), run)
    download = stage(result, "download")
    assert download["pass_rate"]["basis"] == "measured"
    assert download["records_out"] == 4  # 5 x 0.8
    assert download["rate"]["basis"] == "measured"
    assert download["wall_s"] == pytest.approx(5 * 0.1)
    score = stage(result, "score")
    assert score["rate"]["basis"] == "measured"
    # shards are cut per download part (one per file here), one after another on the one GPU
    assert score["jobs"] == 2
    assert score["wall_s"] == pytest.approx(2 * 10.0 + 0.2 * score["records_in"])
    assert stage(result, "select")["pass_rate"]["value"] == 0.25
    assert stage(result, "merge")["pass_rate"] == {
        "value": 0.1,
        "basis": "measured",
        "source": f"{run}: merge:aes_6.jsonl stats files",
    }
    assert stage(result, "dedup")["pass_rate"]["basis"] == "assumed"
    assert result["run_dir"] == str(run)
    assert "measured figures:" in format_estimate(result)


def test_the_workdir_is_the_default_earlier_run(lists, tmp_path):
    work = fake_run(tmp_path / "w")
    assert estimate(config_for(lists, work))["run_dir"] == str(work)
    assert estimate(config_for(lists, work), measured=False)["run_dir"] is None
    assert estimate(config_for(lists, tmp_path / "empty"))["run_dir"] is None


def captioning_run(tmp_path: Path, **caption: object) -> dict:
    """A config whose every record reaches captioning: 2000 fine rows, no losses on the way."""
    folder = url_list(tmp_path / "urls", [(2048, 1536)] * 2000, files=1)
    work = tmp_path / "w"
    (work / "benchmarks").mkdir(parents=True)
    for name, stats in (
        ("downloads/src/0a0b0c0d_stats.json", envelope("download", 10, 10, {})),
        ("manifest/src/0a0b0c0d_stats.json", envelope("manifest", 10, 10, {})),
        ("dedup/dedup_stats.json", envelope("dedup", 10, 10, {})),
        ("merged/merge_stats.json", merge_stats(10, 10, 10)),
        ("scored/src/0a0b0c0d/shard_0_stats.json", envelope("score", 10, 10, {})),
        ("filtered/src/0a0b0c0d/shard_0_stats.json", envelope("select", 10, 10, {})),
    ):
        write_stats(work / name, stats)
    return config_for(folder, work, caption={"chunk_size": 500, **caption})


def test_a_dashscope_quota_sets_the_captioning_time(tmp_path):
    config = captioning_run(tmp_path, rate_per_second=2, api_jobs=2, concurrency=8)
    caption = stage(estimate(config, cores=4), "caption")
    assert caption["records_in"] == 2000
    assert caption["requests"] == 2000
    assert (caption["jobs"], caption["at_once"]) == (4, 2)
    assert caption["rate"]["basis"] == "config"
    assert caption["wall_s"] == pytest.approx(2000 / (2 * 0.98))
    assert any("retries are not counted" in note for note in caption["notes"])
    assert caption["gpu_hours"] is None


def test_a_quota_the_jobs_cannot_fill(tmp_path):
    config = captioning_run(tmp_path, rate_per_second=100, api_jobs=1, concurrency=3)
    caption = stage(estimate(config, cores=4), "caption")
    latency = ASSUMED["caption_answer_latency_s"]["value"]
    assert caption["rate"]["basis"] == "assumed"
    assert caption["wall_s"] == pytest.approx(2000 * latency / 3)


def test_servers_of_our_own_set_the_captioning_time(tmp_path):
    serve = {"command": "vllm serve M --port {port}", "instances": 2, "gpus": 2}
    config = captioning_run(tmp_path, backend="openai", model="M", serve=serve)
    caption = stage(estimate(config, cores=64, gpus=4, resources={"mem_mb": None}), "caption")
    per_chunk = ASSUMED["serve_start_s"]["value"] + 500 / ASSUMED["serve_images_per_s"]["value"]
    assert (caption["jobs"], caption["at_once"]) == (4, 2)
    assert caption["wall_s"] == pytest.approx(2 * per_chunk)
    assert caption["gpu_hours"] == pytest.approx(4 * per_chunk * 2 / 3600)
    assert caption["requests"] == 2000
    assert caption["cost"] is None
    assert caption["rate"]["basis"] == "assumed"


def test_cost_with_and_without_a_price(tmp_path):
    result = estimate(captioning_run(tmp_path, price_per_image=0.004))
    assert stage(result, "caption")["cost"] == pytest.approx(8.0)
    assert result["total"]["cost"] == pytest.approx(8.0)
    assert result["total"]["requests"] == 2000
    assert "8.00" in format_estimate(result)
    unpriced = estimate(captioning_run(tmp_path / "b"))
    assert unpriced["total"]["cost"] is None
    assert "cost: caption.price_per_image is not set" in unpriced["notes"]


def test_every_figure_has_a_basis(lists, tmp_path):
    result = estimate(config_for(lists, tmp_path / "w"), measured=False, jobs=4)
    for row in result["stages"]:
        assert row["pass_rate"]["basis"] in ("metadata", "config", "measured", "assumed")
        assert row["pass_rate"]["source"]
        if row["rate"]:
            assert row["rate"]["basis"] in ("config", "measured", "assumed"), row["stage"]
    text = format_estimate(result)
    assert text.splitlines()[0].startswith("source")
    assert "assumed figures" in text and "total" in text
    json.dumps(result)  # the CLI's --json


def test_benchmarks_give_seconds_memory_and_cpu(tmp_path):
    write_bench(tmp_path / "b.tsv", 12.5, rss=300.0)
    assert read_benchmark(tmp_path / "b.tsv") == {"s": 12.5, "max_rss": 300.0, "cpu_time": 0.0}
    assert read_benchmark(tmp_path / "missing.tsv") is None


# --- the scheduling: Snakemake's local scheduler on small hand-made DAGs -----------------


def test_jobs_under_one_gpu_run_one_at_a_time():
    masks = [Job("mask_chunk", 5.0, resources={"gpu": 1}) for _ in range(3)]
    spans = schedule(masks, cores=8, limits={"gpu": 1})
    assert spans == [(0.0, 5.0), (5.0, 10.0), (10.0, 15.0)]
    assert most_at_once(spans) == 1
    assert schedule(masks, cores=8, limits={"gpu": None}) == [(0.0, 5.0)] * 3  # unlimited
    assert schedule(masks, cores=8, limits={"gpu": 2})[2] == (5.0, 10.0)


def test_one_thread_jobs_share_the_cores_and_a_two_thread_job_holds_both():
    assert schedule([Job("a", 5.0), Job("b", 5.0)], cores=2) == [(0.0, 5.0), (0.0, 5.0)]
    wide = [Job("w", 4.0, threads=2), Job("a", 3.0), Job("b", 3.0)]
    assert schedule(wide, cores=2) == [(0.0, 4.0), (4.0, 7.0), (4.0, 7.0)]
    # a one-thread job fills the third core beside it
    assert schedule(wide, cores=3) == [(0.0, 4.0), (0.0, 3.0), (3.0, 6.0)]


def test_one_core_runs_everything_in_turn_and_slows_threaded_work():
    jobs = [Job("a", 1.0, 4.0, threads=2, parallel=2.0), Job("b", 2.0), Job("c", 2.0)]
    # a: 1 s start-up, then 4 s of work that kept 2 cores busy, now on one
    assert schedule(jobs, cores=1) == [(0.0, 9.0), (9.0, 11.0), (11.0, 13.0)]
    assert schedule(jobs, cores=2) == [(0.0, 5.0), (5.0, 7.0), (5.0, 7.0)]
    # work that kept one core busy is no slower on one
    assert schedule([Job("a", 1.0, 4.0, threads=2)], cores=1) == [(0.0, 5.0)]


def test_jobs_wait_for_their_inputs_and_shards_overlap_across_stages():
    # two score shards, each shard's select after its score, a merge after both selects
    jobs = [
        Job("score_shard", 2.0),
        Job("score_shard", 4.0),
        Job("select_shard", 1.0, after=(0,)),
        Job("select_shard", 1.0, after=(1,)),
        Job("merge_tiers", 1.0, after=(2, 3)),
    ]
    spans = schedule(jobs, cores=2)
    assert spans[2] == (2.0, 3.0)  # shard 0's select while shard 1 still scores
    assert spans[3:] == [(4.0, 5.0), (5.0, 6.0)]
    assert schedule(jobs, cores=1) == [(0.0, 2.0), (2.0, 6.0), (6.0, 7.0), (7.0, 8.0), (8.0, 9.0)]


def test_resources_above_what_there_is_are_capped_and_jobs_at_once_limited():
    big = [Job("score_shard", 3.0, resources={"mem_mb": 32000}) for _ in range(2)]
    assert schedule(big, cores=4, limits={"mem_mb": 16000}) == [(0.0, 3.0), (3.0, 6.0)]
    assert schedule(big, cores=4, limits={"mem_mb": 64000}) == [(0.0, 3.0)] * 2
    one = [Job("x", 1.0) for _ in range(3)]
    assert schedule(one, cores=4, max_jobs=2) == [(0.0, 1.0), (0.0, 1.0), (1.0, 2.0)]


def test_the_estimate_overlaps_shards_of_different_stages(tmp_path):
    folder = url_list(tmp_path / "urls", [(2048, 1536)] * 1000, files=1)
    config = config_for(folder, tmp_path / "w", shard_size=100, filter={"np": 2})
    result = estimate(config, measured=False, cores=3, resources={"mem_mb": None})
    score, select = stage(result, "score"), stage(result, "select")
    assert score["jobs"] > 2 and score["at_once"] == 1  # 2 threads each of 3 cores
    first = ASSUMED["score_job_start_s"]["value"] + 100 / (2 * 0.42)
    # shard 0's select starts when its score ends, on the core the score jobs leave free
    assert select["start_s"] == pytest.approx(score["start_s"] + first)
    assert select["start_s"] < score["end_s"]
    assert result["total"]["wall_s"] < sum(row["wall_s"] for row in result["stages"]) + 60
    assert stage(estimate(config, measured=False, cores=1), "score")["at_once"] == 1
    one = estimate(config, measured=False, cores=1)["total"]["wall_s"]
    assert one > result["total"]["wall_s"]  # threaded work on one core: longer
    assert "upper bound" not in format_estimate(result).split("assumed figures")[0]


def test_the_rule_table_matches_the_rules_and_profiles():
    """Threads and mem_mb of rule_needs against workflow/rules/*.smk and the profiles."""
    declared = {}
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        blocks = re.split(r"^(?:rule|checkpoint) (\w+):", path.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
            threads = re.search(r"^\s+threads: (\d+)$", body, flags=re.M)
            mem = re.search(r"^\s+mem_mb=(\d+),$", body, flags=re.M)
            declared[name] = (threads and int(threads[1]), mem and int(mem[1]))
    assert set(declared) - {"all"} == set(AFTER)
    needs = rule_needs(validate_config({"sources": [{"name": "s", "url_list": "x"}]}, weights=()))
    for rule, (threads, mem) in declared.items():
        if rule in LIGHT_MEM_MB:
            assert (threads, mem) == (1, LIGHT_MEM_MB[rule]), rule
        if rule in needs and threads is not None:
            assert needs[rule][0] == threads, rule
        if rule in needs and mem is not None:
            assert needs[rule][1]["mem_mb"] == PROFILE_MEM_MB.get(rule, mem), rule
    local = yaml.safe_load((ROOT / "profiles" / "local" / "config.yaml").read_text())
    given = dict(item.split("=") for item in local["resources"])
    assert {k: int(v) for k, v in given.items()} == LOCAL_RESOURCES
    profile = yaml.safe_load((ROOT / "profiles" / "default" / "config.yaml").read_text())
    profile = profile["set-resources"]
    assert {r: v["mem_mb"] for r, v in profile.items() if "mem_mb" in v} == PROFILE_MEM_MB


# --- Snakemake's records of a run --------------------------------------------------------


def write_record(
    run: Path, output: str, rule: str, start: float, end: float, inputs=(), job: int = 0
) -> None:
    """One output's record in a run's .snakemake/metadata, as Snakemake writes it."""
    name = base64.urlsafe_b64encode(output.encode()).decode()
    record = {"rule": rule, "input": list(inputs), "starttime": start, "endtime": end}
    write_json(run / ".snakemake" / "metadata" / name, {**record, "job_hash": job})


def test_snakemake_records_give_every_rules_job_time(lists, tmp_path):
    run = tmp_path / "run"
    (run / "benchmarks").mkdir(parents=True)
    scored = "scored/src/shard_0.jsonl"
    write_record(run, scored, "score_shard", 100.0, 108.0, job=1)
    write_record(run, "scored/src/shard_0_stats.json", "score_shard", 100.0, 108.0, job=1)
    # a `run:` job: its record starts in its own subprocess, at its end
    write_record(run, "filtered/src/shard_0.jsonl", "select_shard", 111.5, 111.5, [scored], 2)
    write_record(run, "shards/src/index.json", "index_shards", 99.0, 99.4, job=3)
    jobs = recorded_jobs(run)
    assert [job["rule"] for job in jobs] == ["index_shards", "score_shard", "select_shard"]
    seconds = rule_seconds(jobs)
    assert seconds == pytest.approx({"index_shards": 0.4, "score_shard": 8.0, "select_shard": 3.5})
    assert recorded_wall(jobs) == pytest.approx(12.5)
    result = estimate(config_for(lists, tmp_path / "w"), run, cores=2)
    assert stage(result, "select")["rate"]["start_s"] == pytest.approx(3.5)
    assert result["run_wall_s"] == pytest.approx(12.5)
    assert "index_shards" in result["schedule"]["other_jobs"]
    assert "select_job_s" not in result["assumptions"]
    assert "its jobs ran 12s" in format_estimate(result)


@pytest.mark.workflow
@pytest.mark.xdist_group("sample")
def test_the_sample_estimate_matches_its_own_run(sample_run, monkeypatch):
    """The sample estimated from its own run's benchmarks and records: within 30 % of the
    time its jobs took (Snakemake's records, first start to last end), at 2 cores and 1."""
    from groundset.core.config import load_config

    monkeypatch.chdir(ROOT)  # the sample config's URL lists are relative to the repository
    config = load_config("config/sample.yaml", weights=())
    run = sample_run["snapshot"]
    took = recorded_wall(recorded_jobs(run))
    assert took is not None and took > 0
    two = estimate(config, run, cores=2)
    one = estimate(config, run, cores=1)
    for result in (two, one):
        assert 0.7 * took <= result["schedule"]["makespan_s"] <= 1.3 * took
        assert result["run_wall_s"] == pytest.approx(took)
    assert one["schedule"]["makespan_s"] >= two["schedule"]["makespan_s"]
    assert stage(two, "mask")["at_once"] == 1  # gpu=1: the mask jobs one at a time


def test_a_url_list_the_run_would_refuse_is_an_error_not_a_count(tmp_path):
    """A file without the URL column stops the run before any job: the estimate says so."""
    folder = url_list(tmp_path / "urls", [(2048, 1536)] * 10)
    pd.DataFrame([{"TEXT": "t", "WIDTH": 2048, "HEIGHT": 1536}]).to_parquet(folder / "x.parquet")
    config = config_for(folder, tmp_path / "w")
    (source,) = estimate(config, measured=False)["sources"]
    assert "x.parquet: missing column(s) ['URL']" in source["error"]
    assert source["to_download"] == 0
    assert "error: " in format_estimate(estimate(config, measured=False))
