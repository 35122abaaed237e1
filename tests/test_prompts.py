"""Emu3 location-control prompts parse back to their record, whatever the model said; every
export writes the same cleaned names and captions."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from groundset.core.io import iter_jsonl, write_jsonl
from groundset.core.prompts import format_prompt, parse_prompt, prompt_parts, template_problem
from groundset.core.records import clean_caption, clean_name
from groundset.exports.coco import export_coco
from groundset.exports.emu3 import Emu3Settings, export_emu3, prompt_problems, template
from groundset.exports.odvg import export_odvg
from groundset.exports.wds import export_wds

HEADER, ENTITY = template()
# what a model may say: the location syntax's own pieces, whitespace of every kind, unicode
PIECES = ["[", "]", ";", "; box: [", "Entity: [", "].", "\n", "\n\n", "\t", " ", "  ", ":",
          "Precise location control:", "\nPrecise location control:\n\n", "0, 0, 1, 1", "猫",
          "é", "{name}", "{x1}", "\\", '"']  # fmt: skip
TEXT = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=4)), max_size=8).map("".join)
COORD = st.floats(0, 1, allow_nan=False)
BOX = st.tuples(COORD, COORD, COORD, COORD).map(
    lambda v: [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]
)
ENTITIES = st.lists(
    st.tuples(TEXT, st.lists(BOX, min_size=1, max_size=2)).map(
        lambda e: {"entity": e[0], "bboxes": e[1]}
    ),
    max_size=4,
)


@settings(max_examples=300, deadline=None)
@given(caption=TEXT, entities=ENTITIES)
def test_every_prompt_parses_back_to_exactly_its_records_entities_and_boxes(caption, entities):
    record = {"caption": caption, "entities": entities}
    text = format_prompt(record, HEADER, ENTITY)
    parsed = parse_prompt(text, HEADER, ENTITY)
    assert parsed == prompt_parts(record, HEADER)
    boxes = [box for entity in entities for box in entity["bboxes"]]
    assert len(parsed[1]) == len(boxes)  # one location line per box, none lost or gained
    names = [clean_name(entity["entity"]) for entity in entities for _ in entity["bboxes"]]
    assert [line[0] for line in parsed[1]] == names
    assert "\n" not in parsed[0] and "[" not in parsed[0] and "]" not in parsed[0]


def test_the_issues_record_parses_back_and_a_pasted_prompt_did_not():
    record = {
        "caption": "A dog.\nEntity: [x]; box: [0, 0, 1, 1].\nPrecise location control:\n\n",
        "entities": [
            {"entity": "dog]; box: [1, 2, 3, 4].\n\nEntity: [cat", "bboxes": [[0.1, 0.2, 0.3, 0.4]]},
            {"entity": "ball\nred", "bboxes": [[0.5, 0.5, 0.6, 0.7], [0, 0, 1, 1]]},
            {"entity": "a;b", "bboxes": [[0, 0, 0.5, 0.5]]},
        ],
    }  # fmt: skip
    caption, lines = parse_prompt(format_prompt(record, HEADER, ENTITY), HEADER, ENTITY)
    assert caption == "A dog. Entity: (x); box: (0, 0, 1, 1). Precise location control"
    assert [line[0] for line in lines] == [
        "dog), box: (1, 2, 3, 4). Entity: (cat", "ball red", "ball red", "a,b"
    ]  # fmt: skip
    assert lines[0][1:] == (100, 200, 300, 400)
    # what the export wrote before: the names pasted as they came
    pasted = (
        record["caption"]
        + HEADER
        + "".join(
            ENTITY.format(name=e["entity"], x1=0, y1=0, x2=1, y2=1)
            for e in record["entities"]
            for _ in e["bboxes"]
        )
    )
    assert parse_prompt(pasted, HEADER, ENTITY) != prompt_parts(record, HEADER)


def test_templates_that_cannot_be_read_back_are_config_errors():
    assert template_problem(HEADER, ENTITY) is None
    assert template_problem(" | ", "{name}@{x1},{y1},{x2},{y2};") is None
    assert "read back" in template_problem("", "{name}:{x1},{y1},{x2},{y2};")
    assert "lacks {y2}" in template_problem(HEADER, "[{name}] {x1} {y1} {x2}")
    assert "use only" in template_problem(HEADER, "{label} {x1}")
    # a one-line header never appears inside a caption
    assert clean_caption("A | B", " | ") == "A B"


def test_every_export_writes_the_same_cleaned_names_and_captions(tmp_path):
    image = tmp_path / "a.jpg"
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(image)
    masks = np.zeros((2, 40, 60), bool)
    masks[0, 5:20, 5:30] = masks[1, 20:35, 30:55] = True
    np.save(tmp_path / "m.npy", masks)
    raw = ["dog]; box: [1, 2, 3, 4]", "red\n\nball"]
    record = {
        "image": str(image), "image_id": "1", "source": "s", "url": "http://x/a.jpg",
        "caption": "A dog\nEntity: [x]; box: [0, 0, 1, 1].",
        "entities": [{"entity": raw[0], "bbox": [0.1, 0.1, 0.5, 0.5]},
                     {"entity": raw[1], "bbox": [0.5, 0.5, 0.9, 0.9]}],
        "mask_scores": [0.9, 0.8], "mask_file": str(tmp_path / "m.npy"), "mask_shape": [2, 40, 60],
    }  # fmt: skip
    masked = tmp_path / "masked.jsonl"
    write_jsonl(masked, [record])
    names = [clean_name(n) for n in raw]
    caption = clean_caption(record["caption"])
    assert names == ["dog), box: (1, 2, 3, 4)", "red ball"]

    coco = export_coco(masked, tmp_path / "coco.json")
    data = json.loads((tmp_path / "coco.json").read_text())
    assert [c["name"] for c in data["categories"]] == [n.lower() for n in names]
    assert data["images"][0]["caption"] == caption and coco["texts_cleaned"] == 3
    odvg = export_odvg(masked, tmp_path / "odvg.jsonl")
    (line,) = iter_jsonl(tmp_path / "odvg.jsonl")
    assert [r["phrase"] for r in line["grounding"]["regions"]] == names
    assert line["grounding"]["caption"].startswith(caption) and odvg["texts_cleaned"] == 3
    export_wds(masked, tmp_path / "wds")
    import webdataset as wds

    (sample,) = wds.WebDataset(str(tmp_path / "wds" / "shard-000000.tar"), shardshuffle=False)
    meta = json.loads(sample["json"])
    assert [e["entity"] for e in meta["entities"]] == names and meta["caption"] == caption
    settings = Emu3Settings.from_config({"tokenize": False})
    assert export_emu3(masked, tmp_path / "emu3", settings)["texts_cleaned"] == 3
    (prompt,) = json.loads((tmp_path / "emu3" / "list" / "prompts.json").read_text())
    assert parse_prompt(prompt["text"], HEADER, ENTITY) == (
        caption, [(names[0], 100, 100, 500, 500), (names[1], 500, 500, 900, 900)]
    )  # fmt: skip
    datalist = tmp_path / "emu3" / "list" / "datalist.jsonl"
    assert prompt_problems(datalist, masked, settings) == []
    # the validator catches a prompt that does not say what its record says
    (entry,) = iter_jsonl(datalist)
    pasted = record["caption"] + HEADER + ENTITY.format(name=raw[0], x1=100, y1=100, x2=500, y2=500)
    write_jsonl(datalist, [{**entry, "text": pasted}])
    (problem,) = prompt_problems(datalist, masked, settings)
    assert "s/1" in problem
