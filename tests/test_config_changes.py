"""Config changes between runs of the finished sample: the next run follows the new config.

Each test works on a copy of the sample's workdir, changes the merge tiers (the caption input
grows, shrinks, empties) and runs the same command again: every record of the new caption input
must be captioned or in the error file with a reason, masks, Emu3 lists, validation and counts
in step, and only records new to the input asked for (pay-once).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_snakemake, write_config
from groundset.core.io import iter_jsonl

pytestmark = [pytest.mark.workflow, pytest.mark.xdist_group("config_changes")]
BIN = os.path.dirname(sys.executable)


def keys(path: Path) -> list[tuple[str, str]]:
    """(source, image_id) of each record of a JSONL file, in order."""
    return [(r.get("source"), r["image_id"]) for r in iter_jsonl(path)]


def run_with_tiers(work: Path, tmp_path: Path, tiers: list[float]):
    """The sample's command on `work` with other merge tiers (a real run, not a dry-run)."""
    extra = write_config(
        tmp_path / f"tiers_{tiers[1]}.yaml", {"filter": {"aesthetics_tiers": tiers}}
    )
    args = ["--profile", str(ROOT / "profiles" / "local"), "--configfile", "config/sample.yaml",
            str(extra), "--config", f"workdir={work}", "--cores", "2"]  # fmt: skip
    return run_snakemake(args)


def journaled_keys(work: Path) -> set[str]:
    """Keys of every answer in the caption journals."""
    return {
        e["key"]
        for path in (work / "captioned" / "journal").glob("chunk_*.jsonl")
        for e in iter_jsonl(path)
    }


def assert_in_step(work: Path) -> dict:
    """Every stage after the merge follows merged/aes_6.jsonl (less its duplicates); returns
    the caption stats."""
    merged = keys(work / "merged" / "aes_6.jsonl")
    tier = keys(work / "dedup" / "deduped.jsonl")
    duplicates = keys(work / "dedup" / "dropped.jsonl")
    assert sorted(tier + duplicates) == sorted(merged)
    assert tier == [key for key in merged if key in set(tier)]
    captioned = keys(work / "captioned" / "captioned.jsonl")
    errors = keys(work / "captioned" / "errors.jsonl")
    assert sorted(captioned + errors) == sorted(tier)  # nothing lost, nothing twice
    assert captioned == [key for key in tier if key in set(captioned)]  # input order kept
    index = json.loads((work / "captioned" / "chunks.json").read_text())
    assert index["records"] == len(tier)
    assert Path(index["manifest"]).resolve() == (work / "dedup" / "deduped.jsonl").resolve()
    stats = json.loads((work / "captioned" / "caption_stats.json").read_text())
    assert stats["chunks"] == len(index["shards"]) and stats["records_in"] == len(tier)
    assert stats["records_out"] == len(captioned) and sum(stats["dropped"].values()) == len(errors)
    masked = keys(work / "masked" / "masked.jsonl")
    dropped = keys(work / "masked" / "dropped.jsonl")
    assert sorted(masked + dropped) == sorted(captioned)
    datalist = [r["name"] for r in iter_jsonl(work / "export" / "emu3" / "list" / "datalist.jsonl")]
    assert len(datalist) == len(masked)
    train = json.loads((work / "export" / "emu3" / "list" / "train.json").read_text())
    assert len(train["path_list"]) == len(masked)
    report = (work / "validated" / "report.txt").read_text()
    assert "violations" not in report
    assert f"captioned.jsonl: {len(captioned)} records" in report
    counts = json.loads((work / "export" / "stage_counts.json").read_text())["stages"]
    rows = {row["stage"]: row for row in counts}
    assert rows["caption"]["in"] == len(tier) and rows["caption"]["kept"] == len(captioned)
    assert rows["mask"]["in"] == len(captioned) and rows["mask"]["kept"] == len(masked)
    return stats


def mask_stats(work: Path) -> dict:
    """The mask stage's totals of the last run."""
    return json.loads((work / "masked" / "mask_stats.json").read_text())


def summary(work: Path) -> str:
    """`groundset summary` of a workdir."""
    done = subprocess.run(
        [os.path.join(BIN, "groundset"), "summary", "--workdir", str(work)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


@pytest.fixture
def sample_copy(sample_run, tmp_path) -> Path:
    """A copy of the finished sample's workdir (mtimes and Snakemake's metadata kept)."""
    work = tmp_path / "results"
    shutil.copytree(sample_run["snapshot"], work, symlinks=True)
    return work


def test_caption_input_grown_shrunk_emptied_and_restored_follows_the_config(sample_copy, tmp_path):
    work = sample_copy
    before = set(keys(work / "dedup" / "deduped.jsonl"))
    chunks_before = len(json.loads((work / "captioned" / "chunks.json").read_text())["shards"])
    # grow: a lower second tier puts more records into aes_6.jsonl (and more chunks)
    run_with_tiers(work, tmp_path, [5, 5.5])
    grown = keys(work / "dedup" / "deduped.jsonl")
    assert len(grown) > len(before)
    assert len(json.loads((work / "captioned" / "chunks.json").read_text())["shards"]) > (
        chunks_before
    )
    stats = assert_in_step(work)
    # only the records new to the input were asked for; the others came from the journals
    assert stats["requested"] == len(set(grown) - before)
    assert stats["from_journal"] == len(before)
    assert journaled_keys(work) == {f"{s}/{i}" for s, i in grown}
    # and only they were masked: the others' masks followed them into their new chunks
    assert 0 < mask_stats(work)["computed"] <= len(set(grown) - before)
    # shrink below the first run's chunk count: no stale chunk job, no IndexError
    run_with_tiers(work, tmp_path, [5, 6.5])
    shrunk = keys(work / "dedup" / "deduped.jsonl")
    assert 0 < len(shrunk) < len(before)
    stats = assert_in_step(work)
    assert stats["requested"] == 0 and stats["chunks"] < chunks_before
    assert mask_stats(work)["computed"] == 0
    # empty: no record reaches captioning; every stage says 0 and the run ends 0
    done = run_with_tiers(work, tmp_path, [5, 9.9])  # the stand-in scores stay below 9.9
    assert keys(work / "merged" / "aes_6.jsonl") == []
    stats = assert_in_step(work)
    assert stats["records_in"] == 0 and stats["chunks"] == 0 and stats["records_out"] == 0
    assert (work / "masked" / "masked.jsonl").read_text() == ""
    train = json.loads((work / "export" / "emu3" / "list" / "train.json").read_text())
    assert train["path_list"] == []
    assert json.loads((work / "export" / "stats" / "stats.json").read_text())["records"] == 0
    # dedup and the exports take zero records too: empty files, rows of zeros
    assert (work / "dedup" / "deduped.jsonl").read_text() == ""
    assert json.loads((work / "export" / "coco" / "coco.json").read_text())["images"] == []
    assert (work / "export" / "odvg" / "odvg.jsonl").read_text() == ""
    assert list((work / "export" / "wds").glob("*.tar")) == []  # (and Snakemake's timestamp)
    assert export_counts(work) == dict.fromkeys(
        ["emu3 export", "coco export", "odvg export", "webdataset export"], (0, 0)
    )
    text = summary(work)
    assert re.search(r"^caption\s+0\s+0\s+0\s", text, re.M), text
    assert "no record reached captioning" in text
    assert "Error" not in done.stdout + done.stderr
    # back to the sample's tiers: the first run's captions again, nothing asked twice
    run_with_tiers(work, tmp_path, [5, 6])
    stats = assert_in_step(work)
    assert stats["requested"] == 0 and set(keys(work / "captioned" / "captioned.jsonl")) == before
    assert mask_stats(work)["computed"] == 0


def test_summary_names_the_stand_in_as_the_caption_model(sample_run):
    text = summary(sample_run["workdir"])
    assert "caption model: stand-in (PLACEHOLDER" in text, text
    assert "qwen-vl-max via" not in text


def run_with(work: Path, tmp_path: Path, name: str, config: dict):
    """The sample's command on `work` with `config` merged over it (a real run)."""
    extra = write_config(tmp_path / f"{name}.yaml", config)
    args = ["--profile", str(ROOT / "profiles" / "local"), "--configfile", "config/sample.yaml",
            str(extra), "--config", f"workdir={work}", "--cores", "2"]  # fmt: skip
    return run_snakemake(args)


def export_counts(work: Path) -> dict[str, tuple[int, int]]:
    """The export rows of the run's counts table: {stage: (in, kept)}."""
    rows = json.loads((work / "export" / "stage_counts.json").read_text())["stages"]
    return {r["stage"]: (r["in"], r["kept"]) for r in rows if r["stage"].endswith(" export")}


def test_dedup_distance_and_export_formats_follow_the_config(sample_copy, tmp_path):
    work = sample_copy
    deduped = keys(work / "dedup" / "deduped.jsonl")
    coco = json.loads((work / "export" / "coco" / "coco.json").read_text())
    # max_distance 0: the re-encode (2 bits away) is an image of its own and is captioned, the
    # only new request; only ODVG (and Emu3) exported, as a clean run with this config
    run_with(work, tmp_path, "d0", {"caption": {"dedup": {"max_distance": 0}},
                                    "export": {"formats": ["emu3", "odvg"]}})  # fmt: skip
    grown = keys(work / "dedup" / "deduped.jsonl")
    assert len(grown) == len(deduped) + 1 and set(deduped) < set(grown)
    stats = assert_in_step(work)
    assert stats["requested"] == 1
    kinds = [r["duplicate_kind"] for r in iter_jsonl(work / "dedup" / "dropped.jsonl")]
    assert kinds == ["sha256", "sha256"]
    assert sum(1 for _ in iter_jsonl(work / "export" / "odvg" / "odvg.jsonl")) == len(grown)
    assert export_counts(work) == {"emu3 export": (6, 6), "odvg export": (6, 6)}
    report = (work / "validated" / "report.txt").read_text()
    assert "exports (emu3, odvg): images and boxes match" in report
    hashes = json.loads((work / "dedup" / "dedup_stats.json").read_text())
    assert hashes["hashed"] == 0 and hashes["hash_cache_hits"] == 8  # hashed once, in the sample
    # back to the sample's config: its files again, nothing asked twice
    run_with(work, tmp_path, "back", {})
    assert keys(work / "dedup" / "deduped.jsonl") == deduped
    assert assert_in_step(work)["requested"] == 0
    again = json.loads((work / "export" / "coco" / "coco.json").read_text())
    assert again == coco
    assert set(export_counts(work)) == {"emu3 export", "coco export", "odvg export",
                                        "webdataset export"}  # fmt: skip
    # a lost dedup output (a killed job, a deleted file) is made again by the next run
    (work / "dedup" / "dropped.jsonl").unlink()
    extra = write_config(tmp_path / "same.yaml", {})
    planned = run_snakemake(["--profile", str(ROOT / "profiles" / "local"), "--configfile",
                             "config/sample.yaml", str(extra), "--config", f"workdir={work}",
                             "-n"])  # fmt: skip
    assert re.search(r"^dedup_records\s+1$", planned.stdout, flags=re.M), planned.stdout
