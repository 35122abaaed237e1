"""Dedup stage: exact (bytes, URL) and near (phash) duplicates, the greedy rule, the hash cache."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundset.core.io import iter_jsonl, read_json, write_jsonl
from groundset.stages.dedup import (
    KINDS,
    aesthetic_score,
    bands,
    cluster,
    dedup_records,
    near_pairs,
    phash_bytes,
)

SAMPLE_IMG = Path(__file__).resolve().parent / "data" / "sample" / "www" / "img"
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble", "rocket", "retina", "ihc")


def hamming(a: int, b: int) -> int:
    """Reference: bits that differ between two 64-bit hashes."""
    return (a ^ b).bit_count()


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, str]:
    """The sample's real photos copied into the test's folder, by name."""
    folder = tmp_path / "img"
    folder.mkdir()
    paths = {}
    for name in PHOTOS:
        shutil.copyfile(SAMPLE_IMG / f"{name}.jpg", folder / f"{name}.jpg")
        paths[name] = str(folder / f"{name}.jpg")
    return paths


def record(image_id: str, path: str, score: float | None = None, url: str | None = None) -> dict:
    """A filtered record (DESIGN shape) with an aesthetic score in data-juicer's stats."""
    rec = {
        "image": [path],
        "text": f"alt {image_id}",
        "image_id": image_id,
        "source": "src",
        "url": url if url is not None else f"https://example.com/{image_id}.jpg",
        "meta": {"similarity": 0.3},
    }
    if score is not None:
        rec["__dj__stats__"] = {"image_aesthetics_scores": [score]}
    return rec


def run(tmp_path: Path, records: list[dict], **kwargs) -> tuple[list[dict], list[dict], dict]:
    """Dedup `records`; return (kept, dropped, stats) as read back from the files."""
    src = tmp_path / "in.jsonl"
    write_jsonl(src, records)
    out, dropped, stats = tmp_path / "out.jsonl", tmp_path / "dropped.jsonl", tmp_path / "s.json"
    result = dedup_records(src, out, dropped, stats, **kwargs)
    assert read_json(stats) == json.loads(json.dumps(result))
    assert result["stage"] == "dedup"
    assert result["records_in"] == result["records_out"] + sum(result["dropped"].values())
    assert result["records_in"] == len(records)
    return list(iter_jsonl(out)), list(iter_jsonl(dropped)), result


def reencode(src: str, dest: Path, scale: float = 0.95, quality: int = 60) -> str:
    """A slightly smaller, lower-quality JPEG of an image."""
    with Image.open(src) as img:
        size = (round(img.width * scale), round(img.height * scale))
        img.convert("RGB").resize(size, Image.BICUBIC).save(dest, quality=quality)
    return str(dest)


def ids(records: list[dict]) -> list[str]:
    """The image ids of records, in order."""
    return [rec["image_id"] for rec in records]


# --- pure parts ---------------------------------------------------------------------------


def test_hamming_and_bands_cover_the_hash():
    for distance in range(0, 9):
        parts = bands(distance)
        assert len(parts) == distance + 1
        bits = [mask << shift for shift, mask in parts]
        assert sum(bits) == (1 << 64) - 1  # disjoint and covering
        assert all(a & b == 0 for a, b in itertools.combinations(bits, 2))


def test_near_pairs_equal_brute_force():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**64 - 1, 300, dtype=np.uint64)
    variants = []
    for value in base[:150]:  # plant neighbours at 1..8 bits
        flips = rng.choice(64, size=int(rng.integers(1, 9)), replace=False)
        variants.append(int(value) ^ sum(1 << int(b) for b in flips))
    low = [0, 1, 3, 7, 1 << 63]  # low-entropy hashes sharing most band values
    hashes = np.unique(np.r_[base, np.array(variants + low, dtype=np.uint64)])
    values = [int(h) for h in hashes]
    for distance in (0, 1, 4, 7):
        a, b, d, _ = near_pairs(hashes, distance)
        got = {(int(i), int(j), int(k)) for i, j, k in zip(a, b, d, strict=True)}
        want = {
            (i, j, (values[i] ^ values[j]).bit_count())
            for i, j in itertools.combinations(range(len(values)), 2)
            if (values[i] ^ values[j]).bit_count() <= distance
        }
        assert got == want
        assert len(got) == len(a)  # no pair twice


def reference_greedy(score, sha, url, phash, max_distance):
    """The rule written plainly (quadratic): visit by descending score, ties by input order."""
    order = sorted(range(len(score)), key=lambda i: (-score[i], i))
    kept: list[int] = []
    verdict = {}
    owner: dict[tuple[int, int], int] = {}  # (kind, key) -> the kept record it leads to
    for i in order:
        match = None
        for kind, key in ((1, sha), (2, url)):
            if match is None and key[i] is not None and (kind, key[i]) in owner:
                match = (kind, owner[kind, key[i]])
        if match is None and phash[i] is not None:
            near = [
                (hamming(phash[i], phash[k]), rank, k)
                for rank, k in enumerate(kept)
                if phash[k] is not None and hamming(phash[i], phash[k]) <= max_distance
            ]
            if near:
                match = (3, min(near)[2])
        if match is None:
            kept.append(i)
        else:
            verdict[i] = match
        for kind, key in ((1, sha), (2, url)):  # seen bytes and URLs lead to the kept record
            if key[i] is not None:
                owner.setdefault((kind, key[i]), i if match is None else match[1])
    return verdict


@pytest.mark.parametrize("seed", range(6))
def test_cluster_equals_the_plain_rule(seed: int):
    rng = np.random.default_rng(seed)
    n = 300
    score = rng.choice([4.0, 5.0, 5.5, 6.0, 7.0, np.nan], size=n)
    sha = [int(v) if v < 250 else None for v in rng.integers(0, 280, n)]
    url = [int(v) if v < 260 else None for v in rng.integers(0, 300, n)]
    roots = rng.integers(0, 2**64 - 1, 40, dtype=np.uint64)
    phash: list[int | None] = []
    for _ in range(n):
        if rng.random() < 0.1:
            phash.append(None)
            continue
        flips = rng.choice(64, size=int(rng.integers(0, 6)), replace=False)
        phash.append(int(rng.choice(roots)) ^ sum(1 << int(b) for b in flips))
    hashes = np.unique(np.array([h for h in phash if h is not None], dtype=np.uint64))
    index = {int(h): k for k, h in enumerate(hashes)}

    def dense(keys):
        return np.array([-1 if k is None else k for k in keys], dtype=np.int32)

    phash_id = dense([None if h is None else index[h] for h in phash])
    for distance in (0, 4):
        got = cluster(score, dense(sha), dense(url), phash_id, hashes, distance)
        plain_score = [-np.inf if np.isnan(s) else s for s in score]
        want = reference_greedy(plain_score, sha, url, phash, distance)
        dropped = {
            int(i): (int(got.kind[i]), int(got.duplicate_of[i]))
            for i in np.flatnonzero(got.duplicate_of >= 0)
        }
        assert dropped == want
        assert all(got.duplicate_of[k] < 0 for _, k in want.values())  # points at kept ones


def test_aesthetic_score_sources():
    assert aesthetic_score({"__dj__stats__": {"image_aesthetics_scores": [6.2]}}) == 6.2
    assert aesthetic_score({"meta": {"AESTHETIC_SCORE": 5.1}}) == 5.1
    assert aesthetic_score({"meta": {"AESTHETIC_SCORE": None}}) is None
    assert aesthetic_score({}) is None


# --- the stage ----------------------------------------------------------------------------


def test_exact_url_and_near_duplicates(tmp_path: Path, photos: dict[str, str]):
    copy = tmp_path / "img" / "astronaut_copy.jpg"
    shutil.copyfile(photos["astronaut"], copy)
    smaller = reencode(photos["hubble"], tmp_path / "img" / "hubble_small.jpg")
    records = [
        record("a0", photos["astronaut"], 5.0),
        record("a1", str(copy), 6.5),  # same bytes, higher score: kept
        record("c0", photos["chelsea"], 6.0, url="https://x/same.jpg"),
        record("c1", photos["coffee"], 5.5, url=" https://x/same.jpg "),  # same URL
        record("h0", photos["hubble"], 5.0),
        record("h1", smaller, None),
        record("r0", photos["rocket"], 5.2),
        record("r1", photos["retina"], 5.3),
        record("i0", photos["ihc"], 6.0),
    ]
    records[5]["meta"]["AESTHETIC_SCORE"] = 7.0  # LAION's score when data-juicer's is absent
    kept, dropped, stats = run(tmp_path, records, max_distance=4)
    assert ids(kept) == ["a1", "c0", "h1", "r0", "r1", "i0"]  # input order
    by_id = {rec["image_id"]: rec for rec in dropped}
    assert ids(dropped) == ["a0", "c1", "h0"]
    assert by_id["a0"]["duplicate_of"] == "src/a1"
    assert by_id["a0"]["duplicate_kind"] == "sha256"
    assert by_id["a0"]["phash_distance"] == 0
    assert by_id["c1"]["duplicate_of"] == "src/c0"
    assert by_id["c1"]["duplicate_kind"] == "url"
    assert by_id["c1"]["phash_distance"] > 4  # different photos under one URL
    assert by_id["h0"]["duplicate_of"] == "src/h1"
    assert by_id["h0"]["duplicate_kind"] == "phash"
    assert 0 < by_id["h0"]["phash_distance"] <= 4
    for rec in dropped:
        assert rec["drop_stage"] == "dedup" and rec["drop_reason"] == rec["duplicate_kind"]
        assert rec["detail"] == f"{rec['duplicate_kind']} duplicate of {rec['duplicate_of']}"
        assert rec["key"] == f"src/{rec['image_id']}"
        assert rec["text"] == f"alt {rec['image_id']}"  # the whole record
    for rec in kept + dropped:
        assert len(rec["sha256"]) == 64 and len(rec["phash"]) == 16
        assert "duplicate_of" not in rec or rec in dropped
    assert stats["dropped"] == {"sha256": 1, "url": 1, "phash": 1}
    assert stats["unhashable"] == 0 and stats["hashed"] == len(records)
    assert stats["enabled"] is True and stats["max_distance"] == 4


def test_a_url_listed_again_is_a_url_duplicate_when_its_first_copy_was_dropped(
    tmp_path: Path, photos: dict[str, str]
):
    smaller = reencode(photos["hubble"], tmp_path / "img" / "hubble_small.jpg")
    again = tmp_path / "img" / "hubble_small_again.jpg"
    shutil.copyfile(smaller, again)
    records = [
        record("h0", photos["hubble"], 7.0),  # kept
        record("h1", smaller, 6.0, url="https://x/small.jpg"),  # near h0: phash
        record("h2", str(again), 5.0, url="https://x/small.jpg"),  # h1's URL (and bytes)
        record("h3", photos["chelsea"], 4.0, url="https://x/small.jpg"),  # h1's URL only
    ]
    kept, dropped, stats = run(tmp_path, records, max_distance=4)
    assert ids(kept) == ["h0"]
    by_id = {rec["image_id"]: rec for rec in dropped}
    assert by_id["h1"]["duplicate_kind"] == "phash"
    assert by_id["h2"]["duplicate_kind"] == "sha256"  # the same bytes as h1
    assert by_id["h3"]["duplicate_kind"] == "url"  # the same URL as h1
    assert {rec["duplicate_of"] for rec in dropped} == {"src/h0"}  # the kept one, never a dropped
    assert stats["dropped"] == {"sha256": 1, "url": 1, "phash": 1}


def test_scores_equal_but_for_their_last_digits_keep_the_first_copy(
    tmp_path: Path, photos: dict[str, str]
):
    """One image scored in two batches (or on 1 thread and on 2) differs in the 7th digit:
    which copy stays must not depend on it (README: Reproducibility)."""
    copy = tmp_path / "img" / "astronaut_copy.jpg"
    shutil.copyfile(photos["astronaut"], copy)
    for low, high in ((6.190340995788574, 6.190341234), (6.190341234, 6.190340995788574)):
        records = [record("a0", photos["astronaut"], low), record("a1", str(copy), high)]
        kept, dropped, _ = run(tmp_path, records, max_distance=4)
        assert ids(kept) == ["a0"] and ids(dropped) == ["a1"], (low, high)
    records = [record("a0", photos["astronaut"], 6.19), record("a1", str(copy), 6.192)]
    assert ids(run(tmp_path, records, max_distance=4)[0]) == ["a1"]  # a real difference counts


def test_reencode_not_merged_at_distance_zero(tmp_path: Path, photos: dict[str, str]):
    smaller = reencode(photos["hubble"], tmp_path / "img" / "hubble_small.jpg")
    records = [record("h0", photos["hubble"], 5.0), record("h1", smaller, 6.0)]
    kept, dropped, stats = run(tmp_path, records, max_distance=0)
    assert ids(kept) == ["h0", "h1"] and not dropped
    assert sum(stats["dropped"].values()) == 0


def test_distinct_photos_never_merged(tmp_path: Path, photos: dict[str, str]):
    records = [record(name, path, 5.0) for name, path in photos.items()]
    kept, dropped, _ = run(tmp_path, records, max_distance=8)
    assert ids(kept) == list(PHOTOS) and not dropped


def test_ties_keep_the_first_and_missing_scores_rank_last(tmp_path: Path, photos: dict[str, str]):
    folder = tmp_path / "img"
    copies = [str(folder / f"copy{i}.jpg") for i in range(4)]
    for path in copies:
        shutil.copyfile(photos["coffee"], path)
    records = [
        record("n", copies[0], None),  # no score: lowest
        record("t1", copies[1], 5.0),
        record("t2", copies[2], 5.0),
        record("low", copies[3], 4.0),
    ]
    kept, dropped, _ = run(tmp_path, records)
    assert ids(kept) == ["t1"]
    assert {rec["duplicate_of"] for rec in dropped} == {"src/t1"}


def test_record_sha256_is_used(tmp_path: Path, photos: dict[str, str]):
    digest = "ab" * 32
    records = [record("x", photos["rocket"], 6.0), record("y", photos["retina"], 5.0)]
    records[0]["meta"]["sha256"] = digest  # img2dataset's
    records[1]["sha256"] = digest.upper()
    kept, dropped, _ = run(tmp_path, records)
    assert ids(kept) == ["x"] and kept[0]["sha256"] == digest
    assert dropped[0]["duplicate_kind"] == "sha256"
    assert dropped[0]["sha256"] == digest.upper()  # the record's own field is left as it is


def test_unreadable_images_are_kept_and_counted(tmp_path: Path, photos: dict[str, str]):
    folder = tmp_path / "img"
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"not an image at all")
    data = Path(photos["hubble"]).read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])
    records = [
        record("e", str(folder / "empty.jpg"), 5.0),
        record("t", str(folder / "text.jpg"), 5.0),
        record("c", str(folder / "cut.jpg"), 5.0),
        record("m1", str(folder / "gone.jpg"), 5.0, url="https://x/gone.jpg"),
        record("m2", str(folder / "gone2.jpg"), 6.0, url="https://x/gone.jpg"),  # same URL
        record("ok", photos["hubble"], 5.0),  # the complete file: not a byte copy of cut.jpg
        # the same URL as a readable copy with a lower score: the readable one stays
        record("lost", str(folder / "gone3.jpg"), 9.0, url="https://x/astro.jpg"),
        record("astro", photos["astronaut"], 4.0, url="https://x/astro.jpg"),
        {"text": "no image", "image_id": "noimg", "source": "src", "url": "https://x/n.jpg"},
    ]
    kept, dropped, stats = run(tmp_path, records)
    assert ids(kept) == ["e", "t", "c", "m2", "ok", "astro", "noimg"]
    assert ids(dropped) == ["m1", "lost"] and dropped[0]["duplicate_kind"] == "url"
    assert dropped[0]["duplicate_of"] == "src/m2" and dropped[0]["phash_distance"] is None
    assert dropped[1]["duplicate_of"] == "src/astro"
    assert stats["unhashable"] == 7
    assert stats["unhashable_by_reason"] == {
        "empty_file": 1,
        "missing_file": 3,
        "no_image": 1,
        "not_an_image": 1,
        "truncated": 1,
    }
    errors = {rec["image_id"]: rec.get("phash_error") for rec in kept}
    assert errors["e"] == "empty_file" and errors["c"] == "truncated" and errors["ok"] is None
    assert "sha256" in {k for rec in kept if rec["image_id"] == "c" for k in rec}


def test_empty_input(tmp_path: Path):
    kept, dropped, stats = run(tmp_path, [])
    assert kept == [] and dropped == []
    assert stats["records_in"] == stats["records_out"] == stats["hashed"] == 0
    assert stats["dropped"] == {"phash": 0, "sha256": 0, "url": 0}
    assert (tmp_path / "out.jsonl").read_text() == ""
    assert set(stats) == {
        "stage",
        "records_in",
        "records_out",
        "dropped",
        "enabled",
        "max_distance",
        "unhashable",
        "unhashable_by_reason",
        "hashed",
        "hash_cache_hits",
        "hash_cache_stale",
        "distinct_phashes",
        "near_pairs",
        "near_candidates_compared",
        "seconds",
        "seconds_by_step",
    }


def test_disabled_copies_through(tmp_path: Path, photos: dict[str, str]):
    records = [record("a", photos["coffee"], 5.0), record("b", photos["coffee"], 6.0)]
    kept, dropped, stats = run(tmp_path, records, enabled=False)
    assert kept == records and dropped == []
    assert stats["enabled"] is False and stats["records_out"] == 2 and stats["hashed"] == 0


def test_bad_max_distance(tmp_path: Path):
    with pytest.raises(ValueError, match="max_distance"):
        run(tmp_path, [], max_distance=-1)


def test_hash_cache_reused_across_runs(tmp_path: Path, photos: dict[str, str]):
    smaller = reencode(photos["hubble"], tmp_path / "img" / "hubble_small.jpg")
    records = [record(name, path, 5.0) for name, path in photos.items()]
    records += [record("h1", smaller, 6.0), record("gone", str(tmp_path / "nope.jpg"), 5.0)]
    cache = tmp_path / "dedup" / "hash_cache.sqlite"
    _, dropped, first = run(tmp_path, records, max_distance=4, cache=cache)
    assert first["hashed"] == len(records) - 1 and first["hash_cache_hits"] == 0
    assert ids(dropped) == ["hubble"]
    kept, dropped, second = run(tmp_path, records, max_distance=0, cache=cache)
    assert second["hashed"] == 0 and second["hash_cache_hits"] == len(records) - 1
    assert dropped == [] and len(kept) == len(records)
    assert second["unhashable_by_reason"] == {"missing_file": 1}
    # a changed file is hashed again; the others still come from the cache
    reencode(photos["rocket"], Path(photos["rocket"]), scale=0.5)
    _, _, third = run(tmp_path, records, max_distance=4, cache=cache)
    assert third["hashed"] == 1 and third["hash_cache_hits"] == len(records) - 2


def test_cache_entries_of_another_version_are_not_used(tmp_path: Path, photos: dict[str, str]):
    records = [record(name, path, 5.0) for name, path in photos.items()]
    cache = tmp_path / "hash_cache.sqlite"
    run(tmp_path, records, cache=cache)
    with sqlite3.connect(cache) as db:  # as if an older groundset computed them
        db.execute("UPDATE hashes SET v = 0 WHERE path = ?", (photos["coffee"],))
    _, _, again = run(tmp_path, records, cache=cache)
    assert again["hashed"] == 1 and again["hash_cache_stale"] == 1
    assert again["hash_cache_hits"] == len(records) - 1
    _, _, after = run(tmp_path, records, cache=cache)  # the new entry replaced the old one
    assert after["hashed"] == 0 and after["hash_cache_stale"] == 0


def test_a_cache_file_that_is_no_database_is_a_clear_error(tmp_path: Path, photos: dict[str, str]):
    cache = tmp_path / "hash_cache.sqlite"
    cache.write_text('{"path": "/x.jpg", "size": 12}\n')  # an old JSONL cache, say
    with pytest.raises(RuntimeError, match=r"hash_cache.sqlite: not a groundset hash cache"):
        run(tmp_path, [record("a", photos["coffee"], 5.0)], cache=cache)


def test_cache_entry_of_another_url_is_not_used(tmp_path: Path, photos: dict[str, str]):
    cache = tmp_path / "hash_cache.sqlite"
    run(tmp_path, [record("a", photos["coffee"], 5.0, url="https://x/1.jpg")], cache=cache)
    _, _, stats = run(
        tmp_path, [record("a", photos["coffee"], 5.0, url="https://x/2.jpg")], cache=cache
    )
    assert stats["hashed"] == 1 and stats["hash_cache_hits"] == 0


def test_phash_of_16_bit_and_odd_modes():
    blobs = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(blobs).resize((256, 256), Image.BICUBIC))
    values = smooth.astype(np.uint16) * 257
    wide = io.BytesIO()
    Image.fromarray(values).save(wide, "PNG")  # 16-bit grey: not clipped to white
    narrow = io.BytesIO()
    Image.fromarray((values >> 8).astype(np.uint8)).save(narrow, "PNG")
    wide_hash, wide_error = phash_bytes(wide.getvalue())
    narrow_hash, _ = phash_bytes(narrow.getvalue())
    assert wide_error is None and hamming(wide_hash, narrow_hash) <= 2
    assert phash_bytes(b"")[1].startswith("empty_file")


def test_kinds_are_documented_names():
    assert KINDS == ("sha256", "url", "phash")
