"""groundset.core.records: one rule for a record's key, image, boxes, masked layout and file names."""

from __future__ import annotations

import pytest

from groundset.core import prompts, records
from groundset.core.records import (
    RecordError,
    entity_boxes,
    feature_relpath,
    flatten_record,
    image_path,
    mask_relpath,
    record_boxes,
    record_key,
    record_relpath,
)
from groundset.exports import emu3
from groundset.stages import mask
from groundset.tools import draw, stats

SEED_CAPTIONED = {  # the seed's captioned line (README 2.6): no source, image a list of one
    "caption": "A sunset over a city with mountains.",
    "entities": [
        {"entity": "mountain", "bboxes": [[0.0, 0.268, 0.835, 1.0]]},
        {"entity": "city", "bboxes": [[0.394, 0.812, 0.722, 0.95], [0.1, 0.1, 0.2, 0.2]]},
    ],
    "image": ["/data/laion/laion-high-resolution/00000/000000974.jpg"],
    "text": "",
    "image_id": "000000974",
}


def test_key_is_source_and_id_or_the_id_or_the_image():
    assert record_key({**SEED_CAPTIONED, "source": "laion-hr"}) == "laion-hr/000000974"
    assert record_key(SEED_CAPTIONED) == "000000974"  # the seed's files: no `_/` prefix
    assert record_key({**SEED_CAPTIONED, "source": ""}) == "000000974"
    assert record_key({"image_id": 974}) == "974"
    no_id = {"image": ["/x/a/1.jpg"], "source": "s"}
    assert record_key(no_id) == "/x/a/1.jpg"  # unique where an id alone would not be
    assert record_key({**no_id, "image_id": ""}) == "/x/a/1.jpg"
    with pytest.raises(RecordError, match="neither image_id nor image"):
        record_key({"caption": "c"})


def test_key_is_the_key_existing_caption_journals_hold():
    # journals written before groundset.core.records keyed answers `source/image_id` (image ids
    # restart in every source) and `image_id` alone without a source: keys must not change
    assert record_key({**SEED_CAPTIONED, "source": "laion-hr"}) == "laion-hr/000000974"
    assert record_key(SEED_CAPTIONED) == "000000974"
    assert record_key({"image_id": 7, "image": "/x/a.jpg"}) == "7"
    assert record_key({"image_id": 7, "source": ""}) == "7"


def test_image_path_of_a_list_or_a_string():
    assert image_path(SEED_CAPTIONED) == "/data/laion/laion-high-resolution/00000/000000974.jpg"
    assert image_path({"image": "/x/1.jpg"}) == "/x/1.jpg"
    for bad in ({}, {"image": []}, {"image": ""}, {"image": None}, {"image": [""]}):
        with pytest.raises(RecordError, match="names no image"):
            image_path(bad)
    assert issubclass(RecordError, ValueError)


def test_boxes_of_captioned_and_masked_entities():
    assert entity_boxes({"entity": "a", "bboxes": [[0, 0, 1, 1], [0, 0, 0.5, 0.5]]}) == [
        [0, 0, 1, 1],
        [0, 0, 0.5, 0.5],
    ]
    assert entity_boxes({"entity": "a", "bbox": [0, 0, 1, 1]}) == [[0, 0, 1, 1]]
    assert entity_boxes({"entity": "a"}) == [] and entity_boxes({"bbox": None}) == []
    assert record_boxes(SEED_CAPTIONED) == [
        ("mountain", [0.0, 0.268, 0.835, 1.0]),
        ("city", [0.394, 0.812, 0.722, 0.95]),
        ("city", [0.1, 0.1, 0.2, 0.2]),
    ]
    assert record_boxes(flatten_record(SEED_CAPTIONED)) == record_boxes(SEED_CAPTIONED)
    assert record_boxes({"entities": None}) == [] and record_boxes({}) == []


def test_flatten_record_is_the_seeds_masked_layout():
    flat = flatten_record(SEED_CAPTIONED)
    assert flat["image"] == "/data/laion/laion-high-resolution/00000/000000974.jpg"
    assert flat["entities"] == [
        {"entity": "mountain", "bbox": [0.0, 0.268, 0.835, 1.0]},
        {"entity": "city", "bbox": [0.394, 0.812, 0.722, 0.95]},
        {"entity": "city", "bbox": [0.1, 0.1, 0.2, 0.2]},
    ]
    assert {k: v for k, v in flat.items() if k not in ("image", "entities")} == {
        k: v for k, v in SEED_CAPTIONED.items() if k not in ("image", "entities")
    }
    assert flatten_record(flat) == flat  # idempotent
    assert SEED_CAPTIONED["image"] == ["/data/laion/laion-high-resolution/00000/000000974.jpg"]
    ints = flatten_record(
        {"image": "/x.jpg", "entities": [{"entity": "a", "bboxes": [[0, 0, 1, 1]]}]}
    )
    assert ints["entities"] == [{"entity": "a", "bbox": [0.0, 0.0, 1.0, 1.0]}]
    assert all(isinstance(v, float) for v in ints["entities"][0]["bbox"])
    assert flatten_record({"image_id": "1"})["image"] is None  # the stage drops it: image_missing


def test_per_record_files_are_the_seeds_without_a_source():
    assert mask_relpath(SEED_CAPTIONED) == "000000974.npy"  # masks/<image_id>.npy
    assert feature_relpath(SEED_CAPTIONED) == "000000974.pth"  # feature/<image_id>.pth
    sourced = {**SEED_CAPTIONED, "source": "laion-hr"}
    assert mask_relpath(sourced) == "laion-hr/000000974.npy"
    assert feature_relpath(sourced) == "laion-hr/000000974.pth"
    assert record_relpath(sourced, ".jpg") == "laion-hr/000000974.jpg"
    # without an id, the image file's stem (how the manifest names image ids)
    assert mask_relpath({"image": ["/d/00000/000000975.jpg"]}) == "000000975.npy"
    for bad in ({"image_id": "../x"}, {"image_id": "a/b"}, {"image_id": "1", "source": ".."},
                {"image_id": "1", "source": "a/b"}, {"image_id": "."}):  # fmt: skip
        with pytest.raises(RecordError, match="cannot name a file"):
            mask_relpath(bad)
    with pytest.raises(RecordError):
        feature_relpath({})


def test_every_stage_uses_the_one_copy():
    assert mask.record_key is emu3.record_key is records.record_key
    assert mask.flatten_record is records.flatten_record
    assert emu3.image_path is draw.image_path is records.image_path
    assert prompts.record_boxes is draw.record_boxes is records.record_boxes
    assert stats.entity_boxes is records.entity_boxes
    assert mask.mask_path("/m", SEED_CAPTIONED).as_posix() == "/m/000000974.npy"


def test_same_image_compares_urls_when_both_have_one():
    from groundset.core.records import same_image

    assert same_image({"url": "http://a/1.jpg"}, {"url": "http://a/1.jpg"})
    assert not same_image({"url": "http://a/1.jpg"}, {"url": "http://a/2.jpg"})
    assert same_image({}, {"url": "http://a/2.jpg"})  # an older journal entry
    assert same_image({"url": "http://a/1.jpg"}, {})  # a record without a URL
