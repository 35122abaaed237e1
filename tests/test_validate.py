"""`groundset validate`: schema, geometry and file checks with line numbers and exit codes."""

from __future__ import annotations

import json
import runpy
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, make_images
from groundset.core.io import write_jsonl
from groundset.stages.filter.shard import probe_shard
from groundset.tools.validate import detect_stage, validate_file


def _masked(path, image, boxes, n_masks=None, shape=None, scores=None):
    n = len(boxes)
    mask_file = path.parent / f"{path.stem}_{len(boxes)}_{n_masks}.npy"
    np.save(mask_file, np.zeros(shape or (n_masks if n_masks is not None else n, 120, 160), bool))
    return {
        "image": str(image), "image_id": path.name, "source": "s", "caption": "c",
        "entities": [{"entity": f"e{i}", "bbox": b} for i, b in enumerate(boxes)],
        "mask_scores": scores if scores is not None else [0.9] * n,
        "mask_file": str(mask_file),
        "__dj__stats__": {"image_width": [160], "image_height": [120]},
    }  # fmt: skip


def test_valid_and_invalid_records_with_line_numbers(tmp_path):
    (image,) = make_images(tmp_path / "img", [(160, 120)])
    good = _masked(tmp_path / "a", image, [[0.1, 0.1, 0.5, 0.5]])
    lines = [
        good,
        _masked(tmp_path / "b", image, [[0.5, 0.1, 0.2, 0.5]]),  # x1 > x2
        _masked(tmp_path / "c", image, [[0.1, 0.1, 1.5, 0.5]]),  # outside [0, 1]
        _masked(tmp_path / "d", image, [[0.1, 0.1, 0.5, 0.5]] * 2, n_masks=1),  # 1 mask, 2 boxes
        _masked(tmp_path / "e", image, [[0.1, 0.1, 0.5, 0.5]], scores=[0.9, 0.8]),
        {**good, "image_id": "f", "image": str(tmp_path / "gone.jpg")},
        {**good, "image_id": "g", "__dj__stats__": {"image_width": [161], "image_height": [120]}},
        {**good, "image_id": "h", "mask_file": str(tmp_path / "none.npy")},
        {
            "image": [str(image)],
            "text": "t",
            "image_id": "2",
            "source": "s",
            "caption": "",
            "entities": [],
        },  # fmt: skip  # empty caption
    ]
    path = tmp_path / "masked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + "{broken\n")
    report = validate_file(path)
    by_line: dict[int, list[str]] = {}
    for line, message in report.violations:
        by_line.setdefault(line, []).append(message)
    assert 1 not in by_line
    assert "not ordered" in by_line[2][0]
    assert "entities/0/bbox/2" in by_line[3][0]
    assert "mask file shape (1, 120, 160), expected (2, 120, 160)" in by_line[4][0]
    assert by_line[5] == ["2 mask_scores for 1 entities"]
    assert any("does not exist" in m for m in by_line[6])
    assert by_line[7] == ["image is 160x120, __dj__stats__ says 161x120"]
    assert "does not exist" in by_line[8][0]
    assert "caption" in by_line[9][0] and "not valid JSON" in by_line[10][0]
    assert report.records == 10 and not report.ok
    assert report.kinds == {"geometry": 6, "schema": 2, "not_json": 1}
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(good) + "\n")
    assert validate_file(ok).ok

    run = [sys.executable, "-m", "groundset.cli", "validate"]
    done = subprocess.run([*run, str(path)], capture_output=True, text=True)
    assert done.returncode == 1 and "line 4: mask file shape" in done.stdout
    done = subprocess.run([*run, str(ok)], capture_output=True, text=True)
    assert done.returncode == 0 and "1 records (masked=1), all valid" in done.stdout


def test_stage_detection_and_forced_stage(tmp_path):
    manifest = {"image": ["/x.jpg"], "text": "", "image_id": "1", "source": "s"}
    assert detect_stage(manifest) == "manifest"
    assert detect_stage({**manifest, "__dj__stats__": {}}) == "filtered"
    assert detect_stage({**manifest, "caption": "c", "entities": []}) == "captioned"
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(manifest) + "\n")
    assert validate_file(path, check_files=False).ok
    forced = validate_file(path, stage="captioned", check_files=False)
    assert not forced.ok and "'caption' is a required property" in forced.violations[0][1]


def _violations(report) -> dict[int, list[str]]:
    """A report's listed violations by line number."""
    by_line: dict[int, list[str]] = {}
    for line, message in report.violations:
        by_line.setdefault(line, []).append(message)
    return by_line


def test_mask_shape_sizes_scores_and_duplicate_keys_are_violations_with_line_numbers(tmp_path):
    (image,) = make_images(tmp_path / "img", [(160, 120)])
    box = [[0.1, 0.1, 0.5, 0.5]]
    good = {**_masked(tmp_path / "a", image, box), "mask_shape": [1, 120, 160]}
    good |= {"width": 160, "height": 120}
    rle = {"size": [120, 160], "counts": "PPYo0"}
    lines = [
        good,
        {**good, "image_id": "b", "mask_shape": [1, 100, 160]},  # the file is (1, 120, 160)
        {**good, "image_id": "c", "width": 200},  # the image is 160 wide
        {**good, "image_id": "d", "mask_scores": [1.2]},
        {**good, "image_id": "e", "mask_scores": [-0.1]},
        {**good, "caption": "another caption"},  # the key s/a again
        {
            **good,
            "image_id": "g",
            "mask_file": None,
            "mask_rle": [rle],
            "mask_shape": [1, 120, 150],
        },
        {**good, "image_id": "h", "mask_scores": [float("nan")]},  # json.dumps writes NaN
        {**good, "image_id": "i", "mask_shape": [2, 120, 160]},  # one entity
    ]
    path = tmp_path / "masked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = validate_file(path)
    by_line = _violations(report)
    assert 1 not in by_line
    assert by_line[2] == [
        "mask_shape [1, 100, 160] disagrees with the mask file's shape (1, 120, 160)"
    ]
    assert by_line[3] == ["image is 160x120, the record's width/height say 200x120"]
    assert by_line[4] == ["mask_scores/0: 1.2 is greater than the maximum of 1"]
    assert by_line[5] == ["mask_scores/0: -0.1 is less than the minimum of 0"]
    assert by_line[6] == ["duplicate key s/a (first on line 1)"]
    assert by_line[7] == ["mask_shape [1, 120, 150] disagrees with the RLE masks' sizes"]
    assert by_line[8] == ["not valid JSON: NaN is not a JSON number"]
    assert by_line[9] == [
        "mask_shape [2, 120, 160] for 1 entities",
        "mask_shape [2, 120, 160] disagrees with the mask file's shape (1, 120, 160)",
    ]
    assert report.kinds == {"geometry": 5, "schema": 2, "duplicate_key": 1, "not_json": 1}
    assert "  line 6: duplicate key s/a (first on line 1)" in report.text().splitlines()


def test_duplicate_keys_are_source_and_image_id_or_image_id_alone(tmp_path):
    base = {"image": "/x.jpg", "caption": "c", "entities": [], "mask_scores": [], "mask_file": None}
    lines = [
        {**base, "image_id": "x"},
        {**base, "image_id": "x", "source": "a"},  # another key: a/x
        {**base, "image_id": "x", "source": "b"},  # b/x
        {**base, "image_id": "x"},  # x again
        {**base, "image_id": "x", "source": "b"},  # b/x again
    ]
    path = tmp_path / "masked.jsonl"
    write_jsonl(path, lines)
    report = validate_file(path, check_files=False)
    assert report.violations == [
        (4, "duplicate key x (first on line 1)"),
        (5, "duplicate key b/x (first on line 3)"),
    ]
    assert report.kinds == {"duplicate_key": 2}


def _filtered(image, image_id: str, stats: tuple[int, int], **extra) -> dict:
    return {
        "image": [str(image)], "text": "", "image_id": image_id, "source": "s",
        "__dj__stats__": {"image_width": [stats[0]], "image_height": [stats[1]]}, **extra,
    }  # fmt: skip


@pytest.mark.filterwarnings("error")  # a DecompressionBombWarning raised as an error, too
@pytest.mark.parametrize("limit", [5_000, 15_000], ids=["bomb_error", "bomb_warning"])
def test_an_image_over_the_bomb_limit_is_sized_from_its_header(tmp_path, monkeypatch, limit):
    (image,) = make_images(tmp_path / "img", [(160, 120)])  # 19,200 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        Image.open(image)  # what made the validator crash
    path = tmp_path / "filtered.jsonl"
    write_jsonl(path, [_filtered(image, "1", (160, 120)), _filtered(image, "2", (200, 120))])
    report = validate_file(path)
    assert report.violations == [(2, "image is 160x120, __dj__stats__ says 200x120")]
    assert report.records == 2 and report.kinds == {"geometry": 1}


def _huge_png(path, width: int, height: int):
    """A valid all-black 1-bit PNG of that size (a few KB: zeros compress well)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def test_a_real_huge_image_is_valid_and_sized_from_its_header(tmp_path):
    image = _huge_png(tmp_path / "huge.png", 20_000, 20_000)  # > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(image)
    size = {"width": 20_000, "height": 20_000}
    path = tmp_path / "filtered.jsonl"
    records = [
        _filtered(image, "1", (20_000, 20_000), **size),
        _filtered(image, "2", (20_000, 20_000), **{**size, "width": 19_999}),
    ]
    write_jsonl(path, records)
    report = validate_file(path)
    assert report.violations == [
        (2, "image is 20000x20000, the record's width/height say 19999x20000")
    ]


class _Files(list):
    """A stand-in for Snakemake's named file lists (a list with attributes)."""

    def __init__(self, *files, **named):
        super().__init__(files)
        self.__dict__.update(named)


def _run_validate_outputs(tmp_path, manifest, merged):
    """Run the rule's script as Snakemake would; returns the report path and the log path."""
    report, log = tmp_path / "validated" / "report.txt", tmp_path / "validate.log"
    snakemake = type("Snakemake", (), {})()
    snakemake.input = _Files(
        str(manifest), str(merged), manifests=[str(manifest)], merged=[str(merged)]
    )
    snakemake.output = _Files(str(report))
    snakemake.log = _Files(str(log))
    runpy.run_path(str(ROOT / "workflow/scripts/validate_outputs.py"), {"snakemake": snakemake})
    return report, log


def test_validate_outputs_passes_manifest_records_the_probe_dropped(tmp_path):
    images = make_images(tmp_path / "downloads", [(160, 120), (160, 120)])
    manifest = tmp_path / "manifest" / "s.jsonl"
    manifest.parent.mkdir()
    write_jsonl(manifest, [{
        "image": [str(path)], "text": "", "image_id": f"{i:09d}", "source": "s", "url": None,
        "meta": {}, "width": 160, "height": 120,
    } for i, path in enumerate(images)])  # fmt: skip
    images[1].unlink()  # deleted after download
    kept, dropped = (
        tmp_path / "probed" / "shard_0.jsonl",
        tmp_path / "probed" / "shard_0_dropped.jsonl",
    )
    kept.parent.mkdir()
    probe = probe_shard(manifest, kept, dropped)
    assert probe["dropped"] == {"missing_file": 1}
    assert [r["image_id"] for r in map(json.loads, dropped.read_text().splitlines())] == [
        "000000001"
    ]

    report, _ = _run_validate_outputs(tmp_path, manifest, kept)
    assert report.read_text().splitlines() == [
        f"{manifest}: 2 records (manifest=2) (schema and keys; files not checked), all valid",
        f"{kept}: 1 records (filtered=1), all valid",
    ]

    images[0].unlink()  # deleted after the probe kept it: what the filter kept is broken
    report.unlink()
    with pytest.raises(ValueError, match=f"invalid records in {kept} "):
        _run_validate_outputs(tmp_path, manifest, kept)
    assert not report.exists()
    log = (tmp_path / "validate.log").read_text()
    assert f"  line 1: image {images[0]} does not exist" in log and str(manifest) not in log
