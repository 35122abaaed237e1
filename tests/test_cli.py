"""The `groundset` console command: each stage outside Snakemake, with clear errors."""

import json
import os
import subprocess
import sys

import yaml

from conftest import RANDOM_WEIGHTS, ROOT, fake_download, write_config, write_parquet
from groundset.cli import main
from groundset.core.io import iter_jsonl, write_json, write_jsonl

GROUNDSET = os.path.join(os.path.dirname(sys.executable), "groundset")


def test_console_script_is_installed():
    done = subprocess.run([GROUNDSET, "--help"], capture_output=True, text=True, check=True)
    for command in ("prefilter", "download", "manifest", "split", "summary"):
        assert command in done.stdout


def test_split_command(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(25)))
    assert (
        main(
            [
                "split",
                "--config",  # the default config/config.yaml needs real weights set first
                str(ROOT / "config" / "sample.yaml"),
                "--input",
                str(manifest),
                "--outdir",
                str(tmp_path / "s"),
                "--shard-size",
                "10",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == {"records": 25, "shards": 3, "shard_size": 10}
    assert [len(list(iter_jsonl(tmp_path / "s" / f"shard_{i}.jsonl"))) for i in range(3)] == [
        10,
        10,
        5,
    ]


def test_manifest_command_without_config(tmp_path, capsys):
    fake_download(tmp_path / "dl", shards=1, per_shard=2)
    args = [
        "manifest",
        "--source",
        "s",
        "--input",
        str(tmp_path / "dl"),
        "--output",
        str(tmp_path / "m.jsonl"),
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["records_out"] == 2


def test_prefilter_command_uses_config_thresholds(tmp_path, laion_rows, capsys):
    url_list = write_parquet(tmp_path / "u.parquet", laion_rows)
    config = {
        "sources": [
            {"name": "s", "url_list": str(url_list), "save_additional_columns": ["LANGUAGE"]}
        ],
        "filter": {"image_shape": {"min_width": 100, "min_height": 100}},
        **RANDOM_WEIGHTS,
    }
    cfg = write_config(tmp_path / "c.yaml", config)
    assert main(["prefilter", "--config", str(cfg), "--outdir", str(tmp_path / "out")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records_out"] == 4 and stats["dropped"]["aspect_ratio"] == 1
    assert json.loads((tmp_path / "out_stats.json").read_text()) == stats


def test_errors_are_one_clear_line(tmp_path, capsys):
    cfg = write_config(
        tmp_path / "c.yaml", {"sources": [{"name": "s", "url_list": "x"}], "shard_size": -1}
    )
    assert main(["split", "--config", str(cfg), "--input", "x", "--outdir", str(tmp_path)]) == 2
    assert "shard_size: -1 is less than the minimum of 1" in capsys.readouterr().err
    assert (
        main(
            [
                "split",
                "--config",
                str(ROOT / "config" / "sample.yaml"),
                "--input",
                str(tmp_path / "none.jsonl"),
                "--outdir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "none.jsonl" in capsys.readouterr().err
    good = write_config(
        tmp_path / "g.yaml",
        {
            "sources": [{"name": "a", "url_list": "x"}, {"name": "b", "url_list": "y"}],
            **RANDOM_WEIGHTS,
        },
    )
    assert main(["prefilter", "--config", str(good), "--outdir", str(tmp_path / "o")]) == 2
    assert "--source is required" in capsys.readouterr().err
    assert (
        main(["prefilter", "--config", str(good), "--source", "c", "--outdir", str(tmp_path / "o")])
        == 2
    )
    assert "no source named 'c'" in capsys.readouterr().err


def test_summary_formats_counts_per_stage(tmp_path, capsys):
    from groundset.core.stats import envelope, write_stats

    for source, rows in (("s", 5), ("t", 4)):
        write_stats(  # one download part each
            tmp_path / "url_lists" / source / "0a0b0c0d_stats.json",
            envelope("prefilter", rows, rows - 2, {"too_small": 2, "punsafe": 0}),
        )
        write_stats(
            tmp_path / "downloads" / source / "0a0b0c0d_stats.json",
            envelope("download", rows - 2, rows - 3, {"failed_to_download": 1}),
        )
    write_stats(tmp_path / "manifest" / "s" / "0a0b0c0d_stats.json", envelope("manifest", 2, 2, {}))
    assert main(["summary", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["prefilter", "9", "5", "4", "too_small=4"]
    assert out[2].split() == ["s", "5", "3", "2", "too_small=2"]  # one line per source
    assert out[4].split() == ["download", "5", "3", "2", "failed_to_download=2"]
    assert out[7].split() == ["manifest", "2", "2", "0", "-"]  # one source: no source lines
    # the select counts are those of the shards of the current index: a smaller shard_size
    # left shard_1's files of an earlier run behind
    write_json(tmp_path / "shards" / "s" / "0a0b0c0d" / "index.json", {"shards": [{"shard": 0}]})
    for shard, kept in ((0, 2), (1, 7)):
        write_stats(tmp_path / "filtered" / "s" / "0a0b0c0d" / f"shard_{shard}_stats.json",
                    envelope("select", kept + 1, kept, {"image_shape_filter": 1}))  # fmt: skip
    assert main(["summary", "--workdir", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stages"][-1] == {"stage": "select", "in": 3, "kept": 2, "dropped": 1,
                                     "reasons": {"image_shape_filter": 1}}  # fmt: skip
    assert summary["sources"]["t"] == [
        {"stage": "prefilter", "in": 4, "kept": 2, "dropped": 2, "reasons": {"too_small": 2}},
        {"stage": "download", "in": 2, "kept": 1, "dropped": 1,
         "reasons": {"failed_to_download": 1}},
    ]  # fmt: skip


def test_score_once_then_select_with_other_thresholds(tmp_path, capsys):
    """`groundset score` then `groundset select`: a second select with other thresholds re-reads
    the stored scores only (no model run) and keeps exactly what its bounds say."""
    folder = ROOT / "tests" / "data" / "sample" / "www" / "img"
    photos = sorted(p for p in folder.glob("*_1*.jpg") if not p.name.startswith("truncated"))
    write_jsonl(
        tmp_path / "shard.jsonl",
        [{"image": [str(p)], "text": "", "image_id": p.stem, "source": "s"} for p in photos],
    )
    base = {"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS}
    base["filter"] = {"stand_in_models": True, "np": 2}
    cfg = write_config(tmp_path / "c.yaml", base)
    scored = tmp_path / "scored.jsonl"
    args = ["score", "--config", str(cfg), "--input", str(tmp_path / "shard.jsonl")]
    assert main([*args, "--output", str(scored), "--models-dir", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out)["records_out"] == len(photos)
    mtime = scored.stat().st_mtime_ns
    records = list(iter_jsonl(scored))
    nsfw = sorted(r["__dj__stats__"]["image_nsfw_score"][0] for r in records)
    kept = {}
    for name, bound in (("loose", 1.0), ("tight", nsfw[len(nsfw) // 2])):
        changed = {**base, "filter": {**base["filter"], "nsfw": {"max_score": bound}}}
        changed["filter"]["aesthetics"] = {"min_score": 0}
        changed["filter"]["watermark"] = {"max_prob": 1.0}
        cfg = write_config(tmp_path / f"{name}.yaml", changed)
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(["select", "--config", str(cfg), "--input", str(scored), "--output", str(out)])
            == 0
        )
        stats = json.loads(capsys.readouterr().out)
        kept[name] = {r["image_id"] for r in iter_jsonl(out)}
        rejected = list(iter_jsonl(tmp_path / f"{name}_rejected.jsonl"))
        assert len(kept[name]) + len(rejected) == len(records) == stats["records_in"]
    geometry_ok = {
        r["image_id"]
        for r in records
        if min(r["__dj__stats__"]["image_width"][0], r["__dj__stats__"]["image_height"][0]) >= 1024
        and 0.5 <= r["__dj__stats__"]["aspect_ratios"][0] <= 2.0
    }
    assert kept["loose"] == geometry_ok
    assert kept["tight"] == {
        r["image_id"]
        for r in records
        if r["image_id"] in geometry_ok
        and r["__dj__stats__"]["image_nsfw_score"][0] <= nsfw[len(nsfw) // 2]
    }
    assert kept["tight"] < kept["loose"]
    assert scored.stat().st_mtime_ns == mtime  # the scores were read, never recomputed


def test_score_refuses_a_template_select_cannot_apply_before_opening_an_image(tmp_path, capsys):
    template = yaml.safe_load((ROOT / "config" / "data_juicer_filter.yaml").read_text())
    template["process"].append({"image_text_similarity_filter": {}})
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(template))
    config = {"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS}
    config["filter"] = {"template": str(tmp_path / "t.yaml")}
    cfg = write_config(tmp_path / "c.yaml", config)
    write_jsonl(tmp_path / "shard.jsonl", [{"image": ["/nowhere.jpg"], "image_id": "a"}])
    args = ["score", "--config", str(cfg), "--input", str(tmp_path / "shard.jsonl")]
    assert main([*args, "--output", str(tmp_path / "scored.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "filter.template: recipe template op 'image_text_similarity_filter'" in err
    assert not (tmp_path / "scored_probed.jsonl").exists()  # nothing was probed


def test_select_refuses_a_file_without_scores(tmp_path, capsys):
    """The raw shard (or a probed one) instead of the scored file: an error, not 0 kept."""
    config = {"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS}
    cfg = write_config(tmp_path / "c.yaml", config)
    write_jsonl(tmp_path / "shard.jsonl", [{"image": ["/a.jpg"], "image_id": "a"}])
    args = ["select", "--config", str(cfg), "--input", str(tmp_path / "shard.jsonl")]
    assert main([*args, "--output", str(tmp_path / "kept.jsonl")]) == 2
    assert "holds no scores" in capsys.readouterr().err
    assert not (tmp_path / "kept.jsonl").exists()


def test_estimate_of_a_missing_url_list_fails_naming_it(tmp_path, capsys):
    config = write_config(
        tmp_path / "c.yaml",
        {"sources": [{"name": "s", "url_list": str(tmp_path / "nowhere")}], **RANDOM_WEIGHTS},
    )
    assert main(["estimate", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"s: URL list {tmp_path / 'nowhere'} does not exist" in err


def test_estimate_and_dedup_commands(tmp_path, capsys):
    import pandas as pd
    from PIL import Image

    n = 200_000  # enough rows that the assumed pass rates leave records to caption
    url_list = tmp_path / "urls.parquet"
    pd.DataFrame({"URL": [f"http://x/{i}.jpg" for i in range(n)], "TEXT": "t",
                  "WIDTH": [1200, 600] * (n // 2), "HEIGHT": 1100}).to_parquet(url_list)  # fmt: skip
    config = write_config(
        tmp_path / "c.yaml",
        {"sources": [{"name": "s", "url_list": str(url_list), "save_additional_columns": []}],
         **RANDOM_WEIGHTS, "caption": {"price_per_image": 0.01}},
    )  # fmt: skip
    assert main(["estimate", "--config", str(config), "--json", "--no-measured"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sources"][0]["rows"] == n and result["sources"][0]["to_download"] == n // 2
    caption = next(s for s in result["stages"] if s["stage"] == "caption")
    assert caption["requests"] > 0 and abs(caption["cost"] - caption["requests"] * 0.01) < 1e-9
    # dedup: the same file twice under two ids, the higher aesthetic score stays
    image = tmp_path / "a.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    records = [{"image": [str(image)], "image_id": f"{i:06d}", "source": "s", "url": f"u{i}",
                "__dj__stats__": {"image_aesthetics_scores": [5.0 + i]}} for i in range(2)]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", records)
    args = ["dedup", "--config", str(config), "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out.jsonl"), "--dropped", str(tmp_path / "dup.jsonl")]  # fmt: skip
    assert main(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records_out"] == 1 and sum(stats["dropped"].values()) == 1
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "out.jsonl")] == ["000001"]
    [dup] = iter_jsonl(tmp_path / "dup.jsonl")
    assert dup["duplicate_of"] == "s/000001" and dup["duplicate_kind"] == "sha256"
    assert (tmp_path / "out_stats.json").exists()


def test_config_files_merge_in_order_and_bad_yaml_is_one_line(tmp_path, capsys):
    over = write_config(tmp_path / "over.yaml", {"caption": {"dedup": {"max_distance": 9}}})
    broken = tmp_path / "broken.yaml"
    broken.write_text("caption: [unclosed\n")
    out = tmp_path / "out.jsonl"
    write_jsonl(tmp_path / "in.jsonl", [])
    args = ["dedup", "--config", str(ROOT / "config" / "sample.yaml"), "--config", str(over),
            "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--dropped", str(tmp_path / "dup.jsonl")]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["max_distance"] == 9  # the second file's
    assert main(["estimate", "--config", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{broken}: not valid YAML" in err


def test_commands_without_config_read_the_repositorys(tmp_path, capsys, monkeypatch):
    """`groundset summary` (and trace, estimate) with no --config read config/config.yaml of
    the repository (the README's own command), not a path beside the package's modules."""
    from groundset.core.config import DEFAULT_CONFIG

    assert DEFAULT_CONFIG == ROOT / "config" / "config.yaml" and DEFAULT_CONFIG.is_file()
    monkeypatch.chdir(tmp_path)  # its workdir, `results`, is relative: none here
    assert main(["summary"]) == 0, capsys.readouterr().err
    assert "no stats found" in capsys.readouterr().out


def test_a_reader_that_stops_early_is_no_error(tmp_path):
    """`groundset summary | head -1`: the pipe closes before the table is written."""
    from groundset.core.stats import envelope, write_stats

    write_stats(
        tmp_path / "url_lists" / "s" / "0a0b0c0d_stats.json", envelope("prefilter", 5, 3, {"x": 2})
    )
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    done = subprocess.run(
        [sys.executable, "-m", "groundset.cli", "summary", "--workdir", str(tmp_path)],
        stdout=write, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    os.close(write)
    assert done.returncode == 0 and "Broken pipe" not in done.stderr, done.stderr


def test_trace_says_why_it_found_nothing(tmp_path, capsys):
    from groundset.core.stats import envelope, write_stats

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["trace", "--workdir", str(empty), "s/000001"]) == 1
    assert f"no stage has run in {empty} yet" in capsys.readouterr().err
    write_stats(
        tmp_path / "url_lists" / "s" / "0a0b0c0d_stats.json", envelope("prefilter", 1, 1, {})
    )
    assert main(["trace", "--workdir", str(tmp_path), "nosuch/000001"]) == 1
    err = capsys.readouterr().err  # (the default config's sources, then the workdir's)
    assert "no source named 'nosuch' in this run (sources: " in err and err.endswith(", s)\n")
    assert main(["trace", "--workdir", str(tmp_path), "s/000001"]) == 1
    assert "s/000001 is unknown to every stage of this run" in capsys.readouterr().err
