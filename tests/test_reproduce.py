"""The reproducibility guarantee (README: Reproducibility) as the run comparisons apply it."""

from __future__ import annotations

import json

from groundset.core.reproduce import ROUNDED_ATOL, SCORE_RTOL, differences, load_output


def record(**stats) -> dict:
    """A scored-and-masked record with the given `__dj__stats__` and SAM2 figures."""
    dj = {"aspect_ratios": [1.5], "image_aesthetics_scores": [7.782486915588379],
          "image_nsfw_score": [0.00049], "image_width": [1536]}  # fmt: skip
    dj.update(stats)
    return {"image_id": "1", "caption": "A cup.", "__dj__stats__": dj,
            "mask_scores": [0.5615, 0.5397], "mask_area_ratio": [0.9227, 1.9076]}  # fmt: skip


def test_model_scores_agree_within_the_stated_bound_and_nothing_else_moves():
    # one thread vs two on an AVX512-BF16 CPU without AMX (seen on this project's machines)
    two_threads = record(image_aesthetics_scores=[7.782485008239746])
    assert differences(record(), two_threads) == []
    assert differences([record()], [{**two_threads, "mask_scores": [0.5616, 0.5397]}]) == []
    beyond = 7.782486915588379 * (1 + 3 * SCORE_RTOL)
    assert differences(record(), record(image_aesthetics_scores=[beyond])) != []
    small = record(image_nsfw_score=[0.00049 * (1 + SCORE_RTOL / 2)])
    assert differences(record(), small) == []
    assert differences(record(), record(image_nsfw_score=[0.00059])) != []  # relative, not absolute
    rounded_off = {**record(), "mask_scores": [0.5615 + 2.5 * ROUNDED_ATOL, 0.5397]}
    assert differences(record(), rounded_off) != []
    # everything that is not a model score is compared exactly
    assert differences(record(), record(aspect_ratios=[1.5000001])) != []
    assert differences(record(), record(image_width=[1537])) != []
    assert differences(record(), {**record(), "caption": "A cup. "}) != []
    assert differences([record()], [record(), record()]) != []
    assert differences(record(), {**record(), "extra": 1}) != []


def test_outputs_load_as_json_or_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"x": 1}))
    (tmp_path / "b.jsonl").write_text('{"x": 1}\n{"x": 2}\n')
    assert load_output(tmp_path / "a.json") == [{"x": 1}]
    assert load_output(tmp_path / "b.jsonl") == [{"x": 1}, {"x": 2}]
