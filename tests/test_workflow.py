"""The real snakemake on the workflow: lint, the bundled sample end to end, dry-runs, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import (
    RANDOM_WEIGHTS,
    ROOT,
    SAMPLE,
    STAND_IN_CAPTIONS,
    job_counts,
    run_snakemake,
    write_config,
    write_parquet,
)
from groundset.core import layout
from groundset.core.io import iter_jsonl
from groundset.core.prompts import parse_prompt, prompt_parts
from groundset.core.records import clean_caption
from groundset.core.stats import read_stats
from groundset.exports.emu3 import template
from groundset.stages.parts import part_name, read_plan
from groundset.stages.split import index_manifest, write_index
from groundset.tools.summary import stage_totals

# One xdist worker: these tests share (and some change) the sample run's workdir.
pytestmark = [pytest.mark.workflow, pytest.mark.xdist_group("sample")]
BIN = os.path.dirname(sys.executable)
PROFILE = ["--profile", str(ROOT / "profiles" / "local")]


# Jobs at the end of every plan: the mask gather and everything after it.
FINAL_JOBS = {
    "gather_masks": 1,
    "validate_outputs": 1,
    "entity_stats": 1,
    "draw_sample": 1,
    "emu3_part": 1,
    "gather_emu3": 1,
    "export_coco": 1,
    "export_odvg": 1,
    "export_wds": 1,
    "stage_counts": 1,
    "all": 1,
}
# The sample's jobs from the merge on (3 caption chunks, rebuilt from their journals).
SAMPLE_FROM_MERGE = {
    "merge_tiers": 1,
    "dedup_records": 1,
    "index_chunks": 1,
    "caption_chunk": 3,
    "gather_captions": 1,
    "mask_chunk": 3,
    **FINAL_JOBS,
}


@pytest.mark.parametrize(
    "cmd",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["snakefmt", "--check", "Snakefile", "workflow/rules"],
    ],
    ids=["ruff", "ruff-format", "snakefmt"],
)
def test_code_is_formatted_and_lint_clean(cmd):
    done = subprocess.run(
        [os.path.join(BIN, cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_snakemake_lint_is_clean():
    done = run_snakemake(["--lint", "--configfile", "config/sample.yaml"], check=False)
    assert done.returncode == 0 and "Lints for" not in done.stdout + done.stderr, (
        done.stdout + done.stderr
    )


def test_fresh_dry_run_plans_every_source_in_parallel(tmp_path):
    args = [*PROFILE, "--configfile", "config/sample.yaml", "--config", f"workdir={tmp_path}", "-n"]
    counts = job_counts(run_snakemake(args).stdout)
    assert counts == {
        "plan_parts": 2,
        "prefilter_urls": 4,  # download.part_rows 10: two parts per source
        "download_part": 4,
        "build_manifest": 4,  # per part, as the split
        "index_shards": 4,
        "merge_tiers": 1,
        "dedup_records": 1,
        "caption_preflight": 1,
        "index_chunks": 1,
        "gather_captions": 1,
        **FINAL_JOBS,
    }


def source_parts(work: Path, source: str) -> list[str]:
    """The download parts of a source's plan, in URL-list order."""
    return [part.name for part in read_plan(work / "url_lists" / f"{source}_parts.json")]


def source_records(work: Path, source: str):
    """The manifest records of a source: its parts' manifests, in plan order."""
    for part in source_parts(work, source):
        yield from iter_jsonl(work / "manifest" / source / f"{part}.jsonl")


def source_shards(work: Path, source: str) -> list[tuple[str, int, int]]:
    """(part, shard, records) of every shard of a source, its parts in plan order."""
    shards = []
    for part in source_parts(work, source):
        index = json.loads((work / "shards" / source / part / "index.json").read_text())
        shards += [(part, s["shard"], s["records"]) for s in index["shards"]]
    return shards


def sample_rows(name: str) -> pd.DataFrame:
    return pd.read_parquet(SAMPLE / f"{name}.parquet").set_index("URL")


EXPECTED = {
    # source: (rows, prefilter drops, failed downloads, failed decodes, manifest records, shard sizes)
    "laion-high-resolution": (19, {"too_small": 2, "aspect_ratio": 1}, 1, 2, 13, [8, 5]),
    # its last 3 rows are duplicates of others (same bytes, same URL, a re-encode)
    "laion-aesthetics_v2_4.75": (17, {"too_small": 2}, 1, 1, 13, [8, 5]),
}


@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_sample_counts_per_stage(sample_run, source):
    rows, drops, failed, undecodable, records, shard_sizes = EXPECTED[source]
    work = sample_run["workdir"]
    pre = stage_totals(work, layout.PREFILTER)[1][source]  # its parts' envelopes summed
    assert pre["records_in"] == rows
    assert {k: v for k, v in pre["dropped"].items() if v} == drops
    # each prefilter drop is a drop line, naming its URL-list row
    lines = [line for path in sorted((work / "url_lists" / source).glob("*_dropped.parquet"))
             for line in pq.read_table(path).to_pylist()]  # fmt: skip
    assert Counter(line["drop_reason"] for line in lines) == drops
    listed = sample_rows(source).reset_index()
    assert all(listed.loc[line["url_list_row"], "URL"] == line["url"] for line in lines)
    down = stage_totals(work, layout.DOWNLOAD)[1][source]
    assert down["records_in"] == pre["records_out"] == rows - sum(drops.values())
    assert down["dropped"] == {"failed_to_download": failed, "failed_to_resize": undecodable}
    assert down["records_out"] == records
    failures = [line for path in sorted((work / "downloads" / source).glob("*_dropped.jsonl"))
                for line in iter_jsonl(path)]  # fmt: skip
    assert Counter(line["drop_reason"] for line in failures) == +Counter(down["dropped"])
    assert all(line["detail"] and line["url_list_file"] == f"{source}.parquet" for line in failures)
    manifest = stage_totals(work, layout.MANIFEST)[1][source]
    parts = [read_stats(path) for path in (work / "manifest" / source).glob("*_stats.json")]
    assert manifest["records_out"] == records and len(parts) == 2  # part_rows 10: two parts
    assert sum(stats["failed_downloads"] for stats in parts) == failed + undecodable
    # provenance: every manifest record names its row of the URL list, and that row is its URL
    for record in source_records(work, source):
        assert record["url_list_file"] == f"{source}.parquet"
        assert listed.loc[record["url_list_row"], "URL"] == record["url"]
    shards = source_shards(work, source)  # (part, shard, records), the parts in row order
    assert [n for _, _, n in shards] == shard_sizes
    kept = 0
    for part, shard, size in shards:
        at = f"{source}/{part}/shard_{shard}"
        scores = read_stats(work / "scored" / f"{at}_stats.json")
        stats = read_stats(work / "filtered" / f"{at}_stats.json")
        assert scores["records_in"] == size and stats["records_in"] == scores["records_out"]
        assert list(stats["dropped"]) == sorted(
            [
                "image_shape_filter",
                "image_aspect_ratio_filter",
                "image_nsfw_filter",
                "image_watermark_filter",
                "image_aesthetics_filter",
            ]
        )
        filtered = list(iter_jsonl(work / "filtered" / f"{at}.jsonl"))
        assert len(filtered) == stats["records_out"]
        for record in filtered:
            s = record["__dj__stats__"]
            assert s["image_width"][0] >= 1024 and s["image_height"][0] >= 1024
            assert 0.5 <= s["aspect_ratios"][0] <= 2.0 and s["image_nsfw_score"][0] <= 0.0006
            assert (
                s["image_watermark_prob"][0] <= 0.8 and 5 <= s["image_aesthetics_scores"][0] <= 10
            )
        recipe = (work / "dj_configs" / f"{at}.yaml").read_text()
        assert "stand-in-aesthetics-predictor-v2-linear" in recipe
        assert "groundset_image_scores_filter" in recipe  # scores only: no threshold in it
        assert stats["bounds"]["image_aesthetics_filter"]["min_score"] == 5.0  # 0-10, as configured
        rejected = list(iter_jsonl(work / "rejected" / f"{at}.jsonl"))
        assert len(rejected) == sum(stats["dropped"].values())
        assert all(r["drop_stage"] == "select" and ": " in r["detail"] for r in rejected)
        assert Counter(r["drop_reason"] for r in rejected) == +Counter(stats["dropped"])
        scored = work / "scored" / f"{at}.jsonl"
        assert sum(1 for _ in iter_jsonl(scored)) == stats["records_in"]
        kept += len(filtered)
    assert kept > 0


def test_sample_merge_tiers(sample_run):
    work = sample_run["workdir"]
    filtered = [
        r
        for source in EXPECTED
        for path in sorted((work / "filtered" / source).glob("*/shard_?.jsonl"))
        for r in iter_jsonl(path)
    ]
    low = list(iter_jsonl(work / "merged" / "merged_output.jsonl"))
    high = list(iter_jsonl(work / "merged" / "aes_6.jsonl"))
    assert len(low) == len(filtered) > len(high) > 0
    assert all(max(r["__dj__stats__"]["image_aesthetics_scores"]) >= 6 for r in high)
    keys = [(r["source"], r["image_id"]) for r in low]
    assert len(keys) == len(set(keys))  # no duplicates
    assert {(r["source"], r["image_id"]) for r in high} == {
        (r["source"], r["image_id"])
        for r in filtered
        if r["__dj__stats__"]["image_aesthetics_scores"][0] >= 6
    }


def test_changing_a_tier_reruns_only_the_merge_and_what_follows(sample_run, tmp_path):
    tiers = write_config(tmp_path / "tiers.yaml", {"filter": {"aesthetics_tiers": [5, 5.5]}})
    args = [
        *PROFILE,
        "--configfile",
        "config/sample.yaml",
        str(tiers),
        "--config",
        f"workdir={sample_run['workdir']}",
        "-n",
    ]
    # no filter job; the captions downstream are rebuilt from their journals (no requests)
    assert job_counts(run_snakemake(args).stdout) == SAMPLE_FROM_MERGE


def download_status(work: Path, source: str) -> Counter:
    """img2dataset's status counts of a source, its parts' summed."""
    parts = (work / "downloads" / source).glob("*_stats.json")
    return sum((Counter(read_stats(path)["status"]) for path in parts), Counter())


def test_sample_broken_urls_fail_with_their_reasons(sample_run):
    down = download_status(sample_run["workdir"], "laion-high-resolution")
    assert down["HTTP Error 404: not found"] == 1
    aes = download_status(sample_run["workdir"], "laion-aesthetics_v2_4.75")
    assert any("502" in reason and "unreachable" in reason for reason in aes)
    urls = {r["url"] for r in source_records(sample_run["workdir"], "laion-high-resolution")}
    for broken in (
        "missing.jpg",
        "empty.jpg",
        "not_an_image.jpg",
        "astronaut.jpg",
        "coffee_wide_2200x1024.jpg",
    ):
        assert f"http://sample.groundset.invalid/img/{broken}" not in urls
    assert (
        "http://sample.groundset.invalid/img/chelsea.jpg" in urls
    )  # no size metadata: kept for later filters


@pytest.mark.parametrize("source", sorted(EXPECTED))
def test_sample_manifest_records_match_the_url_list(sample_run, source):
    work = sample_run["workdir"]
    rows = sample_rows(source)
    extra = "LANGUAGE" if source == "laion-high-resolution" else "AESTHETIC_SCORE"
    records = list(source_records(work, source))
    for record in records:
        row = rows.loc[record["url"]]
        assert record["source"] == source and record["text"] == row["TEXT"]
        image = record["image"][0]
        assert os.path.isabs(image) and os.path.isfile(image)
        part = Path(image).parent.parent.name  # downloads/<source>/<part>/00000/<key>.jpg
        assert image.startswith(str(work / "downloads" / source / part))
        assert record["image_id"] == f"{part}_{os.path.basename(image)[:-4]}"
        assert list(record["meta"]) == ["similarity", "hash", "punsafe", "pwatermark", extra]
        for key, value in record["meta"].items():
            assert value == row[key], (record["url"], key)
        if record["url"].endswith(".jpg") and "cmyk" not in record["url"]:
            original = SAMPLE / "www" / "img" / record["url"].rsplit("/", 1)[1]
            assert Path(image).read_bytes() == original.read_bytes()  # no re-encode
    for part in source_parts(work, source):  # each part's shards are its manifest, cut
        shards = b"".join((work / "shards" / source / part / f"shard_{shard}.jsonl").read_bytes()
                          for p, shard, _ in source_shards(work, source) if p == part)  # fmt: skip
        assert shards == (work / "manifest" / source / f"{part}.jsonl").read_bytes()


def test_download_speed_knobs_rerun_nothing_and_output_keys_redo_the_downloads(
    sample_run, tmp_path
):
    def planned(download: dict) -> dict:
        """The jobs a dry-run of the finished sample plans with these `download:` changes."""
        override = write_config(tmp_path / "download.yaml", {"download": download})
        args = list(sample_run["args"])
        args.insert(args.index("config/sample.yaml") + 1, str(override))
        done = run_snakemake([*args, "-n"])
        return job_counts(done.stdout)

    knobs = {"processes_count": 3, "thread_count": 7, "enable_wandb": True,
             "prefilter": {"batch_rows": 100}}  # fmt: skip
    assert planned(knobs) == {}
    redone = planned({"image_size": 512})
    assert redone.get("download_part") == 4 and "prefilter_urls" not in redone, redone
    assert planned({"prefilter": {"max_punsafe": 0.5}}).get("prefilter_urls") == 4


def test_rerun_after_completion_does_nothing(sample_run):
    done = run_snakemake([*sample_run["args"], "-n"])
    assert "Nothing to be done" in done.stdout + done.stderr


@pytest.fixture
def private_sample(sample_run, tmp_path) -> dict:
    """A copy of the finished sample (its snapshot) for a test that changes and reruns it, so
    that no other test, on any xdist worker, sees the shared workdir mid-run."""
    work = tmp_path / "results"
    shutil.copytree(sample_run["snapshot"], work, symlinks=True)
    args = [f"workdir={work}" if a.startswith("workdir=") else a for a in sample_run["args"]]
    return {"workdir": work, "args": args}


def test_deleting_one_shard_reruns_only_that_shard(private_sample):
    work = private_sample["workdir"]
    before = (work / "merged" / "merged_output.jsonl").read_bytes()
    part, shard, _ = source_shards(work, "laion-high-resolution")[1]  # its second shard
    at = f"laion-high-resolution/{part}/shard_{shard}.jsonl"
    for folder in ("shards", "scored", "filtered"):
        (work / folder / at).unlink()
    done = run_snakemake([*private_sample["args"], "-n"])
    assert job_counts(done.stdout) == {
        "score_shard": 1,
        "select_shard": 1,
        **SAMPLE_FROM_MERGE,
    }, re.findall(r"reason: .*", done.stdout)
    assert f"filtered/{at}" in done.stdout
    journals = sorted((work / "captioned" / "journal").glob("chunk_*.jsonl"))
    paid = [path.read_bytes() for path in journals]
    captions = (work / "captioned" / "captioned.jsonl").read_bytes()
    run_snakemake(private_sample["args"])
    # the captions come from the journals: no new answer was asked for
    assert [path.read_bytes() for path in journals] == paid
    assert (work / "captioned" / "captioned.jsonl").read_bytes() == captions
    assert "Nothing to be done" in run_snakemake([*private_sample["args"], "-n"]).stdout
    assert (
        work / "merged" / "merged_output.jsonl"
    ).read_bytes() == before  # same records, no duplicates


def test_killed_filter_job_reruns_cleanly(private_sample):
    """SIGKILL snakemake while data-juicer scores a shard; --rerun-incomplete restores the same outputs."""
    work = private_sample["workdir"]
    before = {
        name: (work / "merged" / name).read_bytes()
        for name in ("merged_output.jsonl", "aes_6.jsonl")
    }
    part, shard, _ = source_shards(work, "laion-high-resolution")[0]
    at = work / "scored" / "laion-high-resolution" / part / f"shard_{shard}"
    (work / "filtered" / "laion-high-resolution" / part / f"shard_{shard}.jsonl").unlink()
    at.with_suffix(".jsonl").unlink()
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(ROOT / "Snakefile"),
        *private_sample["args"],
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    work_dir = at.with_name(f"{at.name}_work")
    deadline = time.time() + 120
    while not any(work_dir.glob("*/logs")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # data-juicer has started on the shard
    assert proc.poll() is None, "snakemake finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not at.with_suffix(".jsonl").exists()
    run_snakemake([*private_sample["args"], "--unlock"])  # a SIGKILL leaves snakemake's lock behind
    run_snakemake([*private_sample["args"], "--rerun-incomplete"])
    for name, content in before.items():
        assert (work / "merged" / name).read_bytes() == content, name
    assert not work_dir.exists()


def test_summary_command_prints_counts(sample_run):
    done = subprocess.run(
        [os.path.join(BIN, "groundset"), "summary", "--workdir", str(sample_run["workdir"])],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    assert re.search(r"^manifest\s+[\d,]+\s+26\s", out, re.M), out  # 13 of each source
    for source in EXPECTED:  # and a line for each source under it
        assert re.search(rf"^  {re.escape(source)}\s+[\d,]+\s+13\s", out, re.M), out
    assert "RANDOM stand-in models" in out and re.search(r"^aes_6 tier\s", out, re.M)
    assert "PLACEHOLDERS from groundset's loopback stand-in server" in out
    assert re.search(r"^caption\s+5\s+5\s+0\s", out, re.M), out
    assert "SAM2 with RANDOM weights" in out and re.search(r"^mask\s+5\s+5\s", out, re.M)
    assert "caption model: stand-in (PLACEHOLDER captions" in out
    assert "sample_server: images come from the bundled sample's loopback server" in out


def test_sample_duplicates_are_dropped_before_captioning(sample_run):
    work = sample_run["workdir"]
    tier = list(iter_jsonl(work / "merged" / "aes_6.jsonl"))
    kept = list(iter_jsonl(work / "dedup" / "deduped.jsonl"))
    dropped = list(iter_jsonl(work / "dedup" / "dropped.jsonl"))
    url = {f"{r['source']}/{r['image_id']}": r["url"].rsplit("/", 1)[-1] for r in tier}
    # the sample's three duplicates, each pointing at the image that stays (the same bytes,
    # the same URL in the other list, a re-encode 2 phash bits away)
    assert sorted(
        (url[f"{r['source']}/{r['image_id']}"], url[r["duplicate_of"]], r["duplicate_kind"])
        for r in dropped
    ) == [  # fmt: skip
        ("coffee_copy.jpg", "coffee_1536x1024.jpg", "sha256"),
        ("gen_animated_1024.gif", "gen_animated_1024.gif", "sha256"),
        ("gen_cmyk_reencoded.jpg", "gen_cmyk_1200x1024.jpg", "phash"),
    ]
    assert all(r["drop_stage"] == "dedup" for r in dropped)
    assert len(kept) == 5 and len(tier) == 8
    assert [r["image_id"] for r in kept] == [
        r["image_id"] for r in tier if f"{r['source']}/{r['image_id']}" not in
        {f"{d['source']}/{d['image_id']}" for d in dropped}
    ]  # fmt: skip
    stats = json.loads((work / "dedup" / "dedup_stats.json").read_text())
    assert (
        stats["records_in"] == 8
        and stats["records_out"] == 5
        and sum(stats["dropped"].values()) == 3
    )
    # 3 paid requests saved: one per image, none for a duplicate
    journaled = [
        e["key"]
        for path in (work / "captioned" / "journal").glob("chunk_*.jsonl")
        for e in iter_jsonl(path)
    ]
    assert sorted(journaled) == sorted(f"{r['source']}/{r['image_id']}" for r in kept)
    # `groundset trace` says why a duplicate is not in the dataset; an unknown key exits 1
    copy = next(r for r in dropped if r["url"].endswith("coffee_copy.jpg"))
    traced = subprocess.run(
        [os.path.join(BIN, "groundset"), "trace", "--config", "config/sample.yaml",
         "--workdir", str(sample_run["snapshot"]), f"{copy['source']}/{copy['image_id']}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert traced.returncode == 0, traced.stderr
    assert re.search(r"^dedup\s+dropped\s+reason: duplicate of " + re.escape(
        copy["duplicate_of"]), traced.stdout, flags=re.M)  # fmt: skip
    assert re.search(r"^caption\s+not reached", traced.stdout, flags=re.M)
    unknown = subprocess.run(
        [os.path.join(BIN, "groundset"), "trace", "--config", "config/sample.yaml",
         "--workdir", str(sample_run["snapshot"]), f"{copy['source']}/999999"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert unknown.returncode == 1 and "unknown to every stage" in unknown.stderr


def test_sample_captions(sample_run):
    work = sample_run["workdir"]
    tier = [json.loads(line) for line in (work / "dedup" / "deduped.jsonl").open()]
    records = [json.loads(line) for line in (work / "captioned" / "captioned.jsonl").open()]
    assert [r["image_id"] for r in records] == [r["image_id"] for r in tier] and len(tier) == 5
    for record, before in zip(records, tier, strict=True):
        assert {k: record[k] for k in before} == before  # every upstream field kept
        assert record["caption"].startswith("[placeholder caption")
        assert record["entities"] and all(
            0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            for entity in record["entities"]
            for x1, y1, x2, y2 in entity["bboxes"]
        )
    index = json.loads((work / "captioned" / "chunks.json").read_text())
    assert [c["records"] for c in index["shards"]] == [2, 2, 1]
    journaled = [
        json.loads(line)
        for path in sorted((work / "captioned" / "journal").glob("chunk_*.jsonl"))
        for line in path.open()
    ]
    assert sorted(e["key"] for e in journaled) == sorted(
        f"{r['source']}/{r['image_id']}" for r in tier
    )
    assert all(e["status"] == "answered" and e["answer"] for e in journaled)
    stats = json.loads((work / "captioned" / "caption_stats.json").read_text())
    assert stats["stand_in"] is True and stats["records_out"] == 5 and stats["chunks"] == 3
    assert (stats["stage"], stats["records_in"], stats["dropped"]) == ("caption", 5, {})
    assert (work / "captioned" / "errors.jsonl").read_text() == ""
    preflight = json.loads((work / "captioned" / "preflight.json").read_text())
    assert preflight["endpoint"] == "loopback stand-in"
    assert "PLACEHOLDERS" in (work / "logs" / "caption_chunk" / "0.log").read_text()


def test_sample_masks(sample_run):
    work = sample_run["workdir"]
    captioned = [json.loads(line) for line in (work / "captioned" / "captioned.jsonl").open()]
    masked = [json.loads(line) for line in (work / "masked" / "masked.jsonl").open()]
    assert [r["image_id"] for r in masked] == [r["image_id"] for r in captioned]
    chunks = json.loads((work / "captioned" / "chunks.json").read_text())["shards"]
    chunk_of = [chunk["shard"] for chunk in chunks for _ in range(chunk["records"])]
    for record, before, chunk in zip(masked, captioned, chunk_of, strict=True):
        boxes = [(e["entity"], b) for e in before["entities"] for b in e["bboxes"]]
        assert [(e["entity"], e["bbox"]) for e in record["entities"]] == boxes
        assert record["image"] == before["image"][0]
        masks = np.load(record["mask_file"])
        width, height = (
            before["__dj__stats__"]["image_width"][0],
            before["__dj__stats__"]["image_height"][0],
        )
        assert masks.dtype == bool and masks.shape == (len(boxes), height, width)
        assert len(record["mask_scores"]) == len(boxes) == len(record["mask_inside_fraction"])
        # in its chunk's declared folder, a hard link of the mask in the store of all chunks
        name = Path(record["source"]) / f"{record['image_id']}.npy"
        assert record["mask_file"] == str(work / "masks" / f"chunk_{chunk}" / name)
        assert Path(record["mask_file"]).samefile(work / "masked" / "store" / name)
    stats = json.loads((work / "masked" / "mask_stats.json").read_text())
    assert stats["records_out"] == 5 and stats["random_weights"] is True and stats["chunks"] == 3
    stats = json.loads((work / "export" / "stats" / "stats.json").read_text())
    assert stats["records"] == 5 and stats["boxes"] == 10 and "mask_score.png" in stats["plots"]
    assert all(
        (work / "export" / "stats" / "plots" / name).stat().st_size > 1000
        for name in stats["plots"]
    )
    drawn = sorted(p.name for p in (work / "export" / "draw").rglob("*.jpg"))
    assert len(drawn) == 5 and len(list((work / "export" / "draw_sam2_mask").rglob("*.png"))) == 5
    report = (work / "validated" / "report.txt").read_text()
    assert "masked.jsonl: 5 records (masked=5), all valid" in report
    assert "captioned.jsonl: 5 records (captioned=5), all valid" in report


def test_sample_emu3_export(sample_run):
    import torch

    work = sample_run["workdir"]
    masked = [json.loads(line) for line in (work / "masked" / "masked.jsonl").open()]
    train = json.loads((work / "export" / "emu3" / "list" / "train.json").read_text())
    assert train["prefix"] == str(work / "export" / "emu3" / "feature")
    # relative to the prefix: in the declared folder of the one part (export.emu3.parts: 1)
    assert train["path_list"] == [f"part_0/{r['source']}/{r['image_id']}.pth" for r in masked]
    for name, record in zip(train["path_list"], masked, strict=True):
        data = torch.load(os.path.join(train["prefix"], name))  # as Emu3FeatureDataset does
        caption = clean_caption(record["caption"])  # the stand-in's "[placeholder …]" too
        assert data["texts"].startswith(caption + "\nPrecise location control:\n\n")
        assert data["texts"].count("Entity: [") == len(record["entities"])
        assert parse_prompt(data["texts"], *template()) == prompt_parts(record, template()[0])
        width, height = (
            record["__dj__stats__"]["image_width"][0],
            record["__dj__stats__"]["image_height"][0],
        )
        rows, cols = data["images"].shape  # 16384 px area, 2x downsampling of the stand-in
        assert abs(rows * cols * 4 - 16384) / 16384 < 0.1
        assert abs((cols / rows) / (width / height) - 1) < 0.1
    # every datalist line names its URL-list row, as its masked record does
    datalist = list(iter_jsonl(work / "export" / "emu3" / "list" / "datalist.jsonl"))
    assert [(d["url_list_file"], d["url_list_row"]) for d in datalist] == [
        (r["url_list_file"], r["url_list_row"]) for r in masked
    ]
    stats = json.loads((work / "export" / "emu3" / "emu3_stats.json").read_text())
    assert stats["train_items"] == 5 and stats["stand_in_tokenizer"] is True
    assert "random_emu3_tokenizer" in run_cli(["summary", "--workdir", str(work)])


def run_cli(args: list[str]) -> str:
    """`groundset ARGS` in a subprocess; its stdout."""
    done = subprocess.run(
        [os.path.join(BIN, "groundset"), *args], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def report_parts(path: Path) -> dict[str, str]:
    """The HTML pages embedded in a Snakemake report, by file name (base64 data URIs)."""
    import base64

    text = path.read_text()
    found = re.findall(
        r"data:text/html;charset=[^;]*;filename=([^;]+);base64,([A-Za-z0-9+/=]+)", text
    )
    return {name: base64.b64decode(data).decode() for name, data in found}


def test_sample_report_names_every_stage_with_its_counts(sample_run, tmp_path):
    report = tmp_path / "report.html"
    run_snakemake([*sample_run["args"], "--report", str(report)])
    text = report.read_text()
    for entry in ("export/stats/plots", "export/draw", "export/draw_sam2_mask"):
        assert entry in text
    table = report_parts(report)["stage_counts.html"]
    rows = re.findall(
        r"<tr><td>([^<]+)</td><td>([\d,]+)</td><td>([\d,]+)</td><td>([\d,]+)</td>", table
    )
    counts = {
        stage: (int(n_in.replace(",", "")), int(kept.replace(",", "")))
        for stage, n_in, kept, _ in rows
    }
    stages = [
        "prefilter",
        "download",
        "manifest",
        "score",
        "select",
        "merge",
        "aes_6 tier",
        "dedup",
        "caption",
        "mask",
        "emu3 export",
        "coco export",
        "odvg export",
        "webdataset export",
    ]
    assert list(counts) == stages
    assert all(n_in > 0 and kept > 0 and kept <= n_in for n_in, kept in counts.values()), counts
    assert counts["emu3 export"] == (5, 5) and counts["prefilter"][0] == 36
    assert counts["coco export"] == counts["odvg export"] == counts["webdataset export"] == (5, 5)
    assert "RANDOM" in table  # the stand-ins are named in the report too
    summary = json.loads((sample_run["workdir"] / "export" / "stage_counts.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == stages


BIG_PART = part_name("urls.parquet", 0, 1)  # the one download part of _lay_down_manifest's list


def _lay_down_manifest(tmp_path, records: int) -> dict:
    """A config whose upstream outputs exist, with a manifest of `records` lines (no download)."""
    url_list = write_parquet(tmp_path / "urls.parquet", [{"URL": "http://x/a.jpg", "TEXT": "t"}])
    os.utime(url_list, (time.time() - 200, time.time() - 200))
    work = tmp_path / "results"
    config = {
        "workdir": str(work),
        "sources": [{"name": "big", "url_list": str(url_list), "save_additional_columns": []}],
        "shard_size": 10,
        **STAND_IN_CAPTIONS,
        **RANDOM_WEIGHTS,
    }
    part = BIG_PART
    paths = [
        "url_lists/big_parts.json",
        f"url_lists/big/{part}.parquet",
        f"url_lists/big/{part}_stats.json",
        f"url_lists/big/{part}_dropped.parquet",
        f"downloads/big/{part}_stats.json",
        f"downloads/big/{part}_dropped.jsonl",
        f"manifest/big/{part}_stats.json",
        f"manifest/big/{part}_dropped.jsonl",
        f"manifest/big/{part}.jsonl",
    ]
    for i, rel in enumerate(paths):
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".jsonl"):
            path.write_text(
                "".join(json.dumps({"image_id": f"{j:09d}"}) + "\n" for j in range(records))
            )
        else:
            path.write_text("{}")
        stamp = time.time() - 100 + i  # upstream first, all in the past
        os.utime(path, (stamp, stamp))
    return {"config": write_config(tmp_path / "big.yaml", config), "work": work}


def test_dry_run_lists_one_job_per_shard_after_the_split(tmp_path):
    laid = _lay_down_manifest(tmp_path, 1180)
    args = [*PROFILE, "--configfile", str(laid["config"]), "--cores", "1"]
    before = run_snakemake([*args, "-n"]).stdout
    assert job_counts(before).get("index_shards") == 1 and "download_part" not in job_counts(before)
    run_snakemake([*args, "--until", "index_shards"])
    index = json.loads((laid["work"] / "shards" / "big" / BIG_PART / "index.json").read_text())
    assert len(index["shards"]) == 118
    counts = job_counts(run_snakemake([*args, "-n"]).stdout)
    assert counts == {
        "score_shard": 118,  # one job per shard: slice, probe, recipe, data-juicer's scores
        "select_shard": 118,  # the thresholds (local, cheap)
        "merge_tiers": 1,
        "dedup_records": 1,
        "caption_preflight": 1,
        "index_chunks": 1,
        "gather_captions": 1,
        **FINAL_JOBS,
    }


# The per-item jobs of the filter, mask and Emu3 stages, with the files each reads and writes.
ITEM_JOBS = {
    "score_shard": (
        [f"shards/big/{BIG_PART}/index.json"],
        [
            f"shards/big/{BIG_PART}/shard_0.jsonl",
            f"probed/big/{BIG_PART}/shard_0.jsonl",
            f"probed/big/{BIG_PART}/shard_0_dropped.jsonl",
            f"dj_configs/big/{BIG_PART}/shard_0.yaml",
            f"scored/big/{BIG_PART}/shard_0.jsonl",
            f"scored/big/{BIG_PART}/shard_0_stats.json",
        ],
    ),
    "select_shard": (
        [],
        [
            f"filtered/big/{BIG_PART}/shard_0.jsonl",
            f"rejected/big/{BIG_PART}/shard_0.jsonl",
            f"filtered/big/{BIG_PART}/shard_0_stats.json",
        ],
    ),
    "mask_chunk": (
        ["captioned/chunk_0.jsonl"],
        [
            "masked/chunk_0.jsonl",
            "masked/chunk_0_dropped.jsonl",
            "masked/chunk_0_stats.json",
            "masks/chunk_0/",
        ],
    ),
    "emu3_part": (
        ["masked/masked.jsonl"],
        [
            "export/emu3/list/parts/part_0.jsonl",
            "export/emu3/list/parts/error_0.jsonl",
            "export/emu3/list/parts/stats_0.json",
            "export/emu3/feature/part_0/",
        ],
    ),
    "gather_emu3": (
        [],
        [
            "export/emu3/list/datalist.jsonl",
            "export/emu3/list/train.json",
            "export/emu3/list/error.jsonl",
            "export/emu3/list/prompts.json",
            "export/emu3/emu3_stats.json",
        ],
    ),
}
# Tuning knobs of those jobs: changing them all at once must plan nothing.
KNOBS = {
    "filter": {
        "np": 3,
        "batch_size": 5,
        "device": "cpu",
        "gpus": 1,
        "nsfw": {"mem_required": "2GB"},
        "watermark": {"mem_required": "2GB"},
        "aesthetics": {"mem_required": "3GB"},
    },
    "mask": {"batch_size": 3, "device": "cpu", "decode_workers": 3, "gpus": 0},
    "export": {"emu3": {"batch_size": 3, "device": "cpu", "decode_workers": 3, "gpus": 0}},
}


def test_tuning_knobs_mark_no_filter_mask_or_emu3_job_stale(tmp_path):
    laid = _lay_down_manifest(tmp_path, 3)
    work = laid["work"]
    stamp = time.time() - 50
    for inputs, outputs in ITEM_JOBS.values():  # inputs first, then outputs, all in the past
        for rel in [*inputs, *outputs]:
            path = work / rel
            if rel.endswith("/"):
                path.mkdir(parents=True)
            elif rel.endswith("index.json"):  # read while planning: the manifest's one shard
                write_index(
                    index_manifest(work / "manifest" / "big" / f"{BIG_PART}.jsonl", 10), path
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            stamp += 1
            os.utime(path, (stamp, stamp))
    targets = [
        f"filtered/big/{BIG_PART}/shard_0.jsonl",
        "masked/chunk_0.jsonl",
        "export/emu3/list/train.json",
    ]
    args = [*PROFILE, "--cores", "1", *targets, "--allowed-rules", *ITEM_JOBS]

    def stale(*overrides: dict) -> set[str]:
        """The rules whose jobs a dry-run with `overrides` reruns for their params (or code)."""
        files = [
            str(write_config(tmp_path / f"override_{i}.yaml", override))
            for i, override in enumerate(overrides)
        ]
        done = run_snakemake([*args, "--configfile", str(laid["config"]), *files, "-n"])
        out = done.stdout + done.stderr
        if "Nothing to be done" in out:
            return set()
        triggered = re.search(r"Rules with provenance triggered jobs: (.+)", out)
        assert triggered, out  # the jobs of a changed output key are planned for it
        return set(triggered[1].strip().split(", "))

    # record what each job ran with (its params), as a real run does
    run_snakemake([*args, "--configfile", str(laid["config"]), "--touch", "--forcerun", *ITEM_JOBS])
    assert stale() == set()
    models_home = tmp_path / "models"
    models_home.mkdir()
    knobs = {**KNOBS, "filter": {**KNOBS["filter"], "models_home": str(models_home)}}
    assert stale(knobs) == set()  # every knob changed: nothing is planned
    # a threshold reruns the cheap select only; what the scores depend on, the score job
    assert stale({"filter": {"nsfw": {"max_score": 0.001}}}) == {"select_shard"}
    assert stale({"filter": {"aesthetics": {"min_score": 4.5}}}) == {"select_shard"}
    assert stale({"filter": {"image_shape": {"min_width": 800}}}) == {"select_shard"}
    assert stale({"filter": {"precision": "fp32"}}) == {"score_shard"}
    assert stale({"filter": {"nsfw": {"model": "other/nsfw"}}}) == {"score_shard"}
    assert stale({"mask": {"mask_format": "rle"}}) == {"mask_chunk"}
    assert stale({"mask": {"min_score": 0.5}}) == set()  # a floor: the gather only, no mask job
    assert stale({"export": {"emu3": {"image_area": 4096}}}) == {"emu3_part"}  # and its gather


def test_a_part_added_later_leaves_the_scored_shards_as_they_are(tmp_path):
    """A URL-list file added to a source scored up to its select: the new part's jobs are
    planned up to its own split, and not one score job of the part already scored."""
    laid = _lay_down_manifest(tmp_path, 3)
    work = laid["work"]
    stamp = time.time() - 50
    for rel in [*ITEM_JOBS["score_shard"][0], *ITEM_JOBS["score_shard"][1],
                *ITEM_JOBS["select_shard"][1]]:  # fmt: skip
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("index.json"):
            write_index(index_manifest(work / "manifest" / "big" / f"{BIG_PART}.jsonl", 10), path)
        else:
            path.write_text("{}\n")
        stamp += 1
        os.utime(path, (stamp, stamp))
    args = [*PROFILE, "--cores", "1", "-n", "--until", "merge_tiers"]
    before = job_counts(run_snakemake([*args, "--configfile", str(laid["config"])]).stdout)
    assert "score_shard" not in before and "download_part" not in before, before
    # the URL list becomes the folder holding urls.parquet and a new file: its part keeps its name
    write_parquet(tmp_path / "new.parquet", [{"URL": "http://x/b.jpg", "TEXT": "t"}])
    config = yaml.safe_load(laid["config"].read_text())
    config["sources"][0]["url_list"] = str(tmp_path)
    grown = write_config(tmp_path / "grown.yaml", config)
    after = job_counts(run_snakemake([*args, "--configfile", str(grown)]).stdout)
    # (plan_parts too in a real run: the plan laid down here has no record of its params)
    assert after == {"prefilter_urls": 1, "download_part": 1, "build_manifest": 1,
                     "index_shards": 1, "merge_tiers": 1}, after  # fmt: skip


def test_config_errors_stop_before_any_job(tmp_path):
    config = {
        "sources": [{"name": "s", "url_list": "x.parquet"}],
        "shard_size": "many",
        "workdir": str(tmp_path / "results"),
        **STAND_IN_CAPTIONS,
        **RANDOM_WEIGHTS,
    }
    done = run_snakemake(
        [*PROFILE, "--configfile", str(write_config(tmp_path / "c.yaml", config)), "-n"],
        check=False,
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "shard_size" in out and "'many' is not of type 'integer'" in out
    assert not (tmp_path / "results").exists()


def test_missing_url_list_is_named(tmp_path):
    config = {
        "sources": [{"name": "s", "url_list": str(tmp_path / "nowhere.parquet")}],
        "workdir": str(tmp_path / "results"),
        **STAND_IN_CAPTIONS,
        **RANDOM_WEIGHTS,
    }
    done = run_snakemake(
        [*PROFILE, "--configfile", str(write_config(tmp_path / "c.yaml", config)), "-n"],
        check=False,
    )
    out = done.stdout + done.stderr
    # the download parts are planned from the list's footers: a missing list stops the run first
    assert done.returncode != 0 and "sources[0].url_list (s): URL list" in out
    assert f"{tmp_path / 'nowhere.parquet'} does not exist" in out and "Traceback" not in out


def test_url_list_without_url_column_fails_naming_file_and_column(tmp_path):
    url_list = write_parquet(tmp_path / "nourl.parquet", [{"url": "http://x/a.jpg", "TEXT": "t"}])
    config = {
        "sources": [{"name": "s", "url_list": str(url_list), "save_additional_columns": []}],
        "workdir": str(tmp_path / "results"),
        **STAND_IN_CAPTIONS,
        **RANDOM_WEIGHTS,
    }
    done = run_snakemake(
        [*PROFILE, "--configfile", str(write_config(tmp_path / "c.yaml", config)), "--cores", "1"],
        check=False,
    )
    assert done.returncode != 0
    # the config check reads the list's footer: the run stops before any job, one line naming
    # the source, the file and the column
    out = done.stdout + done.stderr
    assert re.search(r"^sources\[0\].url_list \(s\): .*nourl.parquet: missing column\(s\) \['URL'\]",
                     out, flags=re.M), out  # fmt: skip
    assert "Traceback" not in out and "Job stats" not in out
    assert not (tmp_path / "results" / "url_lists").exists()
