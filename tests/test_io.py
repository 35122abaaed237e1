import json

import pytest

from groundset.io import (
    atomic_write,
    clean_json_value,
    dumps_record,
    iter_jsonl,
    write_json,
    write_jsonl,
)


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]  # no temp file left behind
    with atomic_write(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"


def test_clean_json_value_maps_nan_to_none():
    assert clean_json_value({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None,
        "b": [1.0, None],
        "c": "x",
    }


def test_dumps_record_is_strict_utf8_json():
    line = dumps_record({"text": "日落", "x": 1})
    assert "日落" in line and json.loads(line) == {"text": "日落", "x": 1}
    with pytest.raises(ValueError):
        dumps_record({"x": float("nan")})


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    assert write_jsonl(path, ({"i": i} for i in range(3))) == 3
    assert [r["i"] for r in iter_jsonl(path)] == [0, 1, 2]
    path.write_text('{"i": 0}\n\n{broken\n')
    with pytest.raises(ValueError, match=r"r.jsonl:3"):
        list(iter_jsonl(path))


def test_write_json_sorted(tmp_path):
    write_json(tmp_path / "s.json", {"b": 1, "a": float("nan")})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": None, "b": 1}
