"""SAM2 masks with the real sam2 package (hiera-tiny from its config, random weights, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import RANDOM_WEIGHTS, make_images
from groundset.core.config import ConfigError, validate_config
from groundset.core.io import iter_jsonl, read_json, write_jsonl
from groundset.stages.mask import (
    FLOOR_KEYS,
    OUTPUT_KEYS,
    TUNING_KEYS,
    MaskChunkFiles,
    Masker,
    MaskError,
    MaskGatherFiles,
    MaskSettings,
    decode_rle,
    gather_masks,
    load_model,
    mask_chunk,
    output_settings,
    pixel_boxes,
)

TINY = "configs/sam2.1/sam2.1_hiera_t.yaml"


@pytest.fixture(scope="module")
def masker():
    """One hiera-tiny SAM2 with seeded random weights, shared by the tests."""
    import torch

    torch.manual_seed(0)
    return Masker(*load_model(MaskSettings.from_config({"model_config": TINY, "device": "cpu"})))


class FixedMasker:
    """A stand-in Masker that returns given masks and scores for every image (known values)."""

    def __init__(self, masks: np.ndarray, scores: list[float]):
        self.masks, self.scores, self.images = masks, np.asarray(scores, np.float32), 0

    def embed(self, images):
        assert all(image.shape[:2] == self.masks.shape[1:] for image in images)
        self.images += len(images)

    def predict(self, index, boxes):
        import torch

        assert len(boxes) == len(self.masks)
        return torch.from_numpy(self.masks.copy()), self.scores.copy()


class CountingMasker:
    """A Masker wrapper that counts embedded images and can fail after some batches."""

    def __init__(self, masker, fail_after: int | None = None):
        self.masker, self.fail_after, self.images, self.batches = masker, fail_after, 0, 0

    def embed(self, images):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        self.images += len(images)
        return self.masker.embed(images)

    def predict(self, index, boxes):
        return self.masker.predict(index, boxes)


def captioned(tmp_path: Path, entities_per_image: list[list[dict]], sizes=None) -> Path:
    """A captioned JSONL whose images exist (one per entry of `entities_per_image`)."""
    sizes = sizes or [(160, 120)] * len(entities_per_image)
    images = make_images(tmp_path / "img", sizes)
    records = [
        {
            "image": [str(path)],
            "image_id": f"{i:06d}",
            "source": "src",
            "caption": f"c{i}",
            "entities": entities,
        }  # fmt: skip
        for i, (path, entities) in enumerate(zip(images, entities_per_image, strict=True))
    ]
    path = tmp_path / "captioned.jsonl"
    write_jsonl(path, records)
    return path


def chunk_files(tmp_path: Path, name: str = "out", store: bool = False) -> MaskChunkFiles:
    """A job's files under `tmp_path` (`store`: as the workflow's, computed beside the journal)."""
    return MaskChunkFiles(
        records=str(tmp_path / f"{name}.jsonl"), dropped=str(tmp_path / f"{name}_dropped.jsonl"),
        stats=str(tmp_path / f"{name}_stats.json"), masks=str(tmp_path / f"masks_{name}"),
        journal=str(tmp_path / f"{name}.journal.jsonl"),
        store=str(tmp_path / f"store_{name}") if store else None,
    )  # fmt: skip


def run(tmp_path: Path, records: Path, masker, name: str = "out", store: bool = False,
        **settings) -> dict:  # fmt: skip
    settings = MaskSettings.from_config(
        {"model_config": TINY, "device": "cpu", "batch_size": 2, **settings}
    )
    return mask_chunk(records, chunk_files(tmp_path, name, store), settings, masker)


def floored(tmp_path: Path, name: str, **floors) -> dict:
    """The gather of one mask job's outputs under the quality floors `floors` (as the workflow's
    gather applies them): `<name>_final.jsonl`, kept masks of shortened records in `floored_<name>`."""
    job = chunk_files(tmp_path, name)
    settings = MaskSettings.from_config({"model_config": TINY, **floors})
    files = MaskGatherFiles(records=str(tmp_path / f"{name}_final.jsonl"),
                            dropped=str(tmp_path / f"{name}_final_dropped.jsonl"),
                            stats=str(tmp_path / f"{name}_final.json"),
                            floored=str(tmp_path / f"floored_{name}"))  # fmt: skip
    return gather_masks([job.records], [job.dropped], [job.stats], files, settings)


def test_pixel_boxes_of_the_flattened_entities():
    entities = [{"entity": "dog", "bbox": [0.1, 0.2, 0.3, 0.4]},
                {"entity": "dog", "bbox": [0.5, 0.5, 0.9, 0.9]},
                {"entity": "cat", "bbox": [0.0, 0.0, 1.0, 1.0]}]  # fmt: skip
    boxes = pixel_boxes(entities, 200, 100)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    assert np.allclose(boxes, [[20, 20, 60, 40], [100, 50, 180, 90], [0, 0, 200, 100]])
    assert pixel_boxes([], 200, 100).shape == (0, 4)


def test_npy_masks_align_with_entities_and_scores(tmp_path, masker):
    two = [{"entity": "a", "bboxes": [[0.1, 0.1, 0.5, 0.6]]},
           {"entity": "b", "bboxes": [[0.3, 0.2, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]]}]  # fmt: skip
    path = captioned(tmp_path, [two, [], two[:1]], sizes=[(160, 120), (64, 64), (90, 200)])
    records = list(iter_jsonl(path))
    gone = dict(records[0], image_id="gone", image=[str(tmp_path / "img" / "gone.jpg")])
    (tmp_path / "img" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    bad = dict(records[0], image_id="bad", image=[str(tmp_path / "img" / "bad.jpg")])
    write_jsonl(path, [*records, gone, bad])
    counting = CountingMasker(masker)
    stats = run(tmp_path, path, counting)
    assert counting.images == 2  # the record without entities needs no model
    out = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert [r["image_id"] for r in out] == ["000000", "000001", "000002"]
    first = out[0]
    assert isinstance(first["image"], str) and first["image"] == records[0]["image"][0]
    assert [e["entity"] for e in first["entities"]] == ["a", "b", "b"]
    assert first["entities"][2]["bbox"] == [0.0, 0.0, 0.2, 0.2]
    masks = np.load(first["mask_file"])
    assert (
        masks.dtype == bool
        and masks.shape == (3, 120, 160)
        and first["mask_shape"] == [3, 120, 160]
    )
    assert len(first["mask_scores"]) == len(first["mask_inside_fraction"]) == 3
    assert all(0 <= v <= 1 for v in first["mask_scores"] + first["mask_inside_fraction"])
    # the quality fields are what the saved masks say, for every entity (an empty mask: 0 inside;
    # exact values on known masks: test_quality_fields_are_what_known_masks_give)
    for i, (x1, y1, x2, y2) in enumerate(pixel_boxes(first["entities"], 160, 120)):
        area = int(masks[i].sum())
        box = masks[i, int(np.floor(y1)) : int(np.ceil(y2)), int(np.floor(x1)) : int(np.ceil(x2))]
        inside = box.sum() / area if area else 0.0  # pixels the box touches count as inside
        assert first["mask_inside_fraction"][i] == pytest.approx(inside, abs=1e-4)
        assert first["mask_area_ratio"][i] == pytest.approx(
            area / ((x2 - x1) * (y2 - y1)), abs=1e-4
        )
    assert Path(first["mask_file"]) == (tmp_path / "masks_out" / "src" / "000000.npy").resolve()
    assert out[1]["entities"] == [] and out[1]["mask_scores"] == [] and out[1]["mask_file"] is None
    assert np.load(out[2]["mask_file"]).shape == (1, 200, 90)
    dropped = {r["image_id"]: r for r in iter_jsonl(tmp_path / "out_dropped.jsonl")}
    assert {k: (r["drop_stage"], r["drop_reason"]) for k, r in dropped.items()} == {
        "gone": ("mask", "image_missing"),
        "bad": ("mask", "image_unreadable"),
    }
    assert dropped["bad"]["detail"].startswith("image_unreadable: ")
    assert dropped["gone"]["key"] == "src/gone"
    assert (
        stats["records_in"] == 5
        and stats["records_out"] == 3
        and sum(stats["dropped"].values()) == 2
    )
    assert stats["entities"] == 4 and stats["without_entities"] == 1 and stats["computed"] == 2
    assert stats["dropped"] == {"image_missing": 1, "image_unreadable": 1}
    assert stats["random_weights"] is True and stats["stand_in"] is True
    assert stats["mask_bytes"] == sum(
        Path(r["mask_file"]).stat().st_size for r in out if r["mask_file"]
    )
    again = CountingMasker(masker)
    rerun = run(tmp_path, path, again)  # journaled: nothing recomputed, drops tried again
    assert again.images == 0 and rerun["computed"] == 0 and sum(rerun["dropped"].values()) == 2
    assert list(iter_jsonl(tmp_path / "out.jsonl")) == out


def known_masks() -> np.ndarray:
    """Masks on a 160x120 image for boxes [.25,.25,.75,.75] and [0,.5,.25,1] (known quality)."""
    masks = np.zeros((2, 120, 160), bool)
    masks[0, 30:90, 40:80] = True  # the left half of box 0: 2400 px inside its 80x60 box
    masks[0, 0:20, 0:60] = True  # 1200 px outside: inside 2400/3600, area 3600/4800
    masks[1, 60:120, 0:40] = True  # exactly box 1: inside 1.0, area 1.0
    return masks


KNOWN = [{"entity": "a", "bboxes": [[0.25, 0.25, 0.75, 0.75]]},
         {"entity": "b", "bboxes": [[0.0, 0.5, 0.25, 1.0]]}]  # fmt: skip


def test_quality_fields_are_what_known_masks_give(tmp_path):
    path = captioned(tmp_path, [KNOWN])
    stats = run(tmp_path, path, FixedMasker(known_masks(), [0.875, 0.25]))
    (out,) = iter_jsonl(tmp_path / "out.jsonl")
    assert out["mask_scores"] == [0.875, 0.25]
    assert out["mask_inside_fraction"] == [0.6667, 1.0]
    assert out["mask_area_ratio"] == [0.75, 1.0]
    assert np.array_equal(np.load(out["mask_file"]), known_masks())
    assert stats["computed"] == 1 and stats["entities"] == 2
    # the floors act on those values after the job: 0.6667 < 0.7 drops entity a, keeps b and
    # its mask only (in a file of its own), the job's file keeps both
    stats = floored(tmp_path, "out", min_inside_fraction=0.7)
    (final,) = iter_jsonl(tmp_path / "out_final.jsonl")
    assert [e["entity"] for e in final["entities"]] == ["b"] and final["mask_scores"] == [0.25]
    assert final["mask_shape"] == [1, 120, 160] and final["mask_area_ratio"] == [1.0]
    assert final["mask_file"] == str((tmp_path / "floored_out" / "src" / "000000.npy").resolve())
    assert np.array_equal(np.load(final["mask_file"]), known_masks()[1:])
    assert np.array_equal(np.load(out["mask_file"]), known_masks())
    assert stats["entities_dropped"] == 1 and stats["entities"] == 1 and stats["records_out"] == 1
    assert stats["floors"]["min_inside_fraction"] == 0.7


def test_seed_records_without_source_get_the_seeds_mask_paths(tmp_path):
    images = make_images(tmp_path / "img", [(160, 120)] * 2)
    seed = [{"caption": "c", "entities": KNOWN, "image": [str(path)], "text": "",
             "image_id": f"00000097{i}"} for i, path in enumerate(images)]  # fmt: skip
    write_jsonl(tmp_path / "captioned.jsonl", seed)
    fixed = FixedMasker(known_masks(), [0.9, 0.8])
    stats = run(tmp_path, tmp_path / "captioned.jsonl", fixed)  # as `groundset mask` calls it
    assert stats["records_out"] == 2 and fixed.images == 2
    mask_dir = tmp_path / "masks_out"
    out = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert [r["mask_file"] for r in out] == [
        str((mask_dir / "000000970.npy").resolve()),
        str((mask_dir / "000000971.npy").resolve()),
    ]  # masks/<image_id>.npy, as the seed's
    assert sorted(p.name for p in mask_dir.iterdir()) == ["000000970.npy", "000000971.npy"]
    assert all(np.array_equal(np.load(r["mask_file"]), known_masks()) for r in out)
    assert all("source" not in r and isinstance(r["image"], str) for r in out)
    journal = [json.loads(line) for line in (tmp_path / "out.journal.jsonl").open()]
    assert [e["key"] for e in journal] == ["000000970", "000000971"]
    again = FixedMasker(known_masks(), [0.9, 0.8])
    assert run(tmp_path, tmp_path / "captioned.jsonl", again)["computed"] == 0
    assert again.images == 0


def test_rle_round_trips_to_the_npy_masks(tmp_path, masker):
    entities = [{"entity": "a", "bboxes": [[0.1, 0.1, 0.5, 0.6]]},
                {"entity": "b", "bboxes": [[0.3, 0.2, 0.9, 0.9]]}]  # fmt: skip
    path = captioned(tmp_path, [entities])
    run(tmp_path, path, masker, "npy")
    stats = run(tmp_path, path, masker, "rle", mask_format="rle")
    (npy,) = iter_jsonl(tmp_path / "npy.jsonl")
    (rle,) = iter_jsonl(tmp_path / "rle.jsonl")
    assert rle["mask_file"] is None and len(rle["mask_rle"]) == 2
    assert np.array_equal(decode_rle(rle["mask_rle"]), np.load(npy["mask_file"]))
    assert rle["mask_scores"] == npy["mask_scores"]
    assert not (tmp_path / "masks_rle").exists()
    assert stats["bytes_per_masked_image"] == sum(len(r["counts"]) for r in rle["mask_rle"])


def test_quality_floors_drop_or_flag(tmp_path, masker):
    entities = [{"entity": "a", "bboxes": [[0.1, 0.1, 0.5, 0.6]]}]
    path = captioned(tmp_path, [entities, entities])
    run(tmp_path, path, masker, "job")  # one mask per entity, whatever its quality
    assert len(list(iter_jsonl(tmp_path / "job.jsonl"))) == 2
    # the schema's maximum: no score of these random weights reaches it
    stats = floored(tmp_path, "job", min_score=1.0)
    assert (tmp_path / "job_final.jsonl").read_text() == ""
    reasons = [r["drop_reason"] for r in iter_jsonl(tmp_path / "job_final_dropped.jsonl")]
    assert reasons == ["all_entities_below_quality_floors"] * 2
    assert (
        stats["entities_dropped"] == 2
        and sum(stats["dropped"].values()) == 2
        and stats["records_out"] == 0
    )
    assert np.load(tmp_path / "masks_job" / "src" / "000000.npy").shape == (1, 120, 160)
    stats = floored(tmp_path, "job", min_score=1.0, low_quality="flag")
    out = list(iter_jsonl(tmp_path / "job_final.jsonl"))
    assert [r["mask_low_quality"] for r in out] == [[True], [True]]
    assert stats["entities_flagged"] == 2 and stats["records_out"] == 2
    assert stats["computed"] == 2  # the one job's: gathers never run the model


def one_mask() -> FixedMasker:
    """Known masks for one box on a 160x120 image (resume and gather tests need no SAM2 run)."""
    return FixedMasker(known_masks()[:1], [0.9])


def test_killed_job_resumes_without_recomputing(tmp_path):
    entities = [{"entity": "a", "bboxes": [[0.2, 0.2, 0.7, 0.7]]}]
    path = captioned(tmp_path, [entities] * 5)
    masker = one_mask()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, path, CountingMasker(masker, fail_after=1))  # batch of 2 done, then killed
    assert not (tmp_path / "out.jsonl").exists()
    journal = [json.loads(line) for line in (tmp_path / "out.journal.jsonl").open()]
    assert len(journal) == 2 and all(Path(e["mask_file"]).is_file() for e in journal)
    Path(journal[1]["mask_file"]).unlink()  # a mask lost since: computed again
    again = CountingMasker(masker)
    stats = run(tmp_path, path, again)
    assert again.images == 4 and stats["computed"] == 4 and stats["from_journal"] == 1
    out = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert len(out) == 5 and all(np.load(r["mask_file"]).shape == (1, 120, 160) for r in out)
    stats = run(tmp_path, path, None)  # everything journaled: no model needed at all
    assert stats["computed"] == 0 and stats["records_out"] == 5
    other = CountingMasker(masker)  # other floors: applied after the job, the journal holds
    stats = run(tmp_path, path, other, min_inside_fraction=0.0001, low_quality="flag")
    assert other.images == 0 and stats["computed"] == 0
    other = CountingMasker(masker)  # another format: computed again
    stats = run(tmp_path, path, other, mask_format="rle")
    assert other.images == 5 and stats["computed"] == 5


def test_gather_and_bad_settings(tmp_path):
    entities = [{"entity": "a", "bboxes": [[0.2, 0.2, 0.7, 0.7]]}]
    path = captioned(tmp_path, [entities] * 2)
    masker = one_mask()
    run(tmp_path, path, masker, "c0")
    run(tmp_path, path, masker, "c1", mask_format="rle")
    chunks = [chunk_files(tmp_path, "c0"), chunk_files(tmp_path, "c1")]
    gathered = MaskGatherFiles(records=str(tmp_path / "all.jsonl"),
                               dropped=str(tmp_path / "all_dropped.jsonl"),
                               stats=str(tmp_path / "all.json"))  # fmt: skip
    defaults = MaskSettings.from_config({"model_config": TINY})
    total = gather_masks([c.records for c in chunks], [c.dropped for c in chunks],
                         [c.stats for c in chunks], gathered, defaults)  # fmt: skip
    assert total["records_out"] == 4 and total["chunks"] == 2
    assert len(list(iter_jsonl(tmp_path / "all.jsonl"))) == 4
    assert read_json(tmp_path / "all.json") == total
    with pytest.raises(ValueError, match=r"chunk file lists not aligned: 2, 1, 2"):
        gather_masks([c.records for c in chunks], [chunks[0].dropped],
                     [c.stats for c in chunks], gathered, defaults)  # fmt: skip
    with pytest.raises(ConfigError, match=r"(?m)^mask\.mask_format: 'png' is not one of"):
        MaskSettings.from_config({"mask_format": "png"})
    with pytest.raises(MaskError, match="cannot build SAM2"):
        load_model(
            MaskSettings.from_config({"model_config": "configs/sam2.1/nope.yaml", "device": "cpu"})
        )
    with pytest.raises(MaskError, match="not a file"):
        load_model(
            MaskSettings.from_config({"model_config": TINY, "checkpoint": str(tmp_path / "x.pt")})
        )


def test_a_rerun_that_finds_its_mask_folder_emptied_links_the_journaled_masks(tmp_path):
    """The workflow's layout: Snakemake empties the declared mask folder before it reruns a job;
    the masks computed into the store beside the journal are linked again, not computed."""
    import shutil

    path = captioned(tmp_path, [KNOWN] * 3)
    fixed = FixedMasker(known_masks(), [0.9, 0.8])
    stats = run(tmp_path, path, fixed, store=True)
    files = chunk_files(tmp_path, store=True)
    out = list(iter_jsonl(files.records))
    masks, store = Path(files.masks).resolve(), Path(files.store).resolve()
    assert [r["mask_file"] for r in out] == [str(masks / "src" / f"{i:06d}.npy") for i in range(3)]
    for record in out:  # the record's file is a hard link of the computed one
        computed = store / Path(record["mask_file"]).relative_to(masks)
        assert Path(record["mask_file"]).samefile(computed)
    assert stats["computed"] == 3 and stats["mask_copies"] == 0
    shutil.rmtree(masks)  # what Snakemake does before it reruns mask_chunk
    (store / "src" / "000001.npy").unlink()  # a computed mask lost since: the journal is checked
    again = FixedMasker(known_masks(), [0.9, 0.8])
    stats = run(tmp_path, path, again, store=True)
    assert again.images == 1 and stats["computed"] == 1 and stats["from_journal"] == 2
    assert list(iter_jsonl(files.records)) == out
    assert all(np.array_equal(np.load(r["mask_file"]), known_masks()) for r in out)
    assert all(Path(r["mask_file"]).stat().st_nlink == 2 for r in out)


def test_a_record_captioned_again_with_other_boxes_is_masked_again(tmp_path):
    """The journal remembers what each mask was computed from: new boxes (a caption setting
    changed) are masked again; unchanged records keep theirs."""
    path = captioned(tmp_path, [KNOWN] * 2)
    first = FixedMasker(known_masks(), [0.9, 0.8])
    assert run(tmp_path, path, first, store=True)["computed"] == 2
    records = list(iter_jsonl(path))
    moved = [dict(e, bboxes=[[0.0, 0.0, 0.5, 0.5]]) for e in records[1]["entities"]]
    write_jsonl(path, [records[0], {**records[1], "entities": moved}])
    again = FixedMasker(known_masks(), [0.7, 0.6])
    stats = run(tmp_path, path, again, store=True)
    assert again.images == 1 and stats["computed"] == 1 and stats["from_journal"] == 1
    out = list(iter_jsonl(tmp_path / "out.jsonl"))
    assert out[0]["mask_scores"] == [0.9, 0.8] and out[1]["mask_scores"] == [0.7, 0.6]
    assert [e["bbox"] for e in out[1]["entities"]] == [[0.0, 0.0, 0.5, 0.5]] * 2


def test_masks_follow_their_records_into_new_chunks(tmp_path):
    """The caption input changed (a tier or chunk_size changed): index_chunks moves the mask
    journals' entries with their records, and the new chunks compute nothing already computed
    (one store for all chunks)."""
    from groundset.stages.caption import index_chunks
    from groundset.stages.caption.chunks import iter_range

    source = captioned(tmp_path, [KNOWN] * 4)
    journals = {"caption": tmp_path / "cj", "mask": tmp_path / "mj"}

    def run_chunks(chunk_size: int, masker) -> list[dict]:
        index = index_chunks(source, tmp_path / "chunks.json", chunk_size, *journals.values())
        stats = []
        for chunk in index["shards"]:
            part = tmp_path / f"chunk_{chunk['shard']}.jsonl"
            write_jsonl(part, iter_range(source, chunk["start"], chunk["end"]))
            files = MaskChunkFiles(
                records=str(tmp_path / f"m_{chunk['shard']}.jsonl"),
                dropped=str(tmp_path / f"m_{chunk['shard']}_dropped.jsonl"),
                stats=str(tmp_path / f"m_{chunk['shard']}_stats.json"),
                masks=str(tmp_path / "masks" / f"chunk_{chunk['shard']}"),
                journal=str(journals["mask"] / f"chunk_{chunk['shard']}.jsonl"),
                store=str(tmp_path / "store"),
            )
            settings = MaskSettings.from_config({"model_config": TINY, "device": "cpu"})
            stats.append(mask_chunk(part, files, settings, masker))
        return stats

    first = FixedMasker(known_masks(), [0.9, 0.8])
    assert [s["computed"] for s in run_chunks(3, first)] == [3, 1]
    again = FixedMasker(known_masks(), [0.1, 0.1])
    stats = run_chunks(2, again)  # records 2 and 3 now in chunk 1, record 2's entry moved there
    assert again.images == 0 and [s["computed"] for s in stats] == [0, 0]
    assert [s["from_journal"] for s in stats] == [2, 2]
    assert read_json(journals["mask"] / "layout.json")["chunk_size"] == 2


def test_the_params_are_the_output_keys_and_the_rest_are_knobs():
    section = validate_config({"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS})[
        "mask"
    ]
    groups = (set(OUTPUT_KEYS), set(FLOOR_KEYS), set(TUNING_KEYS))
    assert set().union(*groups) == set(section)  # every key is one of them
    assert sum(map(len, groups)) == len(section)  # and only one
    assert list(output_settings(section)) == list(OUTPUT_KEYS)
    base = MaskSettings.from_config(section)
    knobs = {"batch_size": 1, "device": "cpu", "decode_workers": 9}
    assert MaskSettings.from_config({**section, **knobs}).digest == base.digest  # journal reused
    assert MaskSettings.from_config({**section, "mask_format": "rle"}).digest != base.digest
    for key, value in {"min_score": 0.5, "min_inside_fraction": 0.3, "low_quality": "flag"}.items():
        # a floor is applied after the job: the journaled masks stay valid
        assert MaskSettings.from_config({**section, key: value}).digest == base.digest, key
