"""groundset.tools.trace: one image's verdict at every stage, read from a workdir in the stages' formats.

The workdir is made by the stages' own functions where they are cheap (prefilter, manifest,
split, select, merge, mask floors) and written in their formats where they need models
(img2dataset's shard tables, probe, scores, dedup, captions, exports).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT
from groundset.core.config import validate_config
from groundset.core.io import write_json, write_jsonl
from groundset.core.stats import drop_line, envelope, write_stats
from groundset.exports.coco import export_coco
from groundset.exports.odvg import export_odvg
from groundset.exports.wds import export_wds
from groundset.stages.filter.select import SelectFiles, select_shard, selection_rules
from groundset.stages.manifest import build_manifest
from groundset.stages.mask import MaskGatherFiles, MaskSettings, gather_masks
from groundset.stages.merge import merge_tiers
from groundset.stages.parts import part_name, plan_parts, write_plan
from groundset.stages.prefilter import PrefilterRules, prefilter_part
from groundset.stages.split import split_manifest
from groundset.tools import trace as trace_module
from groundset.tools.trace import format_trace, parse_key, trace

SOURCE = "src"
# The URL list: (file name, WIDTH, HEIGHT). "small" fails the prefilter; the others are kept
# and img2dataset numbers them 4 to a shard: 000000-000003, 000010-000013.
ROWS = [
    ("a", 2048, 1536),
    ("small", 800, 600),
    ("b", 2048, 1024),
    ("c", 1500, 1500),
    ("d", 1600, 1200),
    ("e", 1800, 1200),
    ("f", 1200, 1200),
    ("g", 1300, 1300),
    ("h", 1400, 1400),
]
KEPT_URLS = ["a", "b", "c", "d", "e", "f", "g", "h"]
# one download part (part_rows null: the whole file); image ids are <part>_<img2dataset key>
PART = part_name("part-0.parquet", 0, len(ROWS))
KEYS = ["000000", "000001", "000002", "000003", "000010", "000011", "000012", "000013"]
IDS = [f"{PART}_{key}" for key in KEYS]
FIRST = IDS[0]
FAILED = IDS[1]  # 404
UNREADABLE = IDS[2]  # the probe drops it
NSFW = IDS[3]  # the NSFW filter drops it
BELOW_TIER = IDS[4]  # aesthetics 5.5: merged_output only
DUPLICATE = IDS[5]  # dedup: a duplicate of FIRST
REFUSED = IDS[6]  # the VLM refused
NO_MASK = IDS[7]  # every entity below the mask floors
AESTHETICS = {FIRST: 7.0, NSFW: 6.8, BELOW_TIER: 5.5, DUPLICATE: 6.5, REFUSED: 6.4}


def url(name: str) -> str:
    """The URL of a row of the test's URL list."""
    return f"http://x/{name}.jpg"


def config_for(work: Path, url_list: Path, **extra: object) -> dict:
    """A validated config of the test's run (tiny shards, img2dataset shards of 4)."""
    config = {
        "workdir": str(work),
        "sources": [{"name": SOURCE, "url_list": str(url_list)}],
        "shard_size": 4,
        "download": {"number_sample_per_shard": 4},
        "filter": {"template": str(ROOT / "config" / "data_juicer_filter.yaml")},
        "mask": {"random_weights": True, "min_score": 0.5},
        "export": {"emu3": {"random_weights": True}, "webdataset": {"shard_size": 10}},
        **extra,
    }
    return validate_config(config, weights=())


def write_downloads(folder: Path, work: Path) -> dict[str, Path]:
    """img2dataset's `files` output: per shard a table of every row, sidecars of successes."""
    images = {}
    for shard in range(2):
        rows = []
        for i in range(4):
            key = KEYS[shard * 4 + i]  # img2dataset's, within the part
            name = KEPT_URLS[shard * 4 + i]
            status, error = (
                ("failed_to_download", "HTTP Error 404") if IDS[shard * 4 + i] == FAILED
                else ("success", None)
            )  # fmt: skip
            meta = {
                "caption": f"alt {name}",
                "url": url(name),
                "key": key,
                "status": status,
                "error_message": error,
                "width": 1600,
                "height": 1200,
                "original_width": 1600,
                "original_height": 1200,
                # the prefilter's provenance, saved by img2dataset (save_additional_columns)
                "url_list_file": "part-0.parquet",
                "url_list_row": [n for n, _, _ in ROWS].index(name),
            }
            rows.append(meta)
            if status == "success":
                sub = folder / f"{shard:05d}"
                sub.mkdir(parents=True, exist_ok=True)
                (sub / f"{key}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
                (sub / f"{key}.json").write_text(json.dumps(meta))
                images[IDS[shard * 4 + i]] = (sub / f"{key}.jpg").resolve()
        pd.DataFrame(rows).to_parquet(folder / f"{shard:05d}.parquet", index=False)
        write_json(folder / f"{shard:05d}_stats.json", {"count": 4, "successes": 4 - (shard == 0)})
    write_stats(work / "downloads" / SOURCE / f"{PART}_stats.json",
                envelope("download", 8, 7, {"failed_to_download": 1}))  # fmt: skip
    return images


def stats_of(key: str) -> dict:
    """data-juicer's stats of a record (all five filters)."""
    return {
        "aspect_ratios": [1.333],
        "image_aesthetics_scores": [AESTHETICS.get(key, 6.2)],
        "image_height": [1200],
        "image_nsfw_score": [0.01 if key == NSFW else 0.0001],
        "image_watermark_prob": [0.1],
        "image_width": [1600],
    }


def masked_record(record: dict, scores: list[float], mask_file: Path) -> dict:
    """A mask job's record: the seed's layout with one mask (and its quality) per entity."""
    entities = [{"entity": e["entity"], "bbox": e["bboxes"][0]} for e in record["entities"]]
    np.save(mask_file, np.ones((len(entities), 4, 4), dtype=bool))
    return {
        **record,
        "image": record["image"][0],
        "entities": entities,
        "mask_scores": scores,
        "mask_inside_fraction": [1.0] * len(scores),
        "mask_area_ratio": [1.0] * len(scores),
        "mask_file": str(mask_file),
        "mask_shape": [len(scores), 4, 4],
    }


def build_run(root: Path) -> tuple[Path, dict]:
    """A finished run of 9 URL-list rows: every stage's files, each image dropped somewhere."""
    work = root / "results"
    url_list = root / "urls" / "part-0.parquet"
    url_list.parent.mkdir(parents=True)
    frame = pd.DataFrame(
        [
            {"URL": url(n), "TEXT": f"alt {n}", "WIDTH": w, "HEIGHT": h, "similarity": 0.3}
            for n, w, h in ROWS
        ]
    )
    frame.to_parquet(url_list, index=False)
    config = config_for(work, url_list.parent)
    rules = PrefilterRules.from_config(config)
    (part,) = plan_parts(url_list.parent, None)
    lists = work / "url_lists" / SOURCE
    prefilter_part(url_list, vars(part), lists / f"{PART}.parquet", lists / f"{PART}_stats.json",
                   lists / f"{PART}_dropped.parquet", rules)  # fmt: skip
    write_plan(work / "url_lists" / f"{SOURCE}_parts.json", SOURCE, [part])
    images = write_downloads(work / "downloads" / SOURCE / PART, work)
    manifest = work / "manifest" / SOURCE / f"{PART}.jsonl"
    build_manifest([work / "downloads" / SOURCE / PART], manifest, SOURCE, [],
                   work / "manifest" / "s.json", parts=True)  # fmt: skip
    index = split_manifest(manifest, work / "shards" / SOURCE / PART, 4)
    template = config["filter"]["template"]
    select_rules = selection_rules(template, config["filter"])
    filtered = []
    for entry in index["shards"]:
        i = entry["shard"]
        records = [
            json.loads(line) for line in (work / "shards" / SOURCE / PART / entry["file"]).open()
        ]
        bad = [
            drop_line(r, "score", "truncated", "truncated: image file is truncated")
            for r in records
            if r["image_id"] == UNREADABLE
        ]
        good = [r for r in records if r["image_id"] != UNREADABLE]
        write_jsonl(work / "probed" / SOURCE / PART / f"shard_{i}_dropped.jsonl", bad)
        write_jsonl(work / "probed" / SOURCE / PART / f"shard_{i}.jsonl", good)
        scored = work / "scored" / SOURCE / PART / f"shard_{i}.jsonl"
        write_jsonl(scored, [{**r, "__dj__stats__": stats_of(r["image_id"])} for r in good])
        files = SelectFiles(
            str(scored),
            str(work / "filtered" / SOURCE / PART / f"shard_{i}.jsonl"),
            str(work / "rejected" / SOURCE / PART / f"shard_{i}.jsonl"),
            str(work / "filtered" / SOURCE / PART / f"shard_{i}_stats.json"),
        )
        select_shard(files, select_rules, progress=False)
        filtered.append(files.kept)
    merged = work / "merged"
    merge_tiers(
        filtered,
        (merged / "merged_output.jsonl", merged / "aes_6.jsonl"),
        [5, 6],
        merged / "merge_stats.json",
    )
    high = {r["image_id"]: r for r in map(json.loads, (merged / "aes_6.jsonl").open())}
    assert sorted(high) == [FIRST, DUPLICATE, REFUSED, NO_MASK]
    write_jsonl(work / "dedup" / "deduped.jsonl", [r for k, r in high.items() if k != DUPLICATE])
    write_jsonl(
        work / "dedup" / "dropped.jsonl",
        [
            {
                **high[DUPLICATE],
                "phash": "8f0f0f0f0f0f0f0f",
                "duplicate_of": f"{SOURCE}/{FIRST}",
                "duplicate_kind": "phash",
                "phash_distance": 2,
                "drop_stage": "dedup",
                "drop_reason": "phash",
            }
        ],
    )
    write_stats(work / "dedup" / "dedup_stats.json", envelope("dedup", 4, 3, {"phash": 1}))
    captioned = {}
    for key, names in ((FIRST, ["dog", "cat"]), (NO_MASK, ["tree"])):
        entities = [{"entity": n, "bboxes": [[0.1, 0.1, 0.5, 0.5]]} for n in names]
        captioned[key] = {
            **high[key],
            "caption": f"A photo of {' and '.join(names)}.",
            "entities": entities,
            "caption_meta": {"model": "qwen-vl-max", "backend": "dashscope"},
        }
    write_jsonl(work / "captioned" / "captioned.jsonl", captioned.values())
    error = {
        **drop_line(high[REFUSED], "caption", "refusal", "the model declined to describe it"),
        "attempts": 1,
        "answer": "I'm sorry, but I can't help.",
    }
    write_jsonl(work / "captioned" / "errors.jsonl", [error])
    masks = work / "masks" / "chunk_0" / SOURCE
    masks.mkdir(parents=True)
    chunk = [
        masked_record(captioned[FIRST], [0.9, 0.2], masks / f"{FIRST}.npy"),
        masked_record(captioned[NO_MASK], [0.1], masks / f"{NO_MASK}.npy"),
    ]
    masked = work / "masked"
    write_jsonl(masked / "chunk_0.jsonl", chunk)
    write_jsonl(masked / "chunk_0_dropped.jsonl", [])
    write_stats(masked / "chunk_0_stats.json", envelope("mask", 2, 2, {}))
    gather_masks(
        [str(masked / "chunk_0.jsonl")],
        [str(masked / "chunk_0_dropped.jsonl")],
        [str(masked / "chunk_0_stats.json")],
        MaskGatherFiles(
            str(masked / "masked.jsonl"),
            str(masked / "dropped.jsonl"),
            str(masked / "mask_stats.json"),
            str(work / "masks" / "floored"),
        ),
        MaskSettings.from_config(config["mask"]),
    )
    emu3 = work / "export" / "emu3" / "list"
    path = f"part_0/{SOURCE}/{FIRST}.pth"
    write_jsonl(
        emu3 / "datalist.jsonl",
        [
            {
                "name": f"{SOURCE}/{FIRST}",
                "image": str(images[FIRST]),
                "image_id": FIRST,
                "source": SOURCE,
                "path": path,
                "texts": "A photo",
                "tokens": [8, 8],
            }
        ],
    )
    (emu3 / "train.json").write_text(json.dumps({"prefix": str(emu3.parent), "path_list": [path]}))
    write_jsonl(emu3 / "error.jsonl", [])
    masked_file = masked / "masked.jsonl"
    export_coco(masked_file, work / "export" / "coco" / "coco.json")
    export_odvg(masked_file, work / "export" / "odvg" / "odvg.jsonl")
    export_wds(masked_file, work / "export" / "wds", shard_size=10)
    return work, config


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """The test run's workdir and config (built once)."""
    return build_run(tmp_path_factory.mktemp("trace"))


def verdicts(result: dict) -> dict[str, str]:
    """Stage -> verdict of a trace."""
    return {stage["stage"]: stage["verdict"] for stage in result["stages"]}


def stage(result: dict, name: str) -> dict:
    """One stage's entry of a trace."""
    return next(s for s in result["stages"] if s["stage"] == name)


def test_an_image_kept_all_the_way(run):
    work, config = run
    result = trace(work, f"{SOURCE}/{FIRST}", config)
    assert result["key"] == f"{SOURCE}/{FIRST}"
    json.dumps(result)  # what `groundset trace --json` prints
    assert set(verdicts(result).values()) == {"kept"}, verdicts(result)
    prefilter = stage(result, "prefilter")["details"]
    assert (prefilter["url_list_file"], prefilter["row"], prefilter["url"]) == (
        "part-0.parquet", 0, url("a"))  # fmt: skip
    assert stage(result, "score")["details"]["aesthetics"] == 7.0
    assert stage(result, "tier")["details"]["aes_6.jsonl"] is True
    assert stage(result, "caption")["details"]["entities"] == ["dog", "cat"]
    mask = stage(result, "mask")["details"]
    assert mask["entities"] == ["dog"]
    assert mask["entities_dropped_by_floors"] == ["cat (score 0.2, inside 1.0)"]
    assert mask["floors"]["min_score"] == 0.5
    assert stage(result, "export emu3")["details"]["in_train_json"] is True
    assert stage(result, "export coco")["details"]["annotations"] == 1
    assert stage(result, "export odvg")["details"]["phrases"] == ["dog"]
    wds = stage(result, "export webdataset")["details"]
    assert (wds["key"], wds["members"]) == (f"{SOURCE}__{FIRST}", [".jpg", ".json"])
    manifest = f"manifest/src/{PART}.jsonl"
    for path in (manifest, f"rejected/src/{PART}/shard_0.jsonl"):
        assert (path in result["found_in"]) == (path == manifest)
    assert f"filtered/src/{PART}/shard_0.jsonl" in result["found_in"]


def test_a_row_the_prefilter_dropped_is_traced_by_its_url(run):
    work, config = run
    for key in (url("small"), f"{SOURCE}/{url('small')}"):
        result = trace(work, key, config)
        prefilter = stage(result, "prefilter")
        assert prefilter["verdict"] == "dropped"
        assert prefilter["details"]["reason"] == "too_small: 800 x 600 below 1024 x 1024"
        assert prefilter["details"]["row"] == 1
        assert verdicts(result)["download"] == "not reached"
        listed = Path(config["sources"][0]["url_list"]) / "part-0.parquet"
        drops = f"url_lists/{SOURCE}/{PART}_dropped.parquet"
        assert result["found_in"] == [drops, f"{listed}: row 1"]


def test_a_url_of_a_kept_row_gives_its_image_id(run):
    work, config = run
    result = trace(work, url("e"), config)
    assert result["key"] == f"{SOURCE}/{BELOW_TIER}"
    assert stage(result, "prefilter")["details"]["row"] == 5


def test_a_failed_download(run):
    work, config = run
    result = trace(work, f"{SOURCE}/{FAILED}", config)
    download = stage(result, "download")
    assert download["verdict"] == "dropped"
    assert download["details"]["reason"] == "failed_to_download: HTTP Error 404"
    assert verdicts(result)["manifest"] == "not reached"


def test_only_the_images_own_shard_table_is_read(run, tmp_path):
    """A kept image's table comes from its manifest record's folder; a failed one's row from
    the download drop lines: no other shard table is opened (a big run has thousands)."""
    work, config = run
    copy = tmp_path / "results"
    shutil.copytree(work, copy)
    tables = copy / "downloads" / SOURCE / PART
    (tables / "00000.parquet").write_bytes(b"not parquet")  # 000010 is in shard 00001
    config = {**config, "workdir": str(copy)}
    assert stage(trace(copy, f"{SOURCE}/{BELOW_TIER}", config), "download")["verdict"] == "kept"
    table = work / "downloads" / SOURCE / PART / "00000.parquet"
    failed = pd.read_parquet(table).query("key == @KEYS[1]")
    line = drop_line({**failed.iloc[0].to_dict(), "image_id": FAILED, "source": SOURCE},
                     "download", "failed_to_download", "HTTP Error 404")  # fmt: skip
    write_jsonl(copy / "downloads" / SOURCE / f"{PART}_dropped.jsonl", [line])
    download = stage(trace(copy, f"{SOURCE}/{FAILED}", config), "download")
    assert (download["verdict"], download["details"]["reason"]) == (
        "dropped", "failed_to_download: HTTP Error 404")  # fmt: skip


def test_an_image_the_probe_could_not_read(run):
    work, config = run
    probe = stage(trace(work, f"{SOURCE}/{UNREADABLE}", config), "probe")
    assert probe["verdict"] == "dropped"
    assert probe["details"]["reason"].startswith("truncated")


def test_a_filter_names_itself_and_the_score(run):
    work, config = run
    result = trace(work, f"{SOURCE}/{NSFW}", config)
    select = stage(result, "select")
    assert select["verdict"] == "dropped"
    assert select["details"]["filter"] == "image_nsfw_filter"
    assert select["details"]["reason"] == "image_nsfw_filter: 0.01 > 0.0006"
    assert select["details"]["nsfw"] == 0.01
    assert verdicts(result)["tier"] == "not reached"


def test_an_image_below_the_captioned_tier(run):
    work, config = run
    tier = stage(trace(work, f"{SOURCE}/{BELOW_TIER}", config), "tier")
    assert tier["verdict"] == "dropped"
    assert tier["details"]["reason"] == "aesthetics 5.5 < 6 (aes_6.jsonl)"
    assert tier["details"]["merged_output.jsonl"] is True


def test_a_duplicate_names_what_it_duplicates(run):
    work, config = run
    dedup = stage(trace(work, f"{SOURCE}/{DUPLICATE}", config), "dedup")
    assert dedup["verdict"] == "dropped"
    assert dedup["details"]["duplicate_of"] == f"{SOURCE}/{FIRST}"
    assert dedup["details"]["reason"] == (
        f"duplicate of {SOURCE}/{FIRST} (perceptual hashes 2 bits apart)"
    )


def test_a_caption_error_and_a_mask_drop(run):
    work, config = run
    caption = stage(trace(work, f"{SOURCE}/{REFUSED}", config), "caption")
    assert (caption["verdict"], caption["details"]["reason"]) == (
        "dropped", "refusal: the model declined to describe it")  # fmt: skip
    assert caption["details"]["attempts"] == 1
    mask = stage(trace(work, f"{SOURCE}/{NO_MASK}", config), "mask")
    assert mask["verdict"] == "dropped"
    assert mask["details"]["reason"].startswith("all_entities_below_quality_floors: ")


def test_unknown_keys(run):
    work, config = run
    assert trace(work, f"{SOURCE}/000099", config) is None
    assert trace(work, "nosuch/000000", config) is None
    assert trace(work, "http://x/nowhere.jpg", config) is None
    with pytest.raises(ValueError, match="SOURCE/IMAGE_ID"):
        trace(work, "000000", config)
    assert parse_key("src/http://x/a.jpg", ["src"]) == ("src", None, "http://x/a.jpg")


def test_stages_not_run_yet(run, tmp_path):
    work, config = run
    early = tmp_path / "results"
    for folder in ("url_lists", "downloads", "manifest", "shards", "probed", "scored"):
        shutil.copytree(work / folder, early / folder)
    result = trace(early, f"{SOURCE}/{FIRST}", {**config, "workdir": str(early)})
    shown = verdicts(result)
    assert shown["score"] == "kept"
    for name in ("select", "tier", "dedup", "caption", "mask", "export emu3", "export coco"):
        assert shown[name] == "not run yet", name
    only_list = tmp_path / "only_list"
    shutil.copytree(work / "url_lists", only_list / "url_lists")
    # before the download no image has an id (img2dataset gives them): a URL still traces
    assert trace(only_list, f"{SOURCE}/{FIRST}", config) is None
    result = trace(only_list, url("a"), config)
    assert verdicts(result)["prefilter"] == "kept"
    assert stage(result, "prefilter")["details"]["row"] == 0
    assert verdicts(result)["download"] == "not run yet"
    off = trace(early, f"{SOURCE}/{FIRST}", {**config, "caption": {"dedup": {"enabled": False}}})
    assert verdicts(off)["dedup"] == "off"


def test_chunks_stand_in_for_their_gather(run, tmp_path):
    """Before the gathers ran, the caption and mask chunks answer."""
    work, config = run
    copy = tmp_path / "results"
    shutil.copytree(work, copy)
    (copy / "captioned" / "captioned.jsonl").rename(copy / "captioned" / "chunk_0.jsonl")
    (copy / "captioned" / "errors.jsonl").rename(copy / "captioned" / "chunk_0_errors.jsonl")
    for name in ("masked.jsonl", "dropped.jsonl"):
        (copy / "masked" / name).unlink()
    result = trace(copy, f"{SOURCE}/{FIRST}", {**config, "workdir": str(copy)})
    assert stage(result, "caption")["details"]["file"] == "captioned/chunk_0.jsonl"
    mask = stage(result, "mask")
    assert mask["verdict"] == "kept"
    assert mask["details"]["entities"] == ["dog", "cat"]  # the floors are the gather's
    assert mask["details"]["floors"].startswith("not applied yet")
    refused = trace(copy, f"{SOURCE}/{REFUSED}", config)
    assert stage(refused, "caption")["details"]["reason"].startswith("refusal")


def test_without_a_config_the_files_still_tell(run):
    work, _ = run
    result = trace(work, f"{SOURCE}/{NSFW}")
    # the provenance names the row; without the config's URL list, the prefiltered copy has it
    assert verdicts(result)["prefilter"] == "kept"
    assert stage(result, "prefilter")["details"]["url"] == url("d")
    assert verdicts(result)["download"] == "kept"
    assert stage(result, "select")["details"]["filter"] == "image_nsfw_filter"


def test_format_trace_is_a_table(run):
    work, config = run
    text = format_trace(trace(work, f"{SOURCE}/{NSFW}", config))
    assert text.splitlines()[0] == f"trace {SOURCE}/{NSFW}"
    line = next(line for line in text.splitlines() if line.startswith("select"))
    assert "dropped" in line and "reason: image_nsfw_filter: 0.01 > 0.0006" in line


def test_a_multi_line_error_stays_on_its_stage_row():
    error = "api error: Traceback (most recent call last):\n  File 'x.py'\n\tValueError: bad"
    result = {"key": "s/1", "found_in": [], "stages": [
        {"stage": "caption", "verdict": "dropped", "details": {"reason": error, "answer": "a\nb"}},
        {"stage": "mask", "verdict": "not reached", "details": {}},
    ]}  # fmt: skip
    lines = format_trace(result).splitlines()
    assert lines[-2].startswith("caption") and lines[-1].startswith("mask")
    assert (
        "reason: api error: Traceback (most recent call last): File 'x.py' ValueError: bad"
        in (lines[-2])
    )
    assert "answer=a b" in lines[-2]


def test_a_url_two_sources_list_is_traced_in_both(run, tmp_path):
    work, config = run
    both = copy.deepcopy(config)
    both["sources"].append({**config["sources"][0], "name": "again"})
    result = trace(work, url("a"), both)
    assert result["key"] == f"{SOURCE}/{FIRST}"
    (other,) = result["also_in"]
    assert other["key"].startswith("again/") and other["url"] == url("a")
    assert stage(other, "prefilter")["details"]["row"] == 0
    text = format_trace(result)
    assert f"trace {SOURCE}/{FIRST}" in text and f"trace {other['key']}" in text


def test_the_manifest_is_bisected(tmp_path, monkeypatch):
    """A manifest sorted by id is bisected down to a small window (here 64 bytes)."""
    monkeypatch.setattr(trace_module, "WINDOW", 64)
    manifest = tmp_path / "manifest.jsonl"
    write_jsonl(
        manifest,
        [{"image_id": f"{i:06d}", "source": "s", "pad": "x" * (i % 7)} for i in range(0, 3000, 3)],
    )
    tracer = trace_module._Tracer(tmp_path, None)
    tracer.source = "s"
    starts = []
    real_scan = trace_module._scan

    def scan(path: Path, needle: bytes, start: int = 0, **kwargs: object):
        """The real scan, noting where it starts."""
        starts.append(start)
        return real_scan(path, needle, start, **kwargs)

    monkeypatch.setattr(trace_module, "_scan", scan)
    data = manifest.read_bytes()
    for number in (0, 3, 1500, 2997):
        tracer.image_id = f"{number:06d}"
        offset, record = tracer.bisect(manifest)
        assert record["image_id"] == tracer.image_id
        assert data[offset:].startswith(b'{"image_id": "' + tracer.image_id.encode())
        assert offset - starts[-1] < 200  # only a small window before it was scanned
    for number in (1, 2999, 5000):
        tracer.image_id = f"{number:06d}"
        assert tracer.bisect(manifest) is None


@pytest.mark.workflow
@pytest.mark.xdist_group("sample")
def test_trace_of_a_sample_image(sample_run, monkeypatch):
    """A captioned and masked image of the bundled sample, traced through its finished run."""
    from groundset.core.config import load_config

    monkeypatch.chdir(ROOT)  # the sample config's URL lists are relative to the repository
    config = load_config("config/sample.yaml", weights=())
    work = sample_run["snapshot"]  # the run as it finished (other tests change the workdir)
    kept = json.loads((work / "masked" / "masked.jsonl").open().readline())
    result = trace(work, f"{kept['source']}/{kept['image_id']}", config)
    shown = verdicts(result)
    for name in (
        "prefilter",
        "download",
        "manifest",
        "probe",
        "score",
        "select",
        "tier",
        "caption",
        "mask",
        "export emu3",
    ):
        assert shown[name] == "kept", (name, result)
    assert stage(result, "download")["details"]["url"] == kept["url"]
    assert stage(result, "prefilter")["details"]["url"] == kept["url"]


def test_each_export_is_judged_on_its_own_with_its_reason(tmp_path):
    """An image one export leaves out (its mask file is gone) is still in another's, and the
    export that left it out says why (its side file of skipped records)."""
    from PIL import Image

    work = tmp_path / "results"
    image = tmp_path / "000007.jpg"  # ODVG lines name the image by its file only
    Image.new("RGB", (40, 30), (10, 200, 30)).save(image)
    record = {"image": str(image), "image_id": "000007", "source": SOURCE, "caption": "a dog",
              "entities": [{"entity": "dog", "bbox": [0.1, 0.1, 0.5, 0.5]}],
              "mask_scores": [0.9], "mask_file": str(tmp_path / "gone.npy")}  # fmt: skip
    write_jsonl(work / "masked" / "masked.jsonl", [record])
    export_coco(work / "masked" / "masked.jsonl", work / "export" / "coco" / "coco.json")
    export_odvg(work / "masked" / "masked.jsonl", work / "export" / "odvg" / "odvg.jsonl")
    sources = [{"name": SOURCE, "url_list": str(tmp_path)}]
    result = trace(work, f"{SOURCE}/000007", {"sources": sources})
    assert stage(result, "export coco")["verdict"] == "dropped"
    assert stage(result, "export coco")["details"]["reason"] == "mask_missing"
    assert stage(result, "export odvg")["verdict"] == "kept"
    # an export the config no longer asks for: off, and its old file named as stale
    config = {"sources": sources, "export": {"formats": ["odvg"]}}
    off = stage(trace(work, f"{SOURCE}/000007", config), "export coco")
    assert (
        off["verdict"] == "off"
        and "export/coco/coco.json left from an earlier run" in (off["details"]["note"])
    )
