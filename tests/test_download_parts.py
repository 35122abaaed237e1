"""A source that grows and shrinks: the download parts of the real workflow (img2dataset over the
sample's loopback server), driven by the snakemake CLI."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, job_counts, run_snakemake, write_config
from groundset.stages.parts import plan_parts, read_plan
from groundset.tools.summary import collect

SOURCE = "laion-high-resolution"
SAMPLE = ROOT / "tests" / "data" / "sample"
PLAN = f"url_lists/{SOURCE}_parts.json"


def targets(urls) -> list[str]:
    """The plan and every part's manifest of the URL list `urls` (parts of 5 rows)."""
    return [PLAN, *(f"manifest/{SOURCE}/{part.name}.jsonl" for part in plan_parts(urls, 5))]


def config_for(tmp_path, url_list) -> list[str]:
    """Snakemake arguments: the sample's config with one source reading `url_list`, in parts
    of 5 rows, run up to the manifest."""
    sample = yaml.safe_load((ROOT / "config" / "sample.yaml").read_text())
    source = {**sample["sources"][0], "url_list": str(url_list)}
    config = {**sample, "sources": [source], "download": {**sample["download"], "part_rows": 5}}
    path = write_config(tmp_path / f"config_{url_list.name}.yaml", config)
    return [
        "--profile",
        str(ROOT / "profiles" / "local"),
        "--configfile",
        str(path),
        "--cores",
        "2",
    ]


def split_sample(folder, cut: int) -> tuple:
    """The sample's URL list as two files of `folder`: rows [0, cut) and [cut, end)."""
    table = pq.read_table(SAMPLE / f"{SOURCE}.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    first, second = folder / "a.parquet", folder / "b.parquet"
    pq.write_table(table.slice(0, cut), first)
    pq.write_table(table.slice(cut), second)
    return first, second


def manifest(workdir) -> list[tuple]:
    """What the parts' manifests say of each image, in plan order, paths left out (the workdirs
    differ)."""
    parts = read_plan(workdir / PLAN)
    lines = [line for part in parts
             for line in (workdir / f"manifest/{SOURCE}/{part.name}.jsonl").read_text().splitlines()]  # fmt: skip
    keys = ("image_id", "url", "url_list_file", "url_list_row", "width", "height")
    return [tuple(json.loads(line).get(k) for k in keys) for line in lines]


@pytest.mark.xdist_group("download_parts")
def test_a_file_added_downloads_only_itself_and_a_file_removed_leaves(tmp_path):
    urls = tmp_path / "urls"
    first, second = split_sample(urls, 10)
    second.rename(tmp_path / "b.parquet")  # not listed yet
    work = tmp_path / "grown"
    args = [*config_for(tmp_path, urls), "--config", f"workdir={work}"]
    done = run_snakemake([*targets(urls), *args])
    assert job_counts(done.stdout + done.stderr)["download_part"] == 2
    old_parts = sorted(p.name for p in (work / "downloads" / SOURCE).glob("*_stats.json"))
    stamps = {p: (work / "downloads" / SOURCE / p).stat().st_mtime_ns for p in old_parts}

    (tmp_path / "b.parquet").rename(second)  # the source grows by one file: two parts
    planned = run_snakemake([*targets(urls), *args, "-n"])
    counts = job_counts(planned.stdout + planned.stderr)
    assert counts == {"plan_parts": 1, "prefilter_urls": 2, "download_part": 2,
                      "build_manifest": 2}  # fmt: skip
    run_snakemake([*targets(urls), *args])
    assert {p: (work / "downloads" / SOURCE / p).stat().st_mtime_ns for p in old_parts} == stamps

    clean = tmp_path / "clean"
    run_snakemake([*targets(urls), *config_for(tmp_path, urls), "--config", f"workdir={clean}"])
    assert manifest(work) == manifest(clean)
    rows = {(r[2], r[3]) for r in manifest(work)}
    assert {name for name, _ in rows} == {"a.parquet", "b.parquet"}
    # every URL-list row ends in one place: a prefilter drop, a download drop or a record
    summary = {row["stage"]: row for row in collect(work)["stages"]}
    assert summary["prefilter"]["in"] == pq.read_metadata(SAMPLE / f"{SOURCE}.parquet").num_rows
    assert summary["download"]["in"] == summary["prefilter"]["kept"]
    assert summary["manifest"]["kept"] == len(rows)

    first.unlink()  # the source shrinks: a.parquet's parts leave the plan
    run_snakemake([*targets(urls), *args])
    assert {r[2] for r in manifest(work)} == {"b.parquet"}
    after = {row["stage"]: row for row in collect(work)["stages"]}
    assert after["download"]["in"] < summary["download"]["in"]
