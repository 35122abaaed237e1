"""groundset.estimate: counts from the URL lists' metadata, times from the config and rates
(assumed, or measured by an earlier run's benchmarks and stats), requests and cost."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groundset.config import validate_config
from groundset.estimate import (
    ASSUMED,
    estimate,
    format_estimate,
    measure_run,
    prefilter_pass,
    read_benchmark,
    wall_time,
)
from groundset.io import write_json
from groundset.prefilter import PrefilterRules

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
        "sources": [{"name": "src", "url_list": str(url_folder)}],
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
    result = estimate(config, measured=False)
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
    result = estimate(config, measured=False, gpus=2)
    score = stage(result, "score")
    records = stage(result, "manifest")["records_out"]
    assert score["jobs"] == math.ceil(records / 100)
    assert score["at_once"] == 2  # two GPUs, one per job
    rate = 4 * ASSUMED["score_images_per_s_per_decode_thread_gpu"]["value"]
    one = ASSUMED["score_job_start_s"]["value"] + 100 / rate
    assert score["wall_s"] == pytest.approx(
        wall_time(
            [one] * (records // 100)
            + [ASSUMED["score_job_start_s"]["value"] + records % 100 / rate] * bool(records % 100),
            2,
        )
    )
    assert score["gpu_hours"] == pytest.approx(score["job_hours"])


def write_bench(path: Path, seconds: float, rss: float = 100.0) -> None:
    """A Snakemake benchmark file of one job."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BENCH_HEADER + f"{seconds}\t0:00:{int(seconds)}\t{rss}\t0\t0\t0\t0\t0\t0\t0\n")


def fake_run(work: Path) -> Path:
    """An earlier run's benchmarks and stats files (download 80% success at 10 rows/s, two
    score shards of 100 and 300 records taking 30 and 70 s: 10 s start-up, 0.2 s per record)."""
    write_bench(work / "benchmarks" / "download_images" / "src.tsv", 100.0, rss=512.0)
    write_json(work / "downloads" / "src_stats.json", {"count": 1000, "successes": 800})
    write_json(work / "manifest" / "src_stats.json", {"records": 800})
    for shard, (records, seconds) in enumerate([(100, 30.0), (300, 70.0)]):
        write_bench(work / "benchmarks" / "score_shard" / "src" / f"{shard}.tsv", seconds)
        write_json(
            work / "scored" / "src" / f"shard_{shard}_stats.json",
            {"records_in": records, "probe": {"records_in": records, "records_out": records}},
        )
        write_json(
            work / "filtered" / "src" / f"shard_{shard}_stats.json",
            {
                "records_in": records,
                "records_out": records // 4,
                "probe": {"records_in": records, "records_out": records},
            },
        )
    write_json(
        work / "merged" / "merge_stats.json",
        {"records_in": 100, "records": {"merged_output.jsonl": 100, "aes_6.jsonl": 10}},
    )
    return work


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
    assert score["wall_s"] == pytest.approx(10.0 + 0.2 * score["records_in"])
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


def caption_config(tmp_path: Path, **caption: object) -> dict:
    """A config whose every record reaches captioning: 2000 fine rows, no losses on the way."""
    folder = url_list(tmp_path / "urls", [(2048, 1536)] * 2000, files=1)
    work = tmp_path / "w"
    (work / "benchmarks").mkdir(parents=True)
    for name, records in (
        ("downloads/src_stats.json", {"count": 10, "successes": 10}),
        ("manifest/src_stats.json", {"records": 10}),
        ("dedup/dedup_stats.json", {"records_in": 10, "records_out": 10}),
        (
            "merged/merge_stats.json",
            {"records_in": 10, "records": {"merged_output.jsonl": 10, "aes_6.jsonl": 10}},
        ),
    ):
        write_json(work / name, records)
    write_json(
        work / "filtered" / "src" / "shard_0_stats.json",
        {"records_in": 10, "records_out": 10, "probe": {"records_in": 10, "records_out": 10}},
    )
    return config_for(folder, work, caption={"chunk_size": 500, **caption})


def test_a_dashscope_quota_sets_the_captioning_time(tmp_path):
    config = caption_config(tmp_path, rate_per_second=2, api_jobs=2, concurrency=8)
    caption = stage(estimate(config), "caption")
    assert caption["records_in"] == 2000
    assert caption["requests"] == 2000
    assert (caption["jobs"], caption["at_once"]) == (4, 2)
    assert caption["rate"]["basis"] == "config"
    assert caption["wall_s"] == pytest.approx(2000 / (2 * 0.98))
    assert any("retries are not counted" in note for note in caption["notes"])
    assert caption["gpu_hours"] is None


def test_a_quota_the_jobs_cannot_fill(tmp_path):
    config = caption_config(tmp_path, rate_per_second=100, api_jobs=1, concurrency=3)
    caption = stage(estimate(config), "caption")
    latency = ASSUMED["caption_answer_latency_s"]["value"]
    assert caption["rate"]["basis"] == "assumed"
    assert caption["wall_s"] == pytest.approx(2000 * latency / 3)


def test_servers_of_our_own_set_the_captioning_time(tmp_path):
    serve = {"command": "vllm serve M --port {port}", "instances": 2, "gpus": 2}
    config = caption_config(tmp_path, backend="openai", model="M", serve=serve)
    caption = stage(estimate(config), "caption")
    per_chunk = ASSUMED["serve_start_s"]["value"] + 500 / ASSUMED["serve_images_per_s"]["value"]
    assert (caption["jobs"], caption["at_once"]) == (4, 2)
    assert caption["wall_s"] == pytest.approx(2 * per_chunk)
    assert caption["gpu_hours"] == pytest.approx(4 * per_chunk * 2 / 3600)
    assert caption["requests"] == 2000
    assert caption["cost"] is None
    assert caption["rate"]["basis"] == "assumed"


def test_cost_with_and_without_a_price(tmp_path):
    result = estimate(caption_config(tmp_path, price_per_image=0.004))
    assert stage(result, "caption")["cost"] == pytest.approx(8.0)
    assert result["total"]["cost"] == pytest.approx(8.0)
    assert result["total"]["requests"] == 2000
    assert "8.00" in format_estimate(result)
    unpriced = estimate(caption_config(tmp_path / "b"))
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


def test_wall_time_and_benchmarks(tmp_path):
    assert wall_time([], 2) == 0.0
    assert wall_time([5, 3, 3, 1], None) == 5
    assert wall_time([5, 3, 3, 1], 2) == 6
    assert wall_time([5, 3, 3, 1], 1) == 12
    write_bench(tmp_path / "b.tsv", 12.5, rss=300.0)
    assert read_benchmark(tmp_path / "b.tsv") == {"s": 12.5, "max_rss": 300.0}
    assert read_benchmark(tmp_path / "missing.tsv") is None
