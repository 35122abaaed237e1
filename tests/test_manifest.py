import json

import pytest

from conftest import fake_download
from groundset.core.io import iter_jsonl
from groundset.stages.manifest import build_manifest, make_record


def test_manifest_records_follow_the_design_format(tmp_path):
    root = fake_download(tmp_path / "dl", shards=2, per_shard=3, failures=2)
    out = tmp_path / "m.jsonl"
    cols = ["similarity", "hash", "punsafe", "pwatermark", "LANGUAGE"]
    stats = build_manifest(root, out, "laion-high-resolution", cols, tmp_path / "s.json")
    records = list(iter_jsonl(out))
    assert [r["image_id"] for r in records] == [
        "000000000",
        "000000001",
        "000000002",
        "000010000",
        "000010001",
        "000010002",
    ]
    first = records[0]
    assert first["image"] == [str((root / "00000" / "000000000.jpg").resolve())]
    assert first["text"] == "caption 000000000" and first["source"] == "laion-high-resolution"
    assert first["url"] == "http://x/000000000.jpg"
    assert first["meta"] == {
        "similarity": 0.31,
        "hash": 123,
        "punsafe": None,
        "pwatermark": 0.2,
        "LANGUAGE": "en",
    }
    assert (first["width"], first["height"]) == (1024, 768)
    assert stats["records_out"] == 6 and stats["failed_downloads"] == 4
    assert json.loads((tmp_path / "s.json").read_text()) == stats
    assert "NaN" not in out.read_text()


def test_unusable_entries_are_counted_not_listed(tmp_path):
    root = fake_download(tmp_path / "dl", shards=1, per_shard=4)
    (root / "00000" / "000000001.jpg").unlink()  # image vanished
    (root / "00000" / "000000002.json").write_text("{truncated")  # corrupt sidecar
    side = json.loads((root / "00000" / "000000003.json").read_text())
    (root / "00000" / "000000003.json").write_text(
        json.dumps({**side, "status": "failed_to_download"})
    )
    (root / "_tmp").mkdir()  # img2dataset's scratch folder is not a shard
    (root / "notes.txt").write_text("x")
    stats = build_manifest(root, tmp_path / "m.jsonl", "s")
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "m.jsonl")] == ["000000000"]
    assert stats["dropped"] == {"bad_sidecar": 1, "not_success": 1, "image_missing": 1}
    assert stats["records_out"] == 1 and stats["records_in"] == 4
    # each sidecar not passed on is a drop line with its reason and what went wrong
    drops = {d["image_id"]: d for d in iter_jsonl(tmp_path / "m_dropped.jsonl")}
    assert {k: (d["drop_stage"], d["drop_reason"]) for k, d in drops.items()} == {
        "000000001": ("manifest", "image_missing"),
        "000000002": ("manifest", "bad_sidecar"),
        "000000003": ("manifest", "not_success"),
    }
    assert drops["000000003"]["detail"] == "failed_to_download: None"
    assert drops["000000003"]["url"] == "http://x/000000003.jpg"
    assert drops["000000001"]["key"] == "s/000000001"


def test_columns_are_inferred_without_a_config(tmp_path):
    record = make_record(
        tmp_path / "00000" / "000000005.webp",
        {"caption": None, "url": "u", "key": "k", "status": "success", "AESTHETIC_SCORE": 6.1},
        "aes",
        None,
    )
    assert (
        record["meta"] == {"AESTHETIC_SCORE": 6.1}
        and record["text"] == ""
        and record["image_id"] == "000000005"
    )


def test_provenance_becomes_top_level_fields(tmp_path):
    meta = {"caption": "c", "url": "u", "status": "success", "LANGUAGE": "en",
            "url_list_file": "part-3.parquet", "url_list_row": 41}  # fmt: skip
    for columns in (None, ["LANGUAGE", "url_list_file", "url_list_row"]):
        record = make_record(tmp_path / "00000" / "000000005.jpg", meta, "s", columns)
        assert record["meta"] == {"LANGUAGE": "en"}
        assert (record["url_list_file"], record["url_list_row"]) == ("part-3.parquet", 41)


def test_missing_download_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download folder .*nowhere does not exist"):
        build_manifest(tmp_path / "nowhere", tmp_path / "m.jsonl", "s")
    assert not (tmp_path / "m.jsonl").exists()
