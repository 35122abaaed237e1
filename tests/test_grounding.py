"""Parsing of Qwen-VL grounded-caption answers (pure functions)."""

from collections import Counter

import pytest

from groundset.stages.caption.grounding import (
    extract_json,
    normalize_box,
    parse_answer,
    smart_resize,
)

SEED = (
    '{"caption": "A sunset over a city with mountains.", "entities": ['
    '{"entity": "mountain", "bboxes": [0, 268, 835, 1000]}, {"entity": "city", "bboxes": [[394, 812, 722, 950]]}]}'
)


def test_seed_json_on_the_1000_grid():
    parsed = parse_answer(SEED)
    assert parsed.error is None and parsed.caption == "A sunset over a city with mountains."
    assert parsed.entities == [
        {"entity": "mountain", "bboxes": [[0.0, 0.268, 0.835, 1.0]]},
        {"entity": "city", "bboxes": [[0.394, 0.812, 0.722, 0.95]]},
    ]
    assert not parsed.dropped


@pytest.mark.parametrize(
    "wrapper",
    [
        "{}",
        "```json\n{}\n```",
        "Here is the result:\n```\n{}\n```\nLet me know if you need more.",
        "Sure! {} Hope this helps.",
    ],
)
def test_fences_and_prose_around_the_json(wrapper):
    parsed = parse_answer(wrapper.replace("{}", SEED))
    assert parsed.caption == "A sunset over a city with mountains." and len(parsed.entities) == 2


def test_nested_and_repeated_boxes_merge_per_entity():
    answer = (
        '{"caption": "Two dogs.", "entities": [{"entity": "dog", "bboxes": [[100, 100, 200, 200], '
        '[[300, 300, 400, 400]]]}, {"entity": "dog", "bboxes": [500, 500, 600, 600]}, '
        '{"entity": "dog", "bboxes": [100, 100, 200, 200]}]}'
    )
    parsed = parse_answer(answer)
    assert parsed.entities == [
        {
            "entity": "dog",
            "bboxes": [[0.1, 0.1, 0.2, 0.2], [0.3, 0.3, 0.4, 0.4], [0.5, 0.5, 0.6, 0.6]],
        }
    ]
    assert parsed.dropped["entity_without_box"] == 1  # the exact duplicate box adds nothing


def test_qwen2_box_tokens_and_caption_text():
    answer = (
        "A <|object_ref_start|>brown dog<|object_ref_end|><|box_start|>(120,340),(560,900)<|box_end|> "
        "chases a <|object_ref_start|>ball<|object_ref_end|><|box_start|>(600,700),(650,760)<|box_end|>"
        "<|box_start|>(10,10),(20,20)<|box_end|> on grass."
    )
    parsed = parse_answer(answer)
    assert parsed.caption == "A brown dog chases a ball on grass."
    assert parsed.entities == [
        {"entity": "brown dog", "bboxes": [[0.12, 0.34, 0.56, 0.9]]},
        {"entity": "ball", "bboxes": [[0.6, 0.7, 0.65, 0.76], [0.01, 0.01, 0.02, 0.02]]},
    ]


def test_qwen_vl_ref_box_tokens():
    parsed = parse_answer("<ref>the cat</ref><box>(0,0),(500,1000)</box> sleeps")
    assert parsed.caption == "the cat sleeps"
    assert parsed.entities == [{"entity": "the cat", "bboxes": [[0.0, 0.0, 0.5, 1.0]]}]


def test_qwen25_pixel_boxes_in_the_resized_frame():
    # A 2048x1367 image is resized by the processor to a multiple of 28 within max_pixels.
    h, w = smart_resize(1367, 2048)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    answer = f'[{{"bbox_2d": [0, 0, {w // 2}, {h}], "label": "left half"}}]'
    parsed = parse_answer(answer, "pixels", image_size=(2048, 1367))
    assert parsed.entities == [{"entity": "left half", "bboxes": [[0.0, 0.0, 0.5, 1.0]]}]
    assert parsed.error == "no_caption"  # boxes alone are not a caption
    with_caption = parse_answer(f'{{"caption": "x", "entities": {answer}}}', "pixels", frame=(w, h))
    assert with_caption.error is None and with_caption.entities[0]["bboxes"] == [
        [0.0, 0.0, 0.5, 1.0]
    ]


def test_repaired_boxes_are_counted_by_kind():
    repaired = Counter()
    assert normalize_box([835, 1000, 0, 268], "grid1000", repaired=repaired) == [
        0.0,
        0.268,
        0.835,
        1.0,
    ]
    assert repaired == {"inverted": 1}
    normalize_box([-50, -10, 1200, 500], "grid1000", repaired=repaired)
    normalize_box([100, 100, 100, 500], "grid1000", repaired=repaired)  # dropped: not repaired
    normalize_box([100, 200, 300, 400], "grid1000", repaired=repaired)  # as it came
    assert repaired == {"inverted": 1, "clipped": 1}
    parsed = parse_answer('{"caption": "A dog.", "entities": [{"entity": "dog", '
                          '"bboxes": [[600, 500, 100, 200], [0, 0, 1100, 900]]}]}')  # fmt: skip
    assert (
        parsed.repaired == {"inverted": 1, "clipped": 1} and len(parsed.entities[0]["bboxes"]) == 2
    )


@pytest.mark.parametrize(
    "box, expected",
    [
        ([835, 1000, 0, 268], [0.0, 0.268, 0.835, 1.0]),  # swapped corners are ordered
        ([-50, -10, 1200, 500], [0.0, 0.0, 1.0, 0.5]),  # clipped to the image
        ([100, 100, 100, 500], None),  # zero width
        ([1100, 100, 1200, 500], None),  # entirely outside: zero width after clipping
        ([1, 2, 3], None),
        (["a", 2, 3, 4], None),
        ([float("nan"), 0, 1, 1], None),
        (None, None),
    ],
)
def test_normalize_box(box, expected):
    assert normalize_box(box, "grid1000") == expected


def test_normalize_box_conventions():
    assert normalize_box([0.1, 0.2, 0.3, 0.4], "normalized") == [0.1, 0.2, 0.3, 0.4]
    assert normalize_box([0, 0, 50, 25], "pixels", (100, 100)) == [0.0, 0.0, 0.5, 0.25]
    with pytest.raises(ValueError, match="unknown box convention"):
        normalize_box([0, 0, 1, 1], "percent")
    with pytest.raises(ValueError, match="need the frame"):
        normalize_box([0, 0, 1, 1], "pixels")


def test_bad_boxes_and_entities_are_counted():
    answer = (
        '{"caption": "c", "entities": [{"entity": "a", "bboxes": [10, 10, 10, 50]}, '
        '{"entity": "", "bboxes": [1, 1, 5, 5]}, {"entity": "b"}, "junk", '
        '{"entity": "c", "bboxes": [[1, 1, 50, 50], "x"]}]}'
    )
    parsed = parse_answer(answer)
    assert parsed.entities == [{"entity": "c", "bboxes": [[0.001, 0.001, 0.05, 0.05]]}]
    assert parsed.dropped == {
        "box_invalid_or_degenerate": 3,
        "entity_without_box": 2,
        "entity_without_name": 2,
    }


@pytest.mark.parametrize(
    "answer, error",
    [
        ("", "empty_answer"),
        ("   ", "empty_answer"),
        (None, "empty_answer"),
        ('{"caption": "A dog", "entities": [{"entity": "dog", "bb', "unparseable_answer"),
        ('```json\n{"entities": [}\n```', "unparseable_answer"),
        ('{"entities": []}', "no_caption"),
        ('{"caption": "", "entities": []}', "no_caption"),
    ],
)
def test_answers_without_a_caption_are_errors(answer, error):
    parsed = parse_answer(answer)
    assert (parsed.error, parsed.caption) == (error, None)


def test_plain_prose_is_a_caption_without_entities():
    parsed = parse_answer("A quiet lake at dawn,\nwith mist.")
    assert (
        parsed.caption == "A quiet lake at dawn, with mist."
        and parsed.entities == []
        and parsed.error is None
    )


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, but I can't help with that.",
        "I am sorry, I cannot describe this image.",
        "Sorry, I can't assist with this request.",
        "I cannot provide a description of this image.",
        "I\u2019m unable to help with that.",
        "As an AI, I can't identify people.",
        '{"caption": "I\'m sorry, but I can\'t help with that.", "entities": []}',
    ],
)
def test_refusals_are_errors_not_captions(answer):
    for expect_json in (False, True):
        parsed = parse_answer(answer, expect_json=expect_json)
        assert (parsed.error, parsed.caption) == ("refusal", None)


def test_prose_is_unparseable_when_the_prompt_asked_for_json():
    prose = "A quiet lake at dawn, with mist."
    parsed = parse_answer(prose, expect_json=True)
    assert (parsed.error, parsed.caption, parsed.entities) == ("unparseable_answer", None, [])
    tokens = (
        "A <|object_ref_start|>lake<|object_ref_end|><|box_start|>(0,500),(1000,1000)<|box_end|>"
    )
    parsed = parse_answer(tokens, expect_json=True)  # grounding tokens answer the JSON prompt too
    assert parsed.error is None and parsed.entities == [
        {"entity": "lake", "bboxes": [[0.0, 0.5, 1.0, 1.0]]}
    ]
    assert parse_answer("I can see a dog on grass.", expect_json=False).caption == (
        "I can see a dog on grass."
    )


def test_extract_json_prefers_the_fenced_block():
    assert extract_json('note {"a": 1}\n```json\n{"b": 2}\n```') == {"b": 2}
    assert extract_json("no json here") is None
    assert extract_json("[1, 2] and {") == [1, 2]
