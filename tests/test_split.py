import json
import random

import pytest

from groundset.core.io import iter_jsonl
from groundset.stages.split import (
    index_manifest,
    read_index,
    split_manifest,
    write_shard,
)


def manifest(path, n, newline_at_end=True):
    lines = [json.dumps({"image_id": f"{i:09d}", "text": "x" * (i % 7)}) for i in range(n)]
    text = "\n".join(lines) + ("\n" if newline_at_end and n else "")
    path.write_text(text)
    return path


@pytest.mark.parametrize("n, size", [(1180, 10), (1181, 10), (9, 10), (10, 10), (1, 1), (25, 7)])
def test_shards_partition_the_manifest(tmp_path, n, size):
    path = manifest(tmp_path / "m.jsonl", n)
    index = split_manifest(path, tmp_path / "shards", size)
    expected = -(-n // size)
    assert len(index["shards"]) == expected and index["records"] == n
    ids = []
    for entry in index["shards"]:
        records = list(iter_jsonl(tmp_path / "shards" / entry["file"]))
        assert len(records) == entry["records"] == min(size, n - entry["shard"] * size)
        ids += [r["image_id"] for r in records]
    assert ids == [f"{i:09d}" for i in range(n)]
    joined = b"".join((tmp_path / "shards" / e["file"]).read_bytes() for e in index["shards"])
    assert joined == path.read_bytes()  # byte-identical slices
    assert read_index(tmp_path / "shards" / "index.json") == index


def test_118_shards_of_the_seed_shape(tmp_path):
    path = manifest(tmp_path / "m.jsonl", 1180)
    assert len(index_manifest(path, 10)["shards"]) == 118


def test_small_blocks_and_boundaries_inside_blocks(tmp_path):
    path = manifest(tmp_path / "m.jsonl", 503)
    whole = index_manifest(path, 17)
    assert index_manifest(path, 17, block=61) == whole  # blocks smaller than a line and unaligned


def test_last_line_without_newline_and_empty_file(tmp_path):
    path = manifest(tmp_path / "m.jsonl", 5, newline_at_end=False)
    index = split_manifest(path, tmp_path / "s", 2)
    assert [e["records"] for e in index["shards"]] == [2, 2, 1]
    assert (tmp_path / "s" / "shard_2.jsonl").read_text().endswith("}\n")
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert index_manifest(empty, 3)["shards"] == []


def test_blank_lines_are_rejected_with_position(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    with pytest.raises(ValueError, match="blank line"):
        index_manifest(path, 1)
    path.write_text('\n{"a": 1}\n')
    with pytest.raises(ValueError, match="blank line"):
        index_manifest(path, 1)


def test_write_one_shard_and_detect_a_changed_manifest(tmp_path):
    path = manifest(tmp_path / "m.jsonl", 30)
    index = index_manifest(path, 8)
    assert write_shard(index, 3, tmp_path / "shard_3.jsonl") == 6
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "shard_3.jsonl")] == [
        f"{i:09d}" for i in range(24, 30)
    ]
    with pytest.raises(IndexError):
        write_shard(index, 4, tmp_path / "x.jsonl")
    manifest(path, 31)
    with pytest.raises(RuntimeError, match="changed since it was indexed"):
        write_shard(index, 0, tmp_path / "y.jsonl")
    with pytest.raises(ValueError):
        index_manifest(path, 0)


def test_random_manifests_round_trip(tmp_path):
    rng = random.Random(7)
    for trial in range(20):
        n, size = rng.randint(0, 300), rng.randint(1, 50)
        path = manifest(tmp_path / f"m{trial}.jsonl", n, newline_at_end=rng.random() < 0.8)
        index = index_manifest(path, size, block=rng.randint(8, 4096))
        assert sum(e["records"] for e in index["shards"]) == n
        assert [e["start"] for e in index["shards"][1:]] == [e["end"] for e in index["shards"][:-1]]


@pytest.mark.parametrize("block", [7, 61, 4096])
def test_one_pass_split_equals_per_shard_writes(tmp_path, block):
    from groundset.stages.split import ShardSink

    path = manifest(tmp_path / "m.jsonl", 137, newline_at_end=False)
    index = index_manifest(path, 11, block=block, sink=ShardSink(tmp_path / "one"))
    for entry in index["shards"]:
        write_shard(index, entry["shard"], tmp_path / "each" / entry["file"])
        one = (tmp_path / "one" / entry["file"]).read_bytes()
        assert one == (tmp_path / "each" / entry["file"]).read_bytes() and one.endswith(b"}\n")
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(
        e["file"] for e in index["shards"]
    )


def test_failed_split_leaves_no_partial_shard(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3}\n\n{"a": 4}\n')
    with pytest.raises(ValueError, match="blank line"):
        split_manifest(path, tmp_path / "out", 2)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []
