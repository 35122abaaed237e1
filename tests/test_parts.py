"""Download parts: the plan from the footers, stable names, the prefilter of one part's rows."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from groundset.stages.manifest import build_manifest
from groundset.stages.parts import (
    Part,
    file_parts,
    find_part,
    image_id,
    part_of,
    plan_parts,
    read_plan,
    write_plan,
)
from groundset.stages.prefilter import PrefilterRules, prefilter_part, prefilter_url_list


def rows(n: int, start: int = 0) -> list[dict]:
    """n LAION-like rows; every third one too small for the default prefilter."""
    return [
        {"URL": f"http://x/{i}.jpg", "TEXT": f"t{i}", "WIDTH": 800 if i % 3 == 0 else 1200,
         "HEIGHT": 1200}
        for i in range(start, start + n)
    ]  # fmt: skip


def write_list(path, n, row_group_size=4):
    """A URL-list file of n rows in row groups of `row_group_size`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows(n)), path, row_group_size=row_group_size)
    return path


def test_parts_cover_every_row_of_every_file_once(tmp_path):
    write_list(tmp_path / "urls" / "a.parquet", 10)
    write_list(tmp_path / "urls" / "b.parquet", 3)
    parts = plan_parts(tmp_path / "urls", 4)
    assert [(p.file, p.start, p.stop) for p in parts] == [
        ("a.parquet", 0, 4), ("a.parquet", 4, 8), ("a.parquet", 8, 10), ("b.parquet", 0, 3)
    ]  # fmt: skip
    assert len({p.name for p in parts}) == 4 and all(len(p.name) == 8 for p in parts)
    whole = plan_parts(tmp_path / "urls", None)
    assert [(p.file, p.start, p.stop) for p in whole] == [("a.parquet", 0, 10), ("b.parquet", 0, 3)]


def test_adding_or_removing_a_file_keeps_the_other_parts_names(tmp_path):
    write_list(tmp_path / "urls" / "b.parquet", 5)
    before = {p.name: p for p in plan_parts(tmp_path / "urls", 2)}
    write_list(tmp_path / "urls" / "a.parquet", 5)  # sorts first: the order changes
    after = {p.name: p for p in plan_parts(tmp_path / "urls", 2)}
    assert set(before) < set(after) and all(after[name] == p for name, p in before.items())
    assert len(after) - len(before) == 3


def test_an_empty_file_is_one_empty_part_and_names_are_found(tmp_path):
    assert [(p.start, p.stop) for p in file_parts("e.parquet", 0, 5)] == [(0, 0)]
    parts = file_parts("f.parquet", 7, 5)
    assert find_part(parts, parts[1].name) == parts[1]
    with pytest.raises(KeyError, match="no download part 'nothing'"):
        find_part(parts, "nothing")


def test_image_ids_carry_their_part():
    assert image_id("0a1b2c3d", "000000004") == "0a1b2c3d_000000004"
    assert part_of("0a1b2c3d_000000004") == "0a1b2c3d"
    assert part_of("000000004") is None


def test_the_plan_reads_back(tmp_path):
    parts = [Part("0a1b2c3d", "a.parquet", 0, 4), Part("1a1b2c3d", "a.parquet", 4, 6)]
    write_plan(tmp_path / "plan.json", "src", parts)
    assert read_plan(tmp_path / "plan.json") == parts
    assert json.loads((tmp_path / "plan.json").read_text())["source"] == "src"
    assert read_plan(tmp_path / "none.json") == []


def test_the_parts_prefilter_what_the_whole_list_does(tmp_path):
    src = write_list(tmp_path / "urls" / "a.parquet", 10, row_group_size=3)
    rules = PrefilterRules.from_config({})
    whole = prefilter_url_list(src, tmp_path / "whole", rules, [])
    kept, dropped, counted = [], [], 0
    for part in plan_parts(src, 4):
        out = tmp_path / "parts" / "src" / f"{part.name}.parquet"
        drops = tmp_path / "parts" / "src" / f"{part.name}_dropped.parquet"
        stats = prefilter_part(src, vars(part), out, out.with_suffix(".json"), drops, rules)
        assert stats["records_in"] == part.rows and stats["part"] == vars(part)
        table = pq.read_table(out).to_pylist()
        assert [r["url_list_row"] for r in table + pq.read_table(drops).to_pylist()] != []
        kept += table
        dropped += pq.read_table(drops).to_pylist()
        counted += stats["records_out"]
    assert kept == pq.read_table(tmp_path / "whole" / "a.parquet").to_pylist()
    assert counted == whole["records_out"] == len(kept) == 6
    assert sorted(r["url_list_row"] for r in kept + dropped) == list(range(10))
    assert {r["drop_reason"] for r in dropped} == {"too_small"} and len(dropped) == 4


def _img2dataset_folder(folder, keys):
    """A folder as img2dataset `files` writes it: one shard of images and sidecars."""
    shard = folder / "00000"
    shard.mkdir(parents=True)
    for key in keys:
        (shard / f"{key}.jpg").write_bytes(b"not decoded here")
        (shard / f"{key}.json").write_text(json.dumps({"key": key, "status": "success",
                                                       "url": f"http://x/{key}", "caption": key}))  # fmt: skip


def test_the_manifest_of_parts_prefixes_and_sorts_ids(tmp_path):
    _img2dataset_folder(tmp_path / "dl" / "ffff0000", ["000000000", "000000001"])
    _img2dataset_folder(tmp_path / "dl" / "0000ffff", ["000000000"])
    folders = [tmp_path / "dl" / "ffff0000", tmp_path / "dl" / "0000ffff"]
    out = tmp_path / "m.jsonl"
    stats = build_manifest(folders, out, "src", [], tmp_path / "s.json", parts=True)
    ids = [json.loads(line)["image_id"] for line in out.read_text().splitlines()]
    assert ids == ["0000ffff_000000000", "ffff0000_000000000", "ffff0000_000000001"]
    assert stats["records_out"] == 3 and stats["parts"] == ["0000ffff", "ffff0000"]
