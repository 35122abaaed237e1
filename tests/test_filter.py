"""Filter stage: image probing, recipe templating, and the real data-juicer on a mixed shard."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import RANDOM_WEIGHTS, ROOT, SAMPLE
from groundset.config import validate_config
from groundset.filter import (
    OTHER_KEYS,
    OUTPUT_KEYS,
    TUNING_KEYS,
    ShardFiles,
    aesthetics_divisor,
    fill_template,
    filter_shard,
    make_dj_config,
    output_settings,
    per_filter_removed,
    probe_image,
    probe_shard,
    process_shard,
    resolve_models,
    with_tuning,
)
from groundset.io import iter_jsonl, write_jsonl
from groundset.merge import merge_tiers
from groundset.split import index_manifest

PHOTOS = SAMPLE / "www" / "img"


def tiers(folder: Path) -> tuple[Path, Path]:
    """The two tier files in `folder`, as `groundset merge --outdir` names them."""
    return folder / "merged_output.jsonl", folder / "aes_6.jsonl"


def bad_files(folder):
    """Every kind of file that breaks image loading, plus odd but valid encodings."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.jpg").write_bytes(b"garbage" * 50)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.jpg").write_text("<html>not an image</html>")
    buf = io.BytesIO()
    Image.new("RGB", (1300, 1100), (20, 150, 20)).save(buf, "JPEG")
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (1200, 1100), (100, 10, 200)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.new("RGB", (1200, 1100), (1, 150, 200)).convert("P").save(folder / "palette.png")
    Image.fromarray((np.arange(1100 * 1200).reshape(1100, 1200) % 65535).astype(np.uint16)).save(
        folder / "16bit.png"
    )
    frames = [Image.new("P", (1200, 1100), i * 40) for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    return folder


def test_probe_image_reasons(tmp_path):
    folder = bad_files(tmp_path)
    assert probe_image(str(folder / "corrupt.jpg"))[0].startswith("not_an_image:")
    assert probe_image(str(folder / "page.jpg"))[0].startswith("not_an_image:")
    assert probe_image(str(folder / "empty.jpg")) == ("empty_file: 0 bytes", None)
    assert probe_image(str(folder / "truncated.jpg"))[0].startswith("truncated:")
    assert probe_image(str(folder / "gone.jpg")) == ("missing_file: not found", None)
    for fine in ("cmyk.jpg", "palette.png", "16bit.png", "animated.gif"):
        assert probe_image(str(folder / fine)) == (None, (1200, 1100)), fine
    assert probe_image(str(PHOTOS / "chelsea.jpg")) == (None, (451, 300))


def test_probe_shard_keeps_order_and_counts_reasons(tmp_path):
    folder = bad_files(tmp_path / "img")
    names = [
        "cmyk.jpg",
        "corrupt.jpg",
        "empty.jpg",
        "gone.jpg",
        "truncated.jpg",
        "page.jpg",
        "palette.png",
        "16bit.png",
        "animated.gif",
    ]
    write_jsonl(
        tmp_path / "s.jsonl",
        ({"image": [str(folder / n)], "text": "", "image_id": n} for n in names),
    )
    stats = probe_shard(tmp_path / "s.jsonl", tmp_path / "k.jsonl", tmp_path / "d.jsonl", threads=2)
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "k.jsonl")] == [
        "cmyk.jpg",
        "palette.png",
        "16bit.png",
        "animated.gif",
    ]
    assert stats == {
        "records_in": 9,
        "records_out": 4,
        "dropped": {"empty_file": 1, "missing_file": 1, "not_an_image": 2, "truncated": 1},
    }
    kept = list(iter_jsonl(tmp_path / "k.jsonl"))
    assert kept[0]["__dj__stats__"] == {
        "image_width": [1200],
        "image_height": [1100],
        "aspect_ratios": [1200 / 1100],
    }
    probe_shard(
        tmp_path / "s.jsonl", tmp_path / "k2.jsonl", tmp_path / "d2.jsonl", header_sizes=False
    )
    assert "__dj__stats__" not in next(iter_jsonl(tmp_path / "k2.jsonl"))
    dropped = {r["image_id"]: r["drop_reason"] for r in iter_jsonl(tmp_path / "d.jsonl")}
    assert set(dropped) == {"corrupt.jpg", "empty.jpg", "gone.jpg", "truncated.jpg", "page.jpg"}


def test_fill_template_fills_nulls_and_refuses_unknown_ones():
    template = {
        "np": None,
        "open_tracer": True,
        "process": [
            {"image_shape_filter": {"min_width": None, "any_or_all": "any"}},
            {"custom_op": {"x": 1}},
        ],
    }
    filled = fill_template(template, {"np": 3}, {"image_shape_filter": {"min_width": 1024}})
    assert filled == {
        "np": 3,
        "open_tracer": True,
        "process": [
            {"image_shape_filter": {"min_width": 1024, "any_or_all": "any"}},
            {"custom_op": {"x": 1}},
        ],
    }
    assert template["np"] is None  # the template itself is untouched
    with pytest.raises(ValueError, match="'work_dir' is null"):
        fill_template({"work_dir": None}, {}, {})
    with pytest.raises(ValueError, match="image_nsfw_filter: 'max_score' is null"):
        fill_template({"process": [{"image_nsfw_filter": {"max_score": None}}]}, {}, {})


@pytest.mark.parametrize(
    "model, divisor",
    [
        ("shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE", 10.0),
        ("/ckpt/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE", 10.0),
        ("/ckpt/laion-scorer-v2-linear", 1.0),
    ],
)
def test_seed_recipe_from_config_with_the_right_aesthetics_scale(tmp_path, model, divisor):
    config = validate_config(
        {
            "sources": [{"name": "s", "url_list": "x"}],
            "filter": {"aesthetics": {"model": model}},
            **RANDOM_WEIGHTS,
        }
    )
    recipe = make_dj_config(
        ROOT / "config" / "data_juicer_filter.yaml",
        tmp_path / "r.yaml",
        dataset_path="in.jsonl",
        export_path="out/x.jsonl",
        project_name="p",
        work_dir="w",
        filter_cfg=config["filter"],
        models=resolve_models(config["filter"]),
    )
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == recipe
    ops = {name: params for entry in recipe["process"] for name, params in entry.items()}
    assert list(ops) == [
        "image_shape_filter",
        "image_aspect_ratio_filter",
        "image_nsfw_filter",
        "image_watermark_filter",
        "image_aesthetics_filter",
    ]
    assert ops["image_shape_filter"] == {"any_or_all": "any", "min_width": 1024, "min_height": 1024}
    assert ops["image_aspect_ratio_filter"] == {
        "any_or_all": "any",
        "min_ratio": 0.5,
        "max_ratio": 2.0,
    }
    assert ops["image_nsfw_filter"] == {
        "any_or_all": "any",
        "hf_nsfw_model": "Falconsai/nsfw_image_detection",
        "max_score": 0.0006,
        "mem_required": "1GB",
    }
    assert ops["image_watermark_filter"]["prob_threshold"] == 0.8
    assert ops["image_watermark_filter"]["hf_watermark_model"] == "amrul-hzz/watermark_detector"
    assert aesthetics_divisor(model) == divisor
    assert ops["image_aesthetics_filter"]["min_score"] == 5 / divisor
    assert ops["image_aesthetics_filter"]["max_score"] == 10 / divisor
    assert (
        recipe["np"] == 4
        and recipe["keep_stats_in_res_ds"] is True
        and recipe["open_tracer"] is True
    )
    assert recipe["dataset_path"] == str(Path("in.jsonl").resolve())
    assert recipe["export_path"] == str(Path("out/x.jsonl").resolve())
    assert recipe["image_key"] == "image" and recipe["text_keys"] == "text"


def test_per_filter_removed():
    left = [("image_shape_filter", 8), ("image_aspect_ratio_filter", 8), ("image_nsfw_filter", 5)]
    assert per_filter_removed(10, left) == {
        "image_shape_filter": 2,
        "image_aspect_ratio_filter": 0,
        "image_nsfw_filter": 3,
    }


# --- the real data-juicer -------------------------------------------------------------------


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from groundset.testing.models import build_stand_in_models

    return build_stand_in_models(tmp_path_factory.mktemp("models"))


def reference_scores(paths, models):
    """Scores of the stand-in models computed here with transformers, independently of data-juicer."""
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import AutoProcessor, CLIPProcessor, ViTForImageClassification

    images = [Image.open(p).convert("RGB") for p in paths]
    scores = {}
    for name in ("nsfw", "watermark"):
        model = ViTForImageClassification.from_pretrained(models[name]).eval()
        inputs = AutoProcessor.from_pretrained(models[name])(images=images, return_tensors="pt")
        with torch.no_grad():
            scores[name] = torch.softmax(model(**inputs).logits, -1)[:, 1].tolist()
    model = AestheticsPredictorV2Linear.from_pretrained(models["aesthetics"]).eval()
    inputs = CLIPProcessor.from_pretrained(models["aesthetics"])(images=images, return_tensors="pt")
    with torch.no_grad():
        scores["aesthetics"] = model(**inputs).logits[:, 0].tolist()
    return scores


def test_real_data_juicer_keeps_exactly_the_expected_records(tmp_path, stand_ins):
    photos = sorted(
        p
        for p in PHOTOS.iterdir()
        if p.suffix in (".jpg", ".png", ".webp")
        and p.stat().st_size > 100
        and not p.name.startswith("truncated")
    )
    bad = bad_files(tmp_path / "bad")
    paths = photos + [
        bad / n
        for n in (
            "corrupt.jpg",
            "empty.jpg",
            "truncated.jpg",
            "page.jpg",
            "cmyk.jpg",
            "palette.png",
            "16bit.png",
            "animated.gif",
        )
    ]
    records = [
        {"image": [str(p)], "text": p.stem, "image_id": f"{i:04d}", "source": "t"}
        for i, p in enumerate(paths)
    ]
    write_jsonl(tmp_path / "shard.jsonl", records)
    probe = probe_shard(
        tmp_path / "shard.jsonl", tmp_path / "probed.jsonl", tmp_path / "dropped.jsonl", 2
    )
    assert probe["dropped"] == {"empty_file": 1, "not_an_image": 2, "truncated": 1}

    # Reference: sizes from the files, scores from the same models run here; thresholds at medians.
    usable = list(iter_jsonl(tmp_path / "probed.jsonl"))
    sizes = [Image.open(r["image"][0]).size for r in usable]
    ref = reference_scores([r["image"][0] for r in usable], stand_ins)
    passes_geometry = [w >= 1024 and h >= 1024 and 0.5 <= w / h <= 2.0 for w, h in sizes]
    geo = [i for i, ok in enumerate(passes_geometry) if ok]
    assert 0 < len(geo) < len(usable)
    nsfw_max = float(np.quantile([ref["nsfw"][i] for i in geo], 0.8))
    config = validate_config(
        {
            "sources": [{"name": "s", "url_list": "x"}],
            "filter": {
                "np": 1,
                "nsfw": {"max_score": nsfw_max},
                "watermark": {"max_prob": 0.6},
                "aesthetics": {"min_score": 5.0, "max_score": 8.0},
            },
            **RANDOM_WEIGHTS,
        }
    )
    fcfg = config["filter"]
    expected_removed = {
        op: 0
        for op in (
            "image_shape_filter",
            "image_aspect_ratio_filter",
            "image_nsfw_filter",
            "image_watermark_filter",
            "image_aesthetics_filter",
        )
    }
    kept = []
    for i, (w, h) in enumerate(sizes):
        if not (w >= 1024 and h >= 1024):
            expected_removed["image_shape_filter"] += 1
        elif not 0.5 <= w / h <= 2.0:
            expected_removed["image_aspect_ratio_filter"] += 1
        elif ref["nsfw"][i] > nsfw_max:
            expected_removed["image_nsfw_filter"] += 1
        elif ref["watermark"][i] > 0.6:
            expected_removed["image_watermark_filter"] += 1
        elif not 5.0 <= ref["aesthetics"][i] <= 8.0:
            expected_removed["image_aesthetics_filter"] += 1
        else:
            kept.append(i)
    assert all(
        expected_removed[op] > 0
        for op in ("image_shape_filter", "image_aspect_ratio_filter", "image_nsfw_filter")
    ), expected_removed
    assert kept

    recipe = tmp_path / "recipe.yaml"
    make_dj_config(
        ROOT / "config" / "data_juicer_filter.yaml",
        recipe,
        dataset_path=str(tmp_path / "probed.jsonl"),
        export_path=str(tmp_path / "work" / "export" / "x.jsonl"),
        project_name="t",
        work_dir=str(tmp_path / "work"),
        filter_cfg=fcfg,
        models=stand_ins,
    )
    # leftovers of a killed run are cleared first
    (tmp_path / "work" / "export").mkdir(parents=True)
    (tmp_path / "work" / "export" / "x.jsonl").write_text('{"image": ["stale"]}\n')
    stats = filter_shard(
        recipe, tmp_path / "filtered.jsonl", tmp_path / "stats.json", probe_stats=probe
    )
    out = list(iter_jsonl(tmp_path / "filtered.jsonl"))
    assert [r["image_id"] for r in out] == [usable[i]["image_id"] for i in kept]
    assert stats["removed_by_filter"] == expected_removed
    assert stats["records_in"] == len(usable) and stats["records_out"] == len(kept)
    assert stats["aesthetics_score_divisor"] == 10.0 and stats["probe"] == probe
    assert not (tmp_path / "work").exists()
    for record, i in zip(out, kept, strict=True):
        s = record["__dj__stats__"]
        assert sorted(s) == [
            "aspect_ratios",
            "image_aesthetics_scores",
            "image_height",
            "image_nsfw_score",
            "image_watermark_prob",
            "image_width",
        ]
        assert (s["image_width"], s["image_height"]) == ([sizes[i][0]], [sizes[i][1]])
        assert s["image_aesthetics_scores"][0] == pytest.approx(
            ref["aesthetics"][i], rel=1e-4
        )  # 0-10 scale
        assert s["image_nsfw_score"][0] == pytest.approx(ref["nsfw"][i], rel=1e-3, abs=1e-7)

    # Tiers by score; changing a tier only re-reads the stored scores.
    scores = {usable[i]["image_id"]: ref["aesthetics"][i] for i in kept}
    tier = float(np.median(list(scores.values())))
    merge = merge_tiers([tmp_path / "filtered.jsonl"], tiers(tmp_path / "merged"), [5.0, tier])
    low = [r["image_id"] for r in iter_jsonl(tmp_path / "merged" / "merged_output.jsonl")]
    high = [r["image_id"] for r in iter_jsonl(tmp_path / "merged" / "aes_6.jsonl")]
    assert low == [usable[i]["image_id"] for i in kept]
    assert high == [k for k in low if scores[k] >= tier] and 0 < len(high) < len(low) + 1
    assert merge["records"] == {"merged_output.jsonl": len(low), "aes_6.jsonl": len(high)}
    shutil.rmtree(tmp_path / "merged")


def test_process_shard_leaves_every_step_of_one_shard(tmp_path, stand_ins):
    """One job per shard: the slice, probe, recipe and data-juicer output all land, and agree."""
    folder = bad_files(tmp_path / "img")
    photo = sorted(PHOTOS.iterdir())[0]
    images = [photo, folder / "corrupt.jpg", folder / "cmyk.jpg", folder / "empty.jpg"]
    records = [
        {"image": [str(p)], "text": p.stem, "image_id": f"{i:04d}", "source": "t"}
        for i, p in enumerate([folder / "palette.png", *images])
    ]
    write_jsonl(tmp_path / "manifest.jsonl", records)
    index = index_manifest(tmp_path / "manifest.jsonl", 1)  # shard 1..4: the last four records
    fcfg = validate_config(
        {"sources": [{"name": "s", "url_list": "x"}], "filter": {"np": 1}, **RANDOM_WEIGHTS}
    )["filter"]
    out = tmp_path / "out"
    names = {"recipe": "recipe.yaml", "stats": "stats.json", "work": "work"}
    files = ShardFiles(
        **{n: str(out / names.get(n, f"{n}.jsonl")) for n in ShardFiles.__dataclass_fields__}
    )
    stats = {}
    for shard in (1, 2):
        stats[shard] = process_shard(
            index,
            shard,
            files,
            template=ROOT / "config" / "data_juicer_filter.yaml",
            name=f"t_shard_{shard}",
            filter_cfg=fcfg,
            models=stand_ins,
        )
        assert json.loads(Path(files.stats).read_text()) == stats[shard]
        assert list(iter_jsonl(files.shard)) == [records[shard]]
        recipe = yaml.safe_load(Path(files.recipe).read_text())
        assert recipe["dataset_path"] == str(Path(files.probed).resolve())
        assert recipe["project_name"] == f"groundset_filter_t_shard_{shard}"
        assert recipe["work_dir"] == str(Path(files.work).resolve())
        # data-juicer's work folder is left empty: the workflow's temp() output, Snakemake removes it
        assert list(Path(files.work).iterdir()) == []
        if shard == 1:
            (probed,) = iter_jsonl(files.probed)
            assert probed["__dj__stats__"]["image_width"] == [Image.open(photo).size[0]]
    # shard 1: a photo, probed with its header size, then judged by data-juicer
    assert stats[1]["probe"] == {"records_in": 1, "records_out": 1, "dropped": {}}
    assert (
        stats[1]["records_in"] == 1
        and sum(stats[1]["removed_by_filter"].values()) + stats[1]["records_out"] == 1
    )
    # shard 2: an undecodable file, dropped by the probe with its reason; data-juicer sees nothing
    assert stats[2]["probe"] == {"records_in": 1, "records_out": 0, "dropped": {"not_an_image": 1}}
    assert stats[2]["records_in"] == stats[2]["records_out"] == 0
    (dropped,) = iter_jsonl(files.dropped)
    assert dropped["image_id"] == "0002" and dropped["drop_reason"].startswith("not_an_image:")
    assert Path(files.kept).read_text() == ""


def test_the_params_are_the_output_keys_and_the_knobs_come_from_the_config():
    section = validate_config({"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS})[
        "filter"
    ]
    leaves = {
        f"{key}.{sub}" if isinstance(value, dict) else key
        for key, value in section.items()
        for sub in (value if isinstance(value, dict) else [None])
    }
    named = set(OUTPUT_KEYS) | set(TUNING_KEYS) | set(OTHER_KEYS)
    covered = {leaf for leaf in leaves if leaf in named or leaf.split(".")[0] in named}
    assert covered == leaves  # every key is an output key, a knob, or the template/merge's
    assert not set(OUTPUT_KEYS) & set(TUNING_KEYS)
    params = output_settings(section)
    assert "np" not in params and "mem_required" not in params["nsfw"]
    assert params["nsfw"] == {"model": section["nsfw"]["model"], "max_score": 0.0006}
    assert with_tuning(params, section) == {
        k: v for k, v in section.items() if k not in OTHER_KEYS
    }  # the job's settings: its params and the config's knobs


def test_merge_refuses_duplicate_inputs_and_counts_unscored(tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {
                "image": ["/x/1.jpg"],
                "source": "s",
                "__dj__stats__": {"image_aesthetics_scores": [6.5]},
            },
            {
                "image": ["/x/2.jpg"],
                "source": "s",
                "__dj__stats__": {"image_aesthetics_scores": [5.2]},
            },
            {"image": ["/x/3.jpg"], "source": "s", "__dj__stats__": {}},
        ],
    )
    with pytest.raises(ValueError, match="listed twice"):
        merge_tiers([tmp_path / "a.jsonl", tmp_path / "a.jsonl"], tiers(tmp_path / "m"), [5, 6])
    stats = merge_tiers([tmp_path / "a.jsonl"], tiers(tmp_path / "m"), [5, 6])
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "m" / "aes_6.jsonl")] == ["1"]
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "m" / "merged_output.jsonl")] == ["1", "2"]
    assert stats["records_without_score"] == 1
    assert json.loads(json.dumps(stats))["per_source"]["s"] == {
        "aes_6.jsonl": 1,
        "merged_output.jsonl": 2,
    }
