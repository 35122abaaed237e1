"""Statistics and drawings of grounded records."""

from __future__ import annotations

import numpy as np
from PIL import Image

from conftest import make_images
from groundset.core.io import read_json, write_jsonl
from groundset.stages.mask import encode_rle
from groundset.tools.draw import draw_sample, sample_records
from groundset.tools.stats import write_stats


def drawn(out):
    """The two drawing folders as `groundset draw --outdir OUT` lays them out."""
    return out / "draw", out / "draw_sam2_mask"


def test_stats_counts_and_histograms(tmp_path):
    records = [
        {"image_id": "1", "entities": [{"entity": "Dog", "bboxes": [[0, 0, 0.5, 0.5], [0, 0, 1, 1]]}],
         "mask_scores": [0.97, 0.17],
         "__dj__stats__": {"image_width": [200], "image_height": [100], "image_aesthetics_scores": [6.2]}},
        {"image_id": "2", "entities": [{"entity": "dog ", "bbox": [0.0, 0.0, 0.1, 0.2]},
                                       {"entity": "cat", "bbox": [0.5, 0.5, 0.6, 0.6]}],
         "__dj__stats__": {"image_width": [100], "image_height": [100]}},
        {"image_id": "3", "entities": []},
    ]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", records)
    stats = write_stats(tmp_path / "in.jsonl", tmp_path / "out/stats.json", tmp_path / "out/plots")
    assert stats["records"] == 3 and stats["boxes"] == 4 and stats["images_with_entities"] == 2
    assert stats["top_entities"] == [("dog", 3), ("cat", 1)]  # names folded, counted per box
    hist = stats["histograms"]
    assert hist["entities_per_image"]["counts"][:3] == [1, 0, 2]
    area = dict(zip(hist["box_area"]["edges"], hist["box_area"]["counts"], strict=False))
    assert area[0.0] == 2 and area[0.25] == 1 and area[0.95] == 1  # 0.01, 0.02; 0.25; 1.0
    assert sum(hist["box_area"]["counts"]) == 4
    assert hist["mask_score"]["counts"][19] == 1 and hist["mask_score"]["counts"][3] == 1
    assert hist["image_aesthetics_scores"]["values"] == 1
    # box aspect in pixels: 0.5x0.5 and 1x1 of 200x100 are 100x50 and 200x100 -> 2.0 (not the
    # normalized 1.0); 0.1x0.2 and 0.1x0.1 of 100x100 -> 0.5 and 1.0
    aspect = hist["box_aspect"]
    assert aspect["values"] == 4
    at = {edge: i for i, edge in enumerate(aspect["edges"])}  # 2**(k/6): 0.5, 1.0, 2.0 are edges
    expected = [0] * (len(aspect["edges"]) - 1)
    expected[at[2.0]], expected[at[1.0]], expected[at[0.5]] = 2, 1, 1
    assert aspect["counts"] == expected
    written = read_json(tmp_path / "out" / "stats.json")
    assert written["records"] == 3 and written["top_entities"] == [["dog", 3], ["cat", 1]]
    assert {"box_area.png", "top_entities.png"} <= set(stats["plots"])
    assert "image_nsfw_score.png" not in stats["plots"]  # no values, no plot
    png = Image.open(tmp_path / "out" / "plots" / "box_area.png")
    assert png.size[0] > 300


def test_drawings_of_a_deterministic_sample(tmp_path):
    images = make_images(tmp_path / "img", [(120, 80)] * 6)
    records = []
    for i, path in enumerate(images):
        masks = np.zeros((1, 80, 120), bool)
        masks[0, 10:40, 20:60] = True
        record = {"image": str(path), "image_id": f"{i}", "source": "s", "caption": "c",
                  "entities": [{"entity": "thing", "bbox": [0.1, 0.1, 0.5, 0.5]}],
                  "mask_scores": [0.9]}  # fmt: skip
        if i % 2:
            record["mask_rle"], record["mask_file"] = encode_rle(masks), None
        else:
            np.save(tmp_path / f"{i}.npy", masks)
            record["mask_file"] = str(tmp_path / f"{i}.npy")
        records.append(record)
    records.append({**records[0], "image_id": "gone", "image": str(tmp_path / "gone.jpg")})
    write_jsonl(tmp_path / "in.jsonl", records)
    first = [r["image_id"] for r in sample_records(tmp_path / "in.jsonl", 3, seed=1)]
    assert first == [r["image_id"] for r in sample_records(tmp_path / "in.jsonl", 3, seed=1)]
    counts = draw_sample(tmp_path / "in.jsonl", *drawn(tmp_path / "out"), n=7)
    assert counts == {"boxes": 6, "masks": 6, "failed": 1}
    overlay = np.asarray(Image.open(tmp_path / "out" / "draw_sam2_mask" / "s" / "1.png"))
    plain = np.asarray(Image.open(images[1]).convert("RGB")).astype(int)
    inside = np.abs(overlay[20:30, 30:50].astype(int) - plain[20:30, 30:50]).mean()
    outside = np.abs(overlay[60:75, 80:110].astype(int) - plain[60:75, 80:110]).mean()
    assert inside > 20 and outside < 8  # coloured where the mask is, untouched elsewhere
    assert Image.open(tmp_path / "out" / "draw" / "s" / "0.jpg").size == (120, 80)


def test_drawings_of_records_without_source_have_the_seeds_names(tmp_path):
    (image,) = make_images(tmp_path / "img", [(120, 80)])
    masks = np.zeros((1, 80, 120), bool)
    masks[0, 10:40, 20:60] = True
    np.save(tmp_path / "000000974.npy", masks)
    record = {"image": str(image), "image_id": "000000974", "caption": "c",
              "entities": [{"entity": "thing", "bbox": [0.1, 0.1, 0.5, 0.5]}],
              "mask_scores": [0.9], "mask_file": str(tmp_path / "000000974.npy")}  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", [record, {**record, "image_id": "x", "image": []}])
    counts = draw_sample(tmp_path / "in.jsonl", *drawn(tmp_path / "out"), n=5)
    assert counts == {"boxes": 1, "masks": 1, "failed": 1}  # no image: counted, not a crash
    assert sorted(p.relative_to(tmp_path / "out").as_posix()
                  for p in (tmp_path / "out").rglob("*.*")) == [
        "draw/000000974.jpg", "draw_sam2_mask/000000974.png",
    ]  # fmt: skip
