"""Filter stage: probing, scoring through data-juicer (exact and fast), selecting as data-juicer does."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import RANDOM_WEIGHTS, ROOT, SAMPLE
from groundset.core.config import validate_config
from groundset.core.io import iter_jsonl, write_jsonl
from groundset.core.reproduce import differences, scores_agree
from groundset.stages.filter import score, scoring
from groundset.stages.filter.score import ScoreFiles
from groundset.stages.filter.select import (
    SelectFiles,
    rules_from_recipe,
    select_shard,
    selection_rules,
    verdict,
)
from groundset.stages.filter.shard import (
    OPS,
    SELECT_KEYS,
    aesthetics_divisor,
    fill_template,
    filter_shard,
    make_dj_config,
    per_filter_removed,
    probe_image,
    probe_shard,
    resolve_models,
    select_settings,
)
from groundset.stages.merge import merge_tiers
from groundset.stages.split import index_manifest

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


def test_probe_shard_keeps_order_and_counts_reasons(tmp_path, monkeypatch):
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
    # a relative path is opened where the probe runs; data-juicer gets it absolute (it would
    # resolve it against its input file's folder)
    monkeypatch.chdir(folder)
    write_jsonl(tmp_path / "r.jsonl", [{"image": ["cmyk.jpg"], "image_id": "r"}])
    probe_shard(tmp_path / "r.jsonl", tmp_path / "rk.jsonl", tmp_path / "rd.jsonl")
    assert next(iter_jsonl(tmp_path / "rk.jsonl"))["image"] == [str(folder / "cmyk.jpg")]


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


def sample_shard(tmp_path):
    """The sample's photos (real and generated) plus every kind of broken file, probed."""
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
    return probe


def score_files(folder: Path, probed: Path) -> ScoreFiles:
    """A score job's files under `folder`, reading an already probed shard."""
    return ScoreFiles(
        shard="",
        probed=str(probed),
        dropped="",
        recipe=str(folder / "recipe.yaml"),
        scored=str(folder / "scored.jsonl"),
        stats=str(folder / "score_stats.json"),
        work=str(folder / "work"),
    )


def select_files(folder: Path) -> SelectFiles:
    """A select job's files under `folder` (after `score_files`)."""
    return SelectFiles(
        scored=str(folder / "scored.jsonl"),
        kept=str(folder / "kept.jsonl"),
        rejected=str(folder / "rejected.jsonl"),
        stats=str(folder / "stats.json"),
    )


def test_exact_scores_and_selection_equal_stock_data_juicer(tmp_path, stand_ins):
    """Exact mode (fp32, full decode) + select == the seed's recipe run by stock data-juicer."""
    probe = sample_shard(tmp_path)
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
                "precision": "fp32",
                "decode": "full",
                "nsfw": {"max_score": nsfw_max},
                "watermark": {"max_prob": 0.6},
                "aesthetics": {"min_score": 5.0, "max_score": 8.0},
            },
            **RANDOM_WEIGHTS,
        }
    )
    fcfg = config["filter"]
    # An independent expectation: sizes from the files, scores from the models run here.
    expected_removed = dict.fromkeys(OPS, 0)
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

    # The seed's way: the template filled with the thresholds, run by stock data-juicer.
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
    stock = filter_shard(
        recipe, tmp_path / "filtered.jsonl", tmp_path / "stats.json", probe_stats=probe
    )
    stock_kept = list(iter_jsonl(tmp_path / "filtered.jsonl"))
    assert [r["image_id"] for r in stock_kept] == [usable[i]["image_id"] for i in kept]
    assert {op: stock["dropped"][op] for op in expected_removed} == expected_removed
    assert stock["stage"] == "filter" and stock["records_in"] == probe["records_in"]
    assert not (tmp_path / "work").exists()

    # groundset: score every record once (exact mode), then select with the same thresholds.
    out = tmp_path / "groundset"
    files = score_files(out, tmp_path / "probed.jsonl")
    settings = score.with_tuning(score.score_settings(fcfg), fcfg)
    scored_stats = score.score_probed(
        files,
        template=ROOT / "config" / "data_juicer_filter.yaml",
        name="t",
        settings=settings,
        models=stand_ins,
        threads=2,
        probe=probe,
    )
    assert scored_stats["records_out"] == len(usable) and scored_stats["stage"] == "score"
    assert (scored_stats["records_in"], scored_stats["dropped"]) == (
        probe["records_in"],
        probe["dropped"],
    )
    assert (scored_stats["precision"], scored_stats["decode"]) == ("fp32", "full")
    assert not Path(files.work).exists()
    recipe = yaml.safe_load(Path(files.recipe).read_text())
    assert [next(iter(e)) for e in recipe["process"]] == ["groundset_image_scores_filter"]
    scored = list(iter_jsonl(files.scored))
    assert [r["image_id"] for r in scored] == [r["image_id"] for r in usable]  # none removed
    for i, record in enumerate(scored):
        s = record["__dj__stats__"]
        assert sorted(s) == sorted(scoring.STATS_KEYS)
        assert (s["image_width"], s["image_height"]) == ([sizes[i][0]], [sizes[i][1]])
        # the models' scores within the README's bound (another batch, another reduction order)
        for key, name in (("image_nsfw_score", "nsfw"), ("image_watermark_prob", "watermark"),
                          ("image_aesthetics_scores", "aesthetics")):  # fmt: skip
            assert scores_agree(key, s[key][0], ref[name][i]), (key, s[key][0], ref[name][i])
    stock_stats = {r["image_id"]: r["__dj__stats__"] for r in stock_kept}
    for record in scored:
        if record["image_id"] in stock_stats:  # stock's kept records, scores on 0-10 both
            stock_scores = stock_stats[record["image_id"]]
            ours = {key: record["__dj__stats__"][key] for key in stock_scores}
            assert not differences(ours, stock_scores, "__dj__stats__")

    stats = select_shard(
        select_files(out), selection_rules(ROOT / "config" / "data_juicer_filter.yaml", fcfg)
    )
    assert [r["image_id"] for r in iter_jsonl(out / "kept.jsonl")] == [
        r["image_id"] for r in stock_kept
    ]
    assert stats["dropped"] == expected_removed and stats["stage"] == "select"
    assert stats["records_in"] == stock["records_in"] - sum(probe["dropped"].values())
    rejected = list(iter_jsonl(out / "rejected.jsonl"))
    assert len(rejected) == sum(expected_removed.values())
    by_op = Counter(r["drop_reason"] for r in rejected)
    assert by_op == {op: n for op, n in expected_removed.items() if n}
    assert all(r["drop_stage"] == "select" and "__dj__stats__" in r for r in rejected)
    assert all(r["detail"].startswith(r["drop_reason"] + ": ") for r in rejected)
    reasons = {r["image_id"]: r["detail"] for r in rejected}
    for i, (w, _) in enumerate(sizes):
        if w < 1024:
            assert reasons[usable[i]["image_id"]] == f"image_shape_filter: width {w} < 1024"
    nsfw = [r for r in rejected if r["drop_reason"] == "image_nsfw_filter"]
    assert nsfw and all(
        r["detail"]
        == f"image_nsfw_filter: {r['__dj__stats__']['image_nsfw_score'][0]:.6g} > {nsfw_max:.6g}"
        for r in nsfw
    )

    # Fast mode (draft decode, bf16 where the CPU has it) stays close to the exact scores.
    fast = tmp_path / "fast"
    fast_cfg = {**fcfg, "precision": "auto", "decode": "draft"}
    score.score_probed(
        score_files(fast, tmp_path / "probed.jsonl"),
        template=ROOT / "config" / "data_juicer_filter.yaml",
        name="t",
        settings=score.with_tuning(score.score_settings(fast_cfg), fast_cfg),
        models=stand_ins,
        threads=2,
    )
    for exact, quick in zip(scored, iter_jsonl(fast / "scored.jsonl"), strict=True):
        a, b = exact["__dj__stats__"], quick["__dj__stats__"]
        assert (a["image_width"], a["image_height"]) == (b["image_width"], b["image_height"])
        for key, tolerance in (
            ("image_nsfw_score", 0.05),
            ("image_watermark_prob", 0.1),
            ("image_aesthetics_scores", 0.5),
        ):
            assert abs(a[key][0] - b[key][0]) <= tolerance, (exact["image_id"], key)

    # Tiers by score; changing a tier only re-reads the stored scores.
    scores = {usable[i]["image_id"]: ref["aesthetics"][i] for i in kept}
    tier = float(np.median(list(scores.values())))
    merge = merge_tiers([out / "kept.jsonl"], tiers(tmp_path / "merged"), [5.0, tier])
    low = [r["image_id"] for r in iter_jsonl(tmp_path / "merged" / "merged_output.jsonl")]
    high = [r["image_id"] for r in iter_jsonl(tmp_path / "merged" / "aes_6.jsonl")]
    assert low == [usable[i]["image_id"] for i in kept]
    assert high == [k for k in low if scores[k] >= tier] and 0 < len(high) < len(low) + 1
    assert merge["per_tier"] == {"merged_output.jsonl": len(low), "aes_6.jsonl": len(high)}


def _stock_keeps(op, stats: dict) -> bool:
    """Whether data-juicer's own op keeps a record with these stats."""
    if op.is_batched_op():
        return bool(next(iter(op.process_batched({"__dj__stats__": [stats]}))))
    return bool(op.process_single({"__dj__stats__": stats}))


@pytest.mark.parametrize("seed", [0, 1])
def test_select_applies_bounds_exactly_as_data_juicer(seed):
    """Random stats at and around the bounds, one to three images, any/all, open and reversed
    ranges: select keeps exactly what data-juicer's own ops keep, and names the first failure."""
    from data_juicer.ops import load_ops  # models load lazily: none is loaded here

    rng = np.random.default_rng(seed)
    process = [
        {"image_shape_filter": {"min_width": 1024, "min_height": 1000, "max_height": 3000}},
        {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0, "any_or_all": "all"}},
        {"image_nsfw_filter": {"hf_nsfw_model": "/n", "max_score": 0.0006}},
        {"image_watermark_filter": {"hf_watermark_model": "/w", "prob_threshold": 0.8}},
        {
            "image_aesthetics_filter": {
                "hf_scorer_model": "/a/aesthetics-predictor-v2-linear",
                "min_score": 0.5,
                "max_score": 0.9,
                "any_or_all": "all" if seed else "any",
                "max_closed_interval": False,
            }
        },
    ]
    if seed:
        process[2]["image_nsfw_filter"]["reversed_range"] = True
    rules = rules_from_recipe({"process": process})
    ops = load_ops(process)
    outcomes = Counter()
    for _ in range(3000):
        n = int(rng.integers(1, 4))
        stats = {
            "image_width": rng.choice([1023, 1024, 1025, 2048], n).tolist(),
            "image_height": rng.choice([999, 1000, 1024, 3000, 3001], n).tolist(),
            "aspect_ratios": rng.choice([0.4999, 0.5, 1.0, 2.0, 2.0001], n).tolist(),
            "image_nsfw_score": rng.choice([0.0, 0.0005, 0.0006, 0.0007], n).tolist(),
            "image_watermark_prob": rng.choice([0.1, 0.8, 0.80001], n).tolist(),
            # stored on LAION's 0-10 scale; data-juicer compares score / 10 with 0.5-0.9
            "image_aesthetics_scores": rng.choice([4.99, 5.0, 6.0, 9.0, 9.01], n).tolist(),
        }
        dj_stats = {
            **stats,
            "image_aesthetics_scores": [v / 10 for v in stats["image_aesthetics_scores"]],
        }
        expected = next((op._name for op in ops if not _stock_keeps(op, dj_stats)), None)
        op_name, reason = verdict({"image": ["x.jpg"] * n, "__dj__stats__": stats}, rules)
        assert op_name == expected, (stats, reason)
        assert reason is None if expected is None else reason.startswith(f"{expected}: ")
        outcomes[op_name] += 1
    assert len(outcomes) == 6 and min(outcomes.values()) > 30, outcomes  # every branch exercised


def test_select_drops_what_scoring_could_not_decode_and_handles_empty_shards(tmp_path):
    rules = selection_rules(
        ROOT / "config" / "data_juicer_filter.yaml",
        validate_config({"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS})["filter"],
    )
    good = {
        "image_width": [1500],
        "image_height": [1200],
        "aspect_ratios": [1.25],
        "image_nsfw_score": [0.0001],
        "image_watermark_prob": [0.1],
        "image_aesthetics_scores": [6.1],
    }
    changed = {**good, scoring.SCORE_ERRORS: ["OSError: image file is truncated"]}
    write_jsonl(
        tmp_path / "scored.jsonl",
        [
            {"image": ["/a.jpg"], "image_id": "a", "__dj__stats__": good},
            {"image": ["/b.jpg"], "image_id": "b", "__dj__stats__": changed},
            {"image": ["/c.jpg"], "image_id": "c"},  # never scored (a manifest fed to select)
            {
                "image": ["/d.jpg"],
                "image_id": "d",
                "__dj__stats__": {**good, "image_nsfw_score": []},
            },
            {"image": [], "image_id": "e", "__dj__stats__": {}},  # no image: data-juicer keeps it
        ],
    )
    stats = select_shard(select_files(tmp_path), rules)
    assert [r["image_id"] for r in iter_jsonl(tmp_path / "kept.jsonl")] == ["a", "e"]
    rejected = list(iter_jsonl(tmp_path / "rejected.jsonl"))
    assert {r["drop_reason"] for r in rejected} == {"score_error"}
    bad = {r["image_id"]: r["detail"] for r in rejected}
    assert bad == {
        "b": "score_error: OSError: image file is truncated",
        "c": "score_error: no image_width for its 1 image(s): not scored",
        "d": "score_error: no image_nsfw_score for its 1 image(s): not scored",
    }
    assert stats["dropped"]["score_error"] == 3
    assert stats["bounds"]["image_aesthetics_filter"] == {"min_score": 5.0, "max_score": 10.0}
    assert stats["records_in"] - sum(stats["dropped"].values()) == stats["records_out"]
    # zero records is a normal outcome
    (tmp_path / "scored.jsonl").write_text("")
    stats = select_shard(select_files(tmp_path), rules)
    assert (stats["records_in"], stats["records_out"]) == (0, 0)
    assert set(stats["dropped"].values()) == {0}
    assert (tmp_path / "kept.jsonl").read_text() == (tmp_path / "rejected.jsonl").read_text() == ""
    with pytest.raises(ValueError, match="recipe template op 'image_text_similarity_filter'"):
        rules_from_recipe({"process": [{"image_text_similarity_filter": {}}]})


def test_score_shard_leaves_every_step_of_one_shard(tmp_path, stand_ins):
    """One job per shard: the slice, probe, recipe and scores all land, and agree."""
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
    files = ScoreFiles(
        **{n: str(out / names.get(n, f"{n}.jsonl")) for n in ScoreFiles.__dataclass_fields__}
    )
    stats = {}
    for shard in (1, 2):
        stats[shard] = score.score_shard(
            index,
            shard,
            files,
            template=ROOT / "config" / "data_juicer_filter.yaml",
            name=f"t_shard_{shard}",
            settings=score.with_tuning(score.score_settings(fcfg), fcfg),
            models=stand_ins,
        )
        assert json.loads(Path(files.stats).read_text()) == stats[shard]
        assert list(iter_jsonl(files.shard)) == [records[shard]]
        recipe = yaml.safe_load(Path(files.recipe).read_text())
        assert recipe["dataset_path"] == str(Path(files.probed).resolve())
        assert recipe["project_name"] == f"groundset_score_t_shard_{shard}"
        assert recipe["work_dir"] == str(Path(files.work).resolve())
        assert recipe["custom_operator_paths"] == [scoring.dj_ops_path()]
        # data-juicer's work folder is left empty: the workflow's temp() output, Snakemake removes it
        assert not Path(files.work).exists()
        if shard == 1:
            (probed,) = iter_jsonl(files.probed)
            assert probed["__dj__stats__"]["image_width"] == [Image.open(photo).size[0]]
            (scored,) = iter_jsonl(files.scored)
            assert sorted(scored["__dj__stats__"]) == sorted(scoring.STATS_KEYS)
    # shard 1: a photo, probed with its header size, then scored
    assert (stats[1]["records_in"], stats[1]["records_out"], stats[1]["dropped"]) == (1, 1, {})
    # shard 2: an undecodable file, dropped by the probe with its reason; data-juicer sees nothing
    assert (stats[2]["records_in"], stats[2]["records_out"]) == (1, 0)
    assert stats[2]["dropped"] == {"not_an_image": 1}
    (dropped,) = iter_jsonl(files.dropped)
    assert dropped["image_id"] == "0002" and dropped["drop_stage"] == "score"
    assert dropped["drop_reason"] == "not_an_image" and dropped["detail"].startswith(
        "not_an_image:"
    )
    assert Path(files.scored).read_text() == ""


def test_score_params_hold_no_threshold_and_select_params_no_model_setting():
    section = validate_config({"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS})[
        "filter"
    ]
    leaves = {
        f"{key}.{sub}" if isinstance(value, dict) else key
        for key, value in section.items()
        for sub in (value if isinstance(value, dict) else [None])
    }
    groups = {
        "score": set(score.SCORE_KEYS),
        "tuning": set(score.SCORE_TUNING_KEYS)
        | {"gpus", "nsfw.mem_required", "watermark.mem_required", "aesthetics.mem_required"},
        "select": set(SELECT_KEYS),
        "other": {"template", "aesthetics_tiers"},
    }
    named = set().union(*groups.values())
    covered = {leaf for leaf in leaves if leaf in named or leaf.split(".")[0] in named}
    assert covered == leaves  # every key changes scores, selection, or nothing the job writes
    # only the aesthetics model is both: select needs its scale (data-juicer's 0-1 or 0-10)
    assert groups["score"] & groups["select"] == {"aesthetics.model"}
    assert not groups["score"] & groups["tuning"] and not groups["select"] & groups["tuning"]
    params = score.score_settings(section)
    assert "np" not in params and "max_score" not in params["nsfw"]
    assert params["nsfw"] == {"model": section["nsfw"]["model"]}
    thresholds = select_settings(section)
    assert thresholds["nsfw"] == {"max_score": 0.0006} and "precision" not in thresholds


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
    assert stats["dropped"] == {"no_score": 1, "below_first_tier": 0}
    assert json.loads(json.dumps(stats))["per_source"]["s"] == {
        "aes_6.jsonl": 1,
        "merged_output.jsonl": 2,
    }


def test_the_probe_refuses_truncated_images_after_data_juicer_is_imported(tmp_path):
    import data_juicer  # noqa: F401 (its import sets ImageFile.LOAD_TRUNCATED_IMAGES = True)
    from PIL import ImageFile

    assert ImageFile.LOAD_TRUNCATED_IMAGES
    folder = bad_files(tmp_path)
    assert probe_image(str(folder / "truncated.jpg"))[0].startswith("truncated:")
    assert ImageFile.LOAD_TRUNCATED_IMAGES  # data-juicer's own setting is back afterwards
