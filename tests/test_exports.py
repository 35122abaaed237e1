"""COCO, ODVG and WebDataset exports: read back by pycocotools and webdataset, masks equal to the
stored ones (npy files and RLE), skips counted with their reasons, keys unique across sources,
reproducible shards, and the validator's recount."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from groundset.core.io import iter_jsonl, write_jsonl
from groundset.core.records import clean_name
from groundset.core.stats import read_stats
from groundset.exports.check import check_exports
from groundset.exports.coco import export_coco
from groundset.exports.common import ExportError, category_name, pixel_box, record_masks
from groundset.exports.odvg import append_phrase, export_odvg, find_phrase
from groundset.exports.wds import export_wds, tar_header
from groundset.stages.mask import decode_rle, encode_rle

W, H = 40, 30
# pycocotools' decode under numpy 2 (its own code, not the exports')
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _image(path: Path, fmt: str, seed: int, size: tuple[int, int] = (W, H)) -> str:
    """A small real image file."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)
    return str(path)


def _masks(n: int, seed: int, height: int = H, width: int = W) -> np.ndarray:
    """`n` random non-empty bool masks."""
    masks = np.random.default_rng(seed).random((n, height, width)) > 0.6
    masks[:, 0, 0] = True
    return masks


def _npy(path: Path, masks: np.ndarray) -> str:
    """Save masks as the mask stage does."""
    np.save(path, masks)
    return str(path)


def _entities(*items: tuple[str, list[float]]) -> list[dict]:
    """Masked-layout entities."""
    return [{"entity": name, "bbox": box} for name, box in items]


@pytest.fixture
def dataset(tmp_path: Path) -> dict:
    """Masked records of every kind the exports meet, and the masks each should carry."""
    img = tmp_path / "img"
    img.mkdir()
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    jpg = _image(img / "a.jpg", "JPEG", 0)
    png = _image(img / "b.png", "PNG", 1, (50, 20))
    other = _image(img / "c.jpg", "JPEG", 2)
    m1 = _masks(3, 1)
    m2 = _masks(2, 2, 20, 50)
    m5 = _masks(2, 5)
    m5[1] = False  # an empty mask: a COCO instance of area 0 is dropped
    box = [0.1, 0.2, 0.5, 0.9]
    records = [
        {  # npy masks, a source name with dots, a phrase used by two boxes
            "image": jpg, "image_id": "000001", "source": "laion-aesthetics_v2_4.75",
            "url": "http://x/a.jpg", "caption": "A Dog and a dogs' cat on grass.",
            "url_list_file": "part-00000.parquet", "url_list_row": 41,
            "entities": _entities(("dog", box), ("Cat", [0.0, 0.0, 1.2, 0.5]), ("dog", box)),
            "mask_scores": [0.9, 0.8, 0.7], "mask_file": _npy(masks_dir / "1.npy", m1),
            "mask_shape": [3, H, W], "meta": {"similarity": 0.3},
            "__dj__stats__": {"image_width": [W], "image_height": [H]},
        },
        {  # RLE masks, the same image_id in another source, a phrase not in the caption
            "image": png, "image_id": "000001", "source": "laion-high-resolution",
            "caption": "A tree", "entities": _entities(("  big   Dog ", box), ("tree", box)),
            "mask_scores": [0.5, 0.6], "mask_rle": encode_rle(m2), "mask_file": None,
            "mask_format": "rle", "mask_shape": [2, 20, 50],
        },
        {  # no entities: an image without boxes
            "image": other, "image_id": "000003", "source": "laion-high-resolution",
            "caption": "nothing", "entities": [], "mask_scores": [], "mask_file": None,
            "width": W, "height": H,
        },
        {  # the mask file is gone
            "image": jpg, "image_id": "000004", "source": "s", "caption": "a dog",
            "entities": _entities(("dog", box)), "mask_scores": [0.9],
            "mask_file": str(masks_dir / "gone.npy"),
        },
        {  # the mask file is not an array
            "image": jpg, "image_id": "000005", "source": "s", "caption": "a dog",
            "entities": _entities(("dog", box)), "mask_scores": [0.9],
            "mask_file": str(masks_dir / "broken.npy"),
        },
        {  # an empty mask among its entities
            "image": other, "image_id": "000006", "source": "s", "caption": "a cat, a dog",
            "entities": _entities(("cat", box), ("dog", box)), "mask_scores": [0.9, 0.1],
            "mask_file": _npy(masks_dir / "6.npy", m5),
        },
        {  # the image is gone
            "image": str(img / "gone.jpg"), "image_id": "000007", "source": "s",
            "caption": "x", "entities": [], "mask_scores": [],
        },
        {  # masks not one per box
            "image": jpg, "image_id": "000008", "source": "s", "caption": "a dog",
            "entities": _entities(("dog", box)), "mask_scores": [0.9],
            "mask_file": _npy(masks_dir / "8.npy", _masks(2, 8)),
        },
        {  # an inverted box: no negative widths, counted
            "image": jpg, "image_id": "000009", "source": "s", "caption": "a dog",
            "entities": _entities(("dog", [0.9, 0.9, 0.1, 0.1])), "mask_scores": [0.9],
            "mask_file": _npy(masks_dir / "9.npy", _masks(1, 9)),
        },
    ]  # fmt: skip
    (masks_dir / "broken.npy").write_bytes(b"not a numpy file")
    path = tmp_path / "masked.jsonl"
    write_jsonl(path, records)
    return {"path": path, "records": records, "masks": {0: m1, 1: m2, 5: m5}}


EXPORTED = [0, 1, 2, 5]  # the records every export takes, in order
SKIPPED = {"mask_missing": 1, "mask_unreadable": 1, "image_missing": 1, "masks_not_aligned": 1,
           "bad_box": 1}  # fmt: skip


def test_coco_reads_back_with_pycocotools(dataset, tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = tmp_path / "export" / "coco.json"
    stats = export_coco(dataset["path"], out)
    # the stats envelope: every record read is exported or dropped with its reason
    assert stats == read_stats(out.parent / "coco_stats.json")
    assert (stats["stage"], stats["records_in"], stats["records_out"]) == ("coco", 9, 4)
    assert stats["dropped"] == SKIPPED
    assert stats["annotations_skipped"] == {"empty_mask": 1}
    assert (stats["images"], stats["annotations"], stats["categories"]) == (4, 6, 4)
    assert stats["images_without_boxes"] == 1
    coco = COCO(str(out))
    images = coco.loadImgs(coco.getImgIds())
    assert [i["file_name"] for i in images] == [dataset["records"][k]["image"] for k in EXPORTED]
    assert [(i["width"], i["height"]) for i in images] == [(W, H), (50, 20), (W, H), (W, H)]
    assert images[0]["key"] == "laion-aesthetics_v2_4.75/000001"
    # the provenance reaches the exports: the URL-list row of every exported image
    assert (images[0]["url_list_file"], images[0]["url_list_row"]) == ("part-00000.parquet", 41)
    assert "url_list_row" not in images[1]  # a record without provenance: none made up
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["big dog", "cat", "dog", "tree"]
    for image, k in zip(images, EXPORTED, strict=True):
        record = dataset["records"][k]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        stored = dataset["masks"].get(k, np.zeros((0, H, W), dtype=bool))
        kept = [i for i in range(len(stored)) if stored[i].any()]
        assert len(anns) == len(kept)
        for ann, i in zip(anns, kept, strict=True):
            entity = record["entities"][i]
            assert np.array_equal(mask_utils.decode(ann["segmentation"]).astype(bool), stored[i])
            assert np.array_equal(coco.annToMask(ann).astype(bool), stored[i])
            assert ann["area"] == int(stored[i].sum())
            assert ann["score"] == record["mask_scores"][i]
            assert ann["iscrowd"] == 0
            assert names[ann["category_id"]] == category_name(entity["entity"])
            x1, y1, x2, y2 = pixel_box(entity["bbox"], image["width"], image["height"])
            assert ann["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    cat_box = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[1]["bbox"]
    assert cat_box == [0.0, 0.0, W, H * 0.5]  # clipped to the image
    mapping = json.loads((tmp_path / "export" / "coco_categories.json").read_text())
    by_name = {c["name"]: c for c in mapping["categories"]}
    assert by_name["big dog"]["raw_names"] == ["  big   Dog "]
    assert by_name["cat"]["raw_names"] == ["Cat", "cat"]
    assert by_name["dog"]["annotations"] == 2
    assert {c["id"]: c["name"] for c in mapping["categories"]} == names
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "coco.json", "coco_categories.json", "coco_skipped.jsonl", "coco_stats.json"
    ]  # fmt: skip
    # each left-out record in the side file, with its reason
    lines = list(iter_jsonl(out.parent / "coco_skipped.jsonl"))
    assert Counter(line["drop_reason"] for line in lines) == SKIPPED
    assert {line["image_id"] for line in lines} == {
        "000004",
        "000005",
        "000007",
        "000008",
        "000009",
    }
    assert all(line["drop_stage"] == "coco" and line["key"] for line in lines)
    # a drop line: the drop fields, then the record as it was read
    by_id = {record["image_id"]: record for record in dataset["records"]}
    for line in lines:
        head = {k: line.pop(k) for k in ("key", "source", "image_id", "drop_stage", "drop_reason")}
        detail = line.pop("detail", None)  # where there is more to say
        assert detail is None or head["drop_reason"] in ("masks_not_aligned", "mask_unreadable")
        assert {**line, "source": head["source"], "image_id": head["image_id"]} == by_id[
            head["image_id"]
        ]
    assert check_exports(dataset["path"], coco=out) == []


def test_coco_empty_input_and_categories_path(tmp_path):
    from pycocotools.coco import COCO

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    stats = export_coco(empty, tmp_path / "c.json", categories=tmp_path / "cats.json")
    assert stats["images"] == stats["annotations"] == stats["categories"] == 0
    coco = COCO(str(tmp_path / "c.json"))
    assert coco.getImgIds() == [] and coco.getAnnIds() == []
    assert json.loads((tmp_path / "cats.json").read_text()) == {"categories": []}
    assert check_exports(empty, coco=tmp_path / "c.json") == []


def test_phrase_spans():
    assert find_phrase("Dogs and a Dog", "dog") == (11, 14)  # a whole word first
    assert find_phrase("two dogs", "dog") == (4, 7)  # else anywhere
    assert find_phrase("a cat", "dog") is None
    assert append_phrase("A cat.", "dog") == ("A cat. dog", (7, 10))
    assert append_phrase("A cat", "dog") == ("A cat. dog", (7, 10))
    assert append_phrase("", "dog") == ("dog", (0, 3))


def test_odvg_lines(dataset, tmp_path):
    out = tmp_path / "odvg.jsonl"
    stats = export_odvg(dataset["path"], out)
    # ODVG needs no masks: only the missing image and the inverted box are skipped
    assert stats["dropped"] == {"image_missing": 1, "bad_box": 1}
    assert stats == read_stats(tmp_path / "odvg_stats.json")
    assert (stats["stage"], stats["records_in"], stats["records_out"]) == ("odvg", 9, 7)
    assert stats["regions_skipped"] == {}
    left_out = list(iter_jsonl(tmp_path / "odvg_skipped.jsonl"))
    assert {r["drop_stage"] for r in left_out} == {"odvg"}
    assert sorted((r["image_id"], r["drop_reason"]) for r in left_out) == [
        ("000007", "image_missing"), ("000009", "bad_box")
    ]  # fmt: skip
    lines = list(iter_jsonl(out))
    assert len(lines) == stats["images"] == 7
    assert (lines[0]["url_list_file"], lines[0]["url_list_row"]) == ("part-00000.parquet", 41)
    assert stats["regions"] == sum(len(line["grounding"]["regions"]) for line in lines) == 10
    for line in lines:
        caption = line["grounding"]["caption"]
        for region in line["grounding"]["regions"]:
            (start, end), *_ = region["tokens_positive"]
            assert caption[start:end].lower() == region["phrase"].lower()
            x1, y1, x2, y2 = region["bbox"]
            assert 0 <= x1 < x2 <= line["width"] and 0 <= y1 < y2 <= line["height"]
    first = lines[0]
    assert first["filename"] == dataset["records"][0]["image"]
    assert (first["width"], first["height"]) == (W, H)
    regions = first["grounding"]["regions"]
    assert regions[0]["tokens_positive"] == regions[2]["tokens_positive"] == [[2, 5]]
    assert regions[1]["bbox"] == [0.0, 0.0, W, H * 0.5]
    second = lines[1]["grounding"]
    # the missing phrase appended once, as every export writes names (whitespace runs as one)
    assert second["caption"] == "A tree. big Dog"
    assert [r["tokens_positive"] for r in second["regions"]] == [[[8, 15]], [[2, 6]]]
    assert (lines[1]["width"], lines[1]["height"]) == (50, 20)
    assert lines[2]["grounding"]["regions"] == [] and stats["images_without_boxes"] == 1
    assert stats["phrases_appended"] == 1
    assert stats["phrases_found"] == 2 + 1 + 1 + 1 + 2 + 1  # distinct phrases per image
    assert check_exports(dataset["path"], odvg=out) == []
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert export_odvg(empty, tmp_path / "e.jsonl")["images"] == 0
    assert (tmp_path / "e.jsonl").read_text() == ""


def _read_wds(outdir: Path) -> list[dict]:
    """The samples of a shard folder as webdataset reads them."""
    import webdataset as wds

    urls = [str(p) for p in sorted(outdir.glob("shard-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False))


def test_wds_reads_back_with_webdataset(dataset, tmp_path):
    outdir = tmp_path / "wds"
    outdir.mkdir()
    (outdir / "shard-000007.tar").write_bytes(b"stale")  # an earlier run's
    stats = export_wds(dataset["path"], outdir, shard_size=3)
    assert stats["dropped"] == SKIPPED
    assert stats == read_stats(tmp_path / "wds_stats.json")
    assert (stats["stage"], stats["records_in"], stats["records_out"]) == ("webdataset", 9, 4)
    left_out = list(iter_jsonl(tmp_path / "wds_skipped.jsonl"))
    assert Counter((r["drop_stage"], r["drop_reason"]) for r in left_out) == {
        ("webdataset", reason): n for reason, n in SKIPPED.items()
    }
    assert (stats["shards"], stats["samples"], stats["boxes"]) == (2, 4, 7)
    assert sorted(p.name for p in outdir.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert stats["bytes"] == sum(p.stat().st_size for p in outdir.iterdir())
    samples = _read_wds(outdir)
    keys = [s["__key__"] for s in samples]
    assert keys == [
        "laion-aesthetics_v2_4_75__000001",
        "laion-high-resolution__000001",
        "laion-high-resolution__000003",
        "s__000006",
    ]
    assert [sorted(k for k in s if not k.startswith("__")) for s in samples] == [
        ["jpg", "json"], ["json", "png"], ["jpg", "json"], ["jpg", "json"]
    ]  # fmt: skip
    for sample, k in zip(samples, EXPORTED, strict=True):
        record = dataset["records"][k]
        ext = "png" if "png" in sample else "jpg"
        assert sample[ext] == Path(record["image"]).read_bytes()
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"]
        assert meta["image_id"] == record["image_id"] and meta["source"] == record["source"]
        assert meta["caption"] == record["caption"]
        assert meta["mask_scores"] == record["mask_scores"]
        assert "mask_file" not in meta and meta["mask_format"] == "rle"
        names = [clean_name(e["entity"]) for e in record["entities"]]
        assert [e["entity"] for e in meta["entities"]] == names
        stored = dataset["masks"].get(k)
        if stored is None:
            assert meta["mask_rle"] == []
        else:  # empty masks too: one RLE per box
            assert np.array_equal(decode_rle(meta["mask_rle"]), stored)
        for entity in meta["entities"]:
            assert entity["bbox_pixels"] == pixel_box(entity["bbox"], meta["width"], meta["height"])
    first = json.loads(samples[0]["json"])
    assert first["meta"] == {"similarity": 0.3}
    assert first["__dj__stats__"] == {"image_width": [W], "image_height": [H]}
    with tarfile.open(outdir / "shard-000000.tar") as tar:
        member = tar.getmembers()[0]
        assert (member.mtime, member.uid, member.gid, member.mode) == (0, 0, 0, 0o444)
    assert check_exports(dataset["path"], wds_dir=outdir) == []
    # the same input gives the same bytes; fewer shards leave no stale ones behind
    before = (outdir / "shard-000000.tar").read_bytes()
    again = export_wds(dataset["path"], outdir, shard_size=10)
    assert again["shards"] == 1 and [p.name for p in outdir.iterdir()] == ["shard-000000.tar"]
    export_wds(dataset["path"], outdir, shard_size=3)
    assert (outdir / "shard-000000.tar").read_bytes() == before


def test_wds_empty_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    outdir = tmp_path / "new" / "wds"
    stats = export_wds(empty, outdir)
    assert (stats["shards"], stats["samples"], stats["urls"]) == (0, 0, None)
    assert outdir.is_dir() and list(outdir.iterdir()) == []
    assert check_exports(empty, wds_dir=outdir) == []
    # and the other two: valid empty files, nothing skipped
    odvg = export_odvg(empty, tmp_path / "odvg.jsonl")
    assert (odvg["records_in"], odvg["records_out"], odvg["dropped"]) == (0, 0, {})
    assert read_stats(tmp_path / "new" / "wds_stats.json")["records_in"] == 0
    assert (tmp_path / "odvg.jsonl").read_text() == ""
    assert (tmp_path / "odvg_skipped.jsonl").read_text() == ""
    assert check_exports(empty, odvg=tmp_path / "odvg.jsonl", wds_dir=outdir) == []


def test_wds_key_collision_raises(tmp_path):
    image = _image(tmp_path / "a.jpg", "JPEG", 0)
    records = [
        {"image": image, "image_id": "1", "source": "a.b", "entities": []},
        {"image": image, "image_id": "2", "source": "a.b", "entities": []},
        {"image": image, "image_id": "1", "source": "a_b", "entities": []},  # same key as the 1st
    ]
    write_jsonl(tmp_path / "in.jsonl", records)
    with pytest.raises(ExportError, match="a_b__1"):
        export_wds(tmp_path / "in.jsonl", tmp_path / "wds")
    assert list((tmp_path / "wds").iterdir()) == []  # no shard, no temp file left


def test_check_exports_reports_differences(dataset, tmp_path):
    coco, odvg, wds_dir = tmp_path / "c.json", tmp_path / "o.jsonl", tmp_path / "w"
    export_coco(dataset["path"], coco)
    export_odvg(dataset["path"], odvg)
    export_wds(dataset["path"], wds_dir, shard_size=2)
    assert check_exports(dataset["path"], coco, odvg, wds_dir) == []
    lines = odvg.read_text().splitlines()
    bad = json.loads(lines[0])
    bad["grounding"]["regions"][0]["tokens_positive"] = [[0, 1]]
    odvg.write_text("\n".join([json.dumps(bad), *lines[1:-1]]) + "\n")
    (wds_dir / "shard-000001.tar").unlink()
    skipped = tmp_path / "w_skipped.jsonl"
    skipped.write_text("".join(skipped.read_text().splitlines(keepends=True)[1:]))
    problems = check_exports(dataset["path"], coco, odvg, wds_dir)
    assert any(f"odvg {odvg}: 6 images, its stats say 7" in p for p in problems)
    assert any("do not span their phrase (first on line 1)" in p for p in problems)
    assert any(f"webdataset {wds_dir}: 2 samples, its stats say 4" in p for p in problems)
    assert any(f"webdataset {wds_dir}: 1 shards, its stats say 2" in p for p in problems)
    assert any(p.startswith(f"webdataset drops {skipped}: ") for p in problems)
    assert not any(p.startswith("coco") for p in problems)
    # the stats against the masked records: one record more than the exports read
    more = tmp_path / "more.jsonl"
    more.write_text(Path(dataset["path"]).read_text() + json.dumps({"image_id": "x"}) + "\n")
    assert check_exports(more, coco=coco) == [
        f"coco stats {tmp_path / 'c_stats.json'}: 9 records in, the masked records are 10"
    ]
    (tmp_path / "c_stats.json").write_text(json.dumps({"stage": "coco", "records_in": 1}))
    assert "stats lack records_out, dropped" in check_exports(dataset["path"], coco=coco)[0]
    assert check_exports(dataset["path"], coco=tmp_path / "none.json") == [
        f"coco export {tmp_path / 'none.json'} does not exist"
    ]


def test_check_exports_of_emu3_lists(tmp_path):
    from groundset.exports.emu3 import Emu3Settings, export_emu3

    image = _image(tmp_path / "a.jpg", "JPEG", 0)
    records = [{"image": image, "image_id": str(i), "source": "s", "caption": "a dog" if i else "",
                "entities": []} for i in range(4)]  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", records)
    settings = Emu3Settings.from_config({"tokenize": False, "max_items": 2})
    stats = export_emu3(tmp_path / "in.jsonl", tmp_path / "emu3", settings)
    assert (stats["records_in"], stats["records_out"]) == (4, 2)
    assert stats["dropped"] == {"beyond_max_items": 1, "no_caption": 1}
    datalist = tmp_path / "emu3" / "list" / "datalist.jsonl"
    errors = list(iter_jsonl(tmp_path / "emu3" / "list" / "error.jsonl"))
    assert [(e["key"], e["drop_stage"], e["drop_reason"]) for e in errors] == [
        ("s/0", "emu3", "no_caption"), ("s/3", "emu3", "beyond_max_items")
    ]  # fmt: skip
    assert check_exports(tmp_path / "in.jsonl", emu3=datalist) == []
    datalist.write_text(datalist.read_text().splitlines(keepends=True)[0])
    assert check_exports(tmp_path / "in.jsonl", emu3=datalist) == [
        f"emu3 {datalist}: 1 lines, its stats say 2"
    ]


def test_workers_give_the_same_files(dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    a = export_coco(dataset["path"], one / "coco.json")
    b = export_coco(dataset["path"], two / "coco.json", workers=2)
    paths = ("output", "categories_file", "skipped_file")
    assert {k: v for k, v in a.items() if k not in paths} == {
        k: v for k, v in b.items() if k not in paths
    }
    for name in ("coco.json", "coco_categories.json", "coco_skipped.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    a = export_wds(dataset["path"], one / "wds", shard_size=3)
    b = export_wds(dataset["path"], two / "wds", shard_size=3, workers=2)
    assert (a["samples"], a["dropped"]) == (b["samples"], b["dropped"])
    assert (one / "wds_skipped.jsonl").read_bytes() == (two / "wds_skipped.jsonl").read_bytes()
    for shard in ("shard-000000.tar", "shard-000001.tar"):
        assert (one / "wds" / shard).read_bytes() == (two / "wds" / shard).read_bytes()


@pytest.mark.parametrize("name", ["a.jpg", "s__000001.json", "k" * 100, "k" * 150 + ".png"])
def test_tar_header_is_tarfiles(name):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = 1234, 0, 0o444, 0, 0
    info.uname = info.gname = ""
    assert tar_header(name, 1234) == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def test_long_keys_read_back(tmp_path):
    image = _image(tmp_path / "a.jpg", "JPEG", 0)
    record = {"image": image, "image_id": "1", "source": "s" * 120, "entities": [],
              "caption": "x"}  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", [record])
    export_wds(tmp_path / "in.jsonl", tmp_path / "wds")
    (sample,) = _read_wds(tmp_path / "wds")
    assert sample["__key__"] == "s" * 120 + "__1"
    assert sample["jpg"] == Path(image).read_bytes()


def test_odvg_looks_phrases_up_in_the_caption_as_captioned(tmp_path):
    image = _image(tmp_path / "a.jpg", "JPEG", 0)
    box = [0.1, 0.1, 0.2, 0.2]
    record = {"image": image, "image_id": "1", "caption": "A scene!  ", "mask_scores": [1, 1, 1],
              "entities": _entities(("red car", box), ("car", box), ("scene", box))}  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", [record])
    stats = export_odvg(tmp_path / "in.jsonl", tmp_path / "o.jsonl")
    (line,) = iter_jsonl(tmp_path / "o.jsonl")
    grounding = line["grounding"]
    assert grounding["caption"] == "A scene! red car. car"
    spans = [r["tokens_positive"] for r in grounding["regions"]]
    assert spans == [[[9, 16]], [[18, 21]], [[2, 7]]]
    assert (stats["phrases_found"], stats["phrases_appended"]) == (1, 2)


def test_uncompressed_rle_is_compressed():
    masks = np.array([[[1, 0], [0, 0]], [[1, 1], [1, 1]]], dtype=bool)
    uncompressed = [{"size": [2, 2], "counts": [0, 1, 3]}, {"size": [2, 2], "counts": [0, 4]}]
    rles, areas, width, height = record_masks({"mask_rle": uncompressed}, 2)
    assert (areas, width, height) == ([1, 4], 2, 2)
    assert rles == encode_rle(masks)
