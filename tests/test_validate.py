"""`groundset validate`: schema, geometry and file checks with line numbers and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from conftest import make_images
from groundset.validate import detect_stage, validate_file


def _masked(path, image, boxes, n_masks=None, shape=None, scores=None):
    n = len(boxes)
    mask_file = path.parent / f"{path.stem}_{len(boxes)}_{n_masks}.npy"
    np.save(mask_file, np.zeros(shape or (n_masks if n_masks is not None else n, 120, 160), bool))
    return {
        "image": str(image), "image_id": "1", "source": "s", "caption": "c",
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
        {**good, "image": str(tmp_path / "gone.jpg")},
        {**good, "__dj__stats__": {"image_width": [161], "image_height": [120]}},
        {**good, "mask_file": str(tmp_path / "none.npy")},
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
