import json

import pyarrow.parquet as pq
import pytest

from conftest import RANDOM_WEIGHTS, write_parquet
from groundset.core.config import ConfigError, download_options, validate_config
from groundset.stages.prefilter import (
    PrefilterRules,
    list_parquet_files,
    prefilter_url_list,
    run_prefilter,
)

COLUMNS = ["similarity", "hash", "punsafe", "pwatermark", "LANGUAGE"]


def urls(path):
    return pq.read_table(path).column("URL").to_pylist()


def with_prefilter(**prefilter) -> PrefilterRules:
    """The default rules with `download.prefilter` keys changed (the schema fills the rest)."""
    return PrefilterRules.from_config({"download": {"prefilter": prefilter}})


def test_size_and_aspect_rules_drop_before_download(tmp_path, laion_rows):
    src = write_parquet(tmp_path / "in" / "part0.parquet", laion_rows)
    stats = prefilter_url_list(src, tmp_path / "out", PrefilterRules.from_config({}), COLUMNS)
    # b: 800 px wide (too small); c: 3000/1024 = 2.93 (aspect); e: empty URL; d: no size -> kept.
    assert urls(tmp_path / "out" / "part0.parquet") == [
        "http://x/a.jpg",
        "http://x/d.jpg",
        "http://x/f.jpg",
    ]
    assert stats["records_in"] == 6 and stats["records_out"] == 3
    assert stats["dropped"] == {
        "missing_url": 1,
        "too_small": 1,
        "aspect_ratio": 1,
        "punsafe": 0,
        "pwatermark": 0,
    }
    assert stats["stage"] == "prefilter" and stats["files"]["part0.parquet"]["records_out"] == 3
    # every column survives, values intact; provenance added: the file and row of each URL
    table = pq.read_table(tmp_path / "out" / "part0.parquet")
    assert table.column_names == [*laion_rows[0], "url_list_file", "url_list_row"]
    assert table.column("hash").to_pylist() == [1, 4, 6]
    assert table.column("url_list_file").to_pylist() == ["part0.parquet"] * 3
    assert table.column("url_list_row").to_pylist() == [0, 3, 5]
    # each dropped row is a drop line (in a parquet file beside the list), with its first reason
    dropped = pq.read_table(tmp_path / "out_dropped.parquet").to_pylist()
    fields = ("url_list_file", "url_list_row", "url", "drop_stage", "drop_reason", "detail")
    assert [tuple(line[f] for f in fields) for line in dropped] == [
        ("part0.parquet", 1, "http://x/b.jpg", "prefilter", "too_small",
         "width or height below 1024 x 1024"),
        ("part0.parquet", 2, "http://x/c.jpg", "prefilter", "aspect_ratio",
         "width / height outside [0.5, 2.0]"),
        ("part0.parquet", 4, "", "prefilter", "missing_url", "no URL in URL"),
    ]  # fmt: skip
    # the drop fields of every line (no image id yet), and the row's values the rules read
    assert {(line["key"], line["image_id"], line["source"]) for line in dropped} == {
        (None, None, "out")
    }
    assert (dropped[0]["width"], dropped[0]["height"], dropped[0]["text"]) == (800.0, 1200.0, "b")


def test_row_numbers_run_across_batches_and_files(tmp_path):
    rows = [{"URL": f"http://x/{i}.jpg", "TEXT": "t", "WIDTH": 2000 - 1200 * (i % 2), "HEIGHT": 1100}
            for i in range(7)]  # fmt: skip
    write_parquet(tmp_path / "in" / "a.parquet", rows)
    write_parquet(tmp_path / "in" / "b.parquet", rows[:2])
    prefilter_url_list(tmp_path / "in", tmp_path / "out", PrefilterRules.from_config({}), None, 2)
    kept = pq.read_table(tmp_path / "out" / "a.parquet")
    assert kept.column("url_list_row").to_pylist() == [0, 2, 4, 6]
    assert pq.read_table(tmp_path / "out" / "b.parquet").column("url_list_file").to_pylist() == [
        "b.parquet"
    ]
    dropped = pq.read_table(tmp_path / "out_dropped.parquet")
    assert list(zip(dropped["url_list_file"].to_pylist(), dropped["url_list_row"].to_pylist(), strict=True)) == [
        ("a.parquet", 1), ("a.parquet", 3), ("a.parquet", 5), ("b.parquet", 1)
    ]  # fmt: skip


def test_a_url_list_with_groundsets_own_columns_is_refused(tmp_path):
    src = write_parquet(tmp_path / "l.parquet", [{"URL": "u", "TEXT": "t", "url_list_row": 3}])
    with pytest.raises(ValueError, match=r"url_list_row.*groundset adds itself"):
        prefilter_url_list(src, tmp_path / "out", PrefilterRules.from_config({}))


def test_boundaries_are_inclusive_like_the_filter_stage(tmp_path):
    rows = [
        {"URL": "u1", "WIDTH": 1024, "HEIGHT": 1024},  # exactly the minimum
        {"URL": "u2", "WIDTH": 2048, "HEIGHT": 1024},  # ratio exactly 2.0
        {"URL": "u3", "WIDTH": 1024, "HEIGHT": 2048},  # ratio exactly 0.5
        {"URL": "u4", "WIDTH": 1023, "HEIGHT": 4000},  # one px too narrow
        {"URL": "u5", "WIDTH": 2049, "HEIGHT": 1024},  # ratio just over 2
        {"URL": "u6", "WIDTH": 0, "HEIGHT": 1024},  # unknown size: keep
    ]
    rows = [{**row, "TEXT": "t"} for row in rows]
    src = write_parquet(tmp_path / "l.parquet", rows)
    stats = prefilter_url_list(src, tmp_path / "out", PrefilterRules.from_config({}))
    assert urls(tmp_path / "out" / "l.parquet") == ["u1", "u2", "u3", "u6"]
    assert stats["dropped"]["too_small"] == 1 and stats["dropped"]["aspect_ratio"] == 1


def test_thresholds_come_from_the_rules(tmp_path, laion_rows):
    src = write_parquet(tmp_path / "l.parquet", laion_rows)
    rules = PrefilterRules.from_config(
        {
            "filter": {
                "image_shape": {"min_width": 512, "min_height": 512},
                "aspect_ratio": {"max_ratio": 3.0},
            },
            "download": {"prefilter": {"max_punsafe": 0.1, "max_pwatermark": 0.9}},
        }
    )
    assert (rules.min_ratio, rules.size_filter) == (0.5, True)  # the rest: the schema's defaults
    stats = prefilter_url_list(src, tmp_path / "out", rules)
    # b fails punsafe (0.2), c fails punsafe (0.5), d fails pwatermark (0.95) and has null punsafe.
    assert urls(tmp_path / "out" / "l.parquet") == ["http://x/a.jpg", "http://x/f.jpg"]
    assert stats["dropped"] == {
        "missing_url": 1,
        "too_small": 0,
        "aspect_ratio": 0,
        "punsafe": 2,
        "pwatermark": 1,
    }


def test_disabled_size_filter_and_missing_columns_keep_rows(tmp_path):
    rows = [{"URL": "u1", "TEXT": "t"}, {"URL": "u2", "TEXT": "t"}]
    src = write_parquet(tmp_path / "l.parquet", rows)
    stats = prefilter_url_list(src, tmp_path / "out", with_prefilter(max_punsafe=0.1))
    assert stats["records_out"] == 2
    src = write_parquet(
        tmp_path / "m.parquet", [{"URL": "u", "TEXT": "t", "WIDTH": 10, "HEIGHT": 10}]
    )
    assert (
        prefilter_url_list(src, tmp_path / "o2", with_prefilter(enabled=False))["records_out"] == 1
    )


def test_folder_input_streams_in_batches(tmp_path):
    for k in range(3):
        rows = [
            {"URL": f"u{k}_{i}", "TEXT": "t", "WIDTH": 2000 if i % 2 else 100, "HEIGHT": 2000}
            for i in range(1000)
        ]
        write_parquet(tmp_path / "in" / f"part{k}.parquet", rows)
    stats = run_prefilter(
        tmp_path / "in",
        tmp_path / "out",
        tmp_path / "s.json",
        PrefilterRules.from_config({}),
        batch_rows=64,
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "part0.parquet",
        "part1.parquet",
        "part2.parquet",
    ]
    assert stats["records_in"] == 3000 and stats["records_out"] == 1500
    assert json.loads((tmp_path / "s.json").read_text())["dropped"]["too_small"] == 1500
    assert urls(tmp_path / "out" / "part1.parquet")[:2] == ["u1_1", "u1_3"]


def test_all_rows_dropped_still_writes_a_readable_file(tmp_path):
    src = write_parquet(
        tmp_path / "l.parquet", [{"URL": "u", "TEXT": "t", "WIDTH": 5, "HEIGHT": 5}]
    )
    prefilter_url_list(src, tmp_path / "out", PrefilterRules.from_config({}))
    assert pq.read_table(tmp_path / "out" / "l.parquet").num_rows == 0


def test_clear_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.parquet does not exist"):
        list_parquet_files(tmp_path / "nowhere.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        list_parquet_files(tmp_path / "empty")
    src = write_parquet(tmp_path / "nourl.parquet", [{"url": "u", "TEXT": "t"}])
    with pytest.raises(ValueError, match=r"nourl.parquet: missing column\(s\) \['URL'\]"):
        prefilter_url_list(src, tmp_path / "out", PrefilterRules.from_config({}))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="bad.parquet: not a readable parquet file"):
        prefilter_url_list(bad, tmp_path / "out", PrefilterRules.from_config({}))


def error_of(src, tmp_path, rules=None, columns=None) -> str:
    with pytest.raises(ValueError) as caught:
        prefilter_url_list(src, tmp_path / "out", rules or PrefilterRules.from_config({}), columns)
    return str(caught.value)


def test_missing_url_or_caption_column_is_named_with_the_files_columns(tmp_path):
    # img2dataset would die inside pyarrow: "ArrowInvalid: No match for FieldRef.Name(TEXT)"
    src = write_parquet(
        tmp_path / "url_lists" / "foo.parquet", [{"URL": "u", "caption": "c", "WIDTH": 2000}]
    )
    assert error_of(src, tmp_path) == (
        f"{src}: missing column(s) ['TEXT']: it has no caption column 'TEXT' "
        "(download.caption_col); its columns: URL, caption, WIDTH"
    )
    # download.prefilter.enabled: false only turns the size rules off: columns are still checked
    assert "no caption column 'TEXT'" in error_of(src, tmp_path, with_prefilter(enabled=False))
    src = write_parquet(tmp_path / "nourl.parquet", [{"url": "u", "TEXT": "t"}])
    assert error_of(src, tmp_path) == (
        f"{src}: missing column(s) ['URL']: it has no URL column 'URL' (download.url_col); "
        "its columns: url, TEXT"
    )
    # the config's names are the ones checked
    assert (
        prefilter_url_list(
            src, tmp_path / "ok", PrefilterRules.from_config({"download": {"url_col": "url"}})
        )["records_out"]
        == 1
    )


def test_missing_saved_columns_name_the_config_key(tmp_path):
    src = write_parquet(tmp_path / "nocol.parquet", [{"URL": "u", "TEXT": "t", "hash": 1}])
    message = error_of(src, tmp_path, columns=["hash", "LANGUAGE"])
    assert message == (
        f"{src}: missing column(s) ['LANGUAGE']: it has no column 'LANGUAGE' "
        "(sources[].save_additional_columns); its columns: URL, TEXT, hash"
    )
    src = write_parquet(tmp_path / "bare.parquet", [{"URL": "u"}])
    message = error_of(src, tmp_path, columns=["similarity", "punsafe"])
    assert message == (
        f"{src}: missing column(s) ['TEXT', 'similarity', 'punsafe']: it has no caption column "
        "'TEXT' (download.caption_col) and no columns 'similarity', 'punsafe' "
        "(sources[].save_additional_columns); its columns: URL"
    )


def test_columns_of_every_file_are_checked_before_any_is_written(tmp_path):
    write_parquet(tmp_path / "in" / "part0.parquet", [{"URL": "u", "TEXT": "t"}])
    write_parquet(tmp_path / "in" / "part1.parquet", [{"URL": "u", "caption": "t"}])
    with pytest.raises(ValueError, match=r"part1.parquet: missing column\(s\) \['TEXT'\]"):
        prefilter_url_list(tmp_path / "in", tmp_path / "out", PrefilterRules.from_config({}))
    assert list((tmp_path / "out").iterdir()) == []


def test_rules_from_config_carry_the_caption_column():
    config = {
        "filter": {
            "image_shape": {"min_width": 1, "min_height": 1},
            "aspect_ratio": {"min_ratio": 0.1, "max_ratio": 10},
        }
    }
    download = {
        "url_col": "url",
        "caption_col": "caption",
        "prefilter": {"enabled": False, "max_punsafe": None, "max_pwatermark": None},
    }
    rules = PrefilterRules.from_config(config, download)
    assert (rules.url_col, rules.caption_col, rules.size_filter) == ("url", "caption", False)
    assert (rules.min_width, rules.max_ratio) == (1, 10)


def test_rules_read_a_sources_download_and_name_a_bad_key():
    config = validate_config(
        {
            "sources": [
                {"name": "s", "url_list": "x", "download": {"prefilter": {"max_punsafe": 0.2}}}
            ],
            "filter": {"image_shape": {"min_width": 640}},
            **RANDOM_WEIGHTS,
        }
    )
    rules = PrefilterRules.from_config(config, download_options(config, config["sources"][0]))
    assert (rules.min_width, rules.min_height, rules.max_punsafe) == (640, 1024, 0.2)
    assert PrefilterRules.from_config(config).max_punsafe is None  # the global download section
    with pytest.raises(ConfigError, match=r"(?m)^filter\.image_shape\.min_width: 'wide' is not"):
        PrefilterRules.from_config({"filter": {"image_shape": {"min_width": "wide"}}})
    with pytest.raises(ConfigError, match=r"(?m)^download\.prefilter\.max_punsafe: 2 is greater"):
        with_prefilter(max_punsafe=2)


def test_nothing_dropped_and_no_rows_are_normal_outcomes(tmp_path):
    """Zero drops (or zero rows) still write a readable drop file, with the drop-line columns."""
    from groundset.stages.prefilter import DROP_SCHEMA

    good = write_parquet(tmp_path / "in" / "a.parquet", [{"URL": "u", "TEXT": "t"}])
    stats = prefilter_url_list(good, tmp_path / "out", PrefilterRules.from_config({}))
    assert (stats["records_in"], stats["records_out"], sum(stats["dropped"].values())) == (1, 1, 0)
    dropped = pq.read_table(tmp_path / "out_dropped.parquet")
    assert dropped.num_rows == 0 and dropped.schema.equals(DROP_SCHEMA)
    pq.write_table(pq.read_table(good).slice(0, 0), good)  # no rows at all
    stats = prefilter_url_list(good, tmp_path / "out", PrefilterRules.from_config({}))
    assert (stats["records_in"], stats["records_out"]) == (0, 0)
    assert pq.read_table(tmp_path / "out" / "a.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "out_dropped.parquet").num_rows == 0
