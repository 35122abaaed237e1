"""Emu3 export: prompt layout, token grid shapes, feature files as Emu3's dataset loads them,
resume without re-tokenizing, max_items over parts, prompts-only mode, -hf checkpoints."""

from __future__ import annotations

import json
import os.path as osp
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RANDOM_WEIGHTS
from groundset.cli import main
from groundset.core.config import validate_config
from groundset.core.io import iter_jsonl
from groundset.core.stats import read_stats
from groundset.exports.emu3 import (
    OUTPUT_KEYS,
    TUNING_KEYS,
    Emu3Error,
    Emu3ListFiles,
    Emu3PartFiles,
    Emu3Settings,
    export_emu3,
    export_part,
    format_prompt,
    gather_emu3,
    load_tokenizer,
    output_settings,
    resized_size,
)

VISUAL_TOKEN = "<|visual token {token_id:0>6d}|>"  # Emu3's DataArguments.visual_token_pattern
# A tiny Emu3VQVAE with 4x spatial downsampling (three resolution levels), random weights.
TINY = {
    "codebook_size": 256,
    "embed_dim": 4,
    "latent_channels": 4,
    "base_channels": 32,
    "channel_multiplier": [1, 1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "temporal_downsample_factor": 2,
    "hidden_size": 64,
}
SIZES = [(160, 120), (120, 160), (160, 120), (100, 100), (200, 100)]


def token_shape(width: int, height: int, area: int, factor: int) -> tuple[int, int]:
    """Reference: (rows, columns) of the token grid Emu3 makes of a width x height image."""
    w, h = resized_size(width, height, area, factor)
    return h // factor, w // factor


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A tiny random Emu3VQVAE saved with save_pretrained, as a user's tokenizer folder."""
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    model = Emu3VQVAE(Emu3VQVAEConfig(**TINY)).eval()
    path = tmp_path_factory.mktemp("emu3") / "tiny-vqvae"
    model.save_pretrained(path)
    return path


def make_input(tmp_path, sizes=SIZES, extra=()):
    """Masked records with real image files, plus `extra` records as given."""
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        records.append(
            {
                "image": str(path),
                "image_id": f"{i:09d}",
                "source": "src",
                "caption": f"caption {i}",
                "entities": [
                    {"entity": "dog", "bbox": [0.1, 0.2, 0.5, 0.6]},
                    {"entity": "red ball", "bbox": [0.5004, 0.0, 1.0, 0.9996]},
                ],
            }
        )
    records += list(extra)
    path = tmp_path / "masked.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def part_files(out, part: int) -> Emu3PartFiles:
    """Part `part`'s files as the workflow lays them out under `out` (export/emu3)."""
    return Emu3PartFiles(
        records=str(out / f"list/parts/part_{part}.jsonl"),
        errors=str(out / f"list/parts/error_{part}.jsonl"),
        stats=str(out / f"list/parts/stats_{part}.json"),
        features=str(out / f"feature/part_{part}"),
        journal=str(out / f"journal/part_{part}.jsonl"),
        store=str(out / f"journal/part_{part}"),
    )


def gather(out, parts: list[Emu3PartFiles], settings) -> dict:
    """The workflow's gather of `parts` under `out` (train.json's prefix: out/feature)."""
    lists = Emu3ListFiles(
        datalist=str(out / "list/datalist.jsonl"),
        train=str(out / "list/train.json"),
        errors=str(out / "list/error.jsonl"),
        prompts=str(out / "list/prompts.json"),
        stats=str(out / "emu3_stats.json"),
    )
    return gather_emu3(
        [p.records for p in parts], [p.errors for p in parts], [p.stats for p in parts],
        [p.features for p in parts], lists, out / "feature", settings,
    )  # fmt: skip


def emu3_dataset_items(train_json):
    """What Emu3's Emu3FeatureDataset does with train.json: (h, w, image prompt, texts) per item."""
    with open(train_json) as f:
        d = json.load(f)
    items = []
    for name in d["path_list"]:
        data = torch.load(osp.join(d["prefix"], name))  # torch's default: weights_only=True
        image_tokens = data["images"]
        h, w = image_tokens.shape
        rows = ["".join(VISUAL_TOKEN.format(token_id=t) for t in row) for row in image_tokens]
        items.append((h, w, "<eol>".join(rows), data["texts"], data))
    return items


def test_prompt_is_the_seeds_layout_on_a_0_1000_grid():
    masked = {
        "caption": "A dog.",
        "entities": [
            {"entity": "dog", "bbox": [0.1, 0.2, 0.5, 0.6]},
            {"entity": "ball", "bbox": [0.0004, 0.0, 1.0, 0.9996]},
        ],
    }
    assert format_prompt(masked) == (
        "A dog.\nPrecise location control:\n\n"
        "Entity: [dog]; box: [100, 200, 500, 600].\n\n"
        "Entity: [ball]; box: [0, 0, 1000, 1000].\n\n"
    )
    captioned = {
        "caption": "Two cats.",
        "entities": [{"entity": "cat", "bboxes": [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]}],
    }
    assert format_prompt(captioned, header=" | ", entity="{name}@{x1},{y1},{x2},{y2};") == (
        "Two cats. | cat@0,0,500,500;cat@500,500,1000,1000;"
    )
    with pytest.raises(Emu3Error, match=r"export\.emu3\.prompt: use only \{name\}"):
        Emu3Settings.from_config({"prompt": {"entity": "{label} {x1}"}})


def test_resize_keeps_the_aspect_at_the_emu3_area():
    w, h = resized_size(2048, 1367, 720 * 720, 8)
    assert (w % 8, h % 8) == (0, 0)
    assert abs(w * h - 720 * 720) / (720 * 720) < 0.02
    assert abs((w / h) / (2048 / 1367) - 1) < 0.01
    assert (h // 8, w // 8) == (74, 110)
    assert resized_size(1024, 1024, 720 * 720, 8) == (720, 720)


def test_features_load_as_emu3s_dataset_reads_them(tmp_path, tiny_tokenizer):
    from transformers import Emu3VQVAE

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    extra = [
        {
            "image": str(tmp_path / "gone.jpg"),
            "image_id": "missing",
            "source": "src",
            "caption": "c",
            "entities": [],
        },
        {"image": str(bad), "image_id": "broken", "source": "src", "caption": "c", "entities": []},
        {
            "image": str(tmp_path / "img0.jpg"),
            "image_id": "nocap",
            "source": "src",
            "caption": "",
            "entities": [],
        },
    ]
    input_path, records = make_input(tmp_path, extra=extra)
    area = 64 * 64
    settings = Emu3Settings.from_config(
        {"tokenizer": str(tiny_tokenizer), "image_area": area, "batch_size": 2, "device": "cpu"}
    )
    stats = export_emu3(input_path, tmp_path / "out", settings)
    assert stats["records_out"] == stats["tokenized"] == stats["train_items"] == len(SIZES)
    reasons = {"image_missing": 1, "image_unreadable": 1, "no_caption": 1}
    # the stats envelope: every record read is exported or dropped with its reason
    assert stats == read_stats(tmp_path / "out/emu3_stats.json")
    assert (stats["stage"], stats["records_out"], stats["dropped"]) == ("emu3", len(SIZES), reasons)
    assert stats["records_in"] == len(records) == len(SIZES) + 3
    part = read_stats(tmp_path / "out/list/parts/stats_0.json")
    assert (part["stage"], part["records_in"], part["dropped"]) == ("emu3", len(records), reasons)
    errors = list(iter_jsonl(tmp_path / "out/list/error.jsonl"))
    assert all(e["drop_stage"] == "emu3" and e["key"] == f"src/{e['image_id']}" for e in errors)
    assert {e["image_id"]: e["drop_reason"] for e in errors} == {
        "missing": "image_missing",
        "broken": "image_unreadable",
        "nocap": "no_caption",
    }

    items = emu3_dataset_items(tmp_path / "out/list/train.json")
    assert len(items) == len(SIZES)
    model = Emu3VQVAE.from_pretrained(tiny_tokenizer).eval()
    factor = model.vision_spatial_factor
    assert factor == 4
    for (h, w, image_prompt, texts, data), record, (width, height) in zip(
        items, records, SIZES, strict=False
    ):
        assert set(data) == {"name", "images", "texts"}
        assert data["images"].dtype == torch.int64
        assert (h, w) == token_shape(width, height, area, factor)
        assert (
            image_prompt.count("<eol>") == h - 1 and image_prompt.count("<|visual token") == h * w
        )
        assert int(data["images"].max()) < TINY["codebook_size"]
        assert texts == format_prompt(record)
        # the tokens are the model's own encoding of the resized image
        with Image.open(record["image"]) as img:
            resized = img.convert("RGB").resize(
                resized_size(width, height, area, factor), Image.Resampling.BICUBIC
            )
        x = torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            expected = model.encode(x, torch.tensor([[x.shape[2], x.shape[3]]]))[0]
        assert torch.equal(data["images"], expected)
    datalist = list(iter_jsonl(tmp_path / "out/list/datalist.jsonl"))
    assert [d["name"] for d in datalist] == [f"src/{i:09d}" for i in range(len(SIZES))]
    assert all(d["tokens"] == list(items[i][:2]) for i, d in enumerate(datalist))


class CountingFactory:
    """A tokenizer factory that counts model loads and encoded images, optionally failing."""

    def __init__(self, settings, fail_after: int | None = None):
        self.settings, self.fail_after = settings, fail_after
        self.loads = self.encoded = 0

    def __call__(self):
        self.loads += 1
        tokenizer = load_tokenizer(self.settings)
        encode = tokenizer.encode

        def counted(pixels):
            if self.fail_after is not None and self.encoded >= self.fail_after:
                raise RuntimeError("killed")
            self.encoded += len(pixels)
            return encode(pixels)

        tokenizer.encode = counted
        return tokenizer


def test_rerun_tokenizes_nothing_twice_and_follows_prompt_changes(tmp_path, tiny_tokenizer):
    input_path, _ = make_input(tmp_path)
    settings = Emu3Settings.from_config(
        {"tokenizer": str(tiny_tokenizer), "image_area": 64 * 64, "batch_size": 2, "device": "cpu"}
    )
    out = tmp_path / "out"
    crashing = CountingFactory(settings, fail_after=2)
    with pytest.raises(RuntimeError, match="killed"):
        export_emu3(input_path, out, settings, crashing)
    assert crashing.encoded == 2
    assert not (out / "list/parts/part_0.jsonl").exists()  # nothing half-written

    rerun = CountingFactory(settings)
    stats = export_emu3(input_path, out, settings, rerun)
    assert rerun.encoded == len(SIZES) - 2 and stats["reused"] == 2
    clean = tmp_path / "clean"
    export_emu3(input_path, clean, settings)
    for name in ("datalist.jsonl", "error.jsonl", "prompts.json"):  # same lists, same order
        assert (out / "list" / name).read_text() == (clean / "list" / name).read_text().replace(
            str(clean), str(out)
        )
    before = {d[4]["name"]: d[4]["images"] for d in emu3_dataset_items(out / "list/train.json")}

    again = CountingFactory(settings)
    stats = export_emu3(input_path, out, settings, again)
    assert again.loads == 0 and stats["reused"] == len(SIZES) and stats["tokenized"] == 0

    changed = replace(settings, header="\nLayout:\n")
    stats = export_emu3(input_path, out, changed, CountingFactory(changed))
    assert stats["texts_rewritten"] == len(SIZES) and stats["tokenized"] == 0
    items = emu3_dataset_items(out / "list/train.json")
    assert all("\nLayout:\n" in texts for *_, texts, _ in items)
    assert all(torch.equal(before[data["name"]], data["images"]) for *_, data in items)

    bigger = replace(settings, image_area=96 * 96)  # tokens depend on the area
    stats = export_emu3(input_path, out, bigger)
    assert stats["tokenized"] == len(SIZES)


def test_max_items_over_parts_and_prompts_only(tmp_path, tiny_tokenizer):
    sizes = [(64 + 8 * i, 64) for i in range(12)]
    input_path, records = make_input(tmp_path, sizes=sizes)
    settings = Emu3Settings.from_config(
        {
            "tokenizer": str(tiny_tokenizer),
            "image_area": 32 * 32,
            "device": "cpu",
            "parts": 3,
            "max_items": 5,
        }
    )
    out = tmp_path / "out"
    parts = [part_files(out, part) for part in range(3)]
    per_part = [export_part(input_path, parts[part], settings, part) for part in range(3)]
    assert all(p["records_out"] <= 2 for p in per_part)  # ceil(5 / 3): each part its share only
    stats = gather(out, parts, settings)
    # records past a part's share are dropped (beyond_max_items), each with its drop line
    beyond = sum(p["dropped"].get("beyond_max_items", 0) for p in per_part)
    assert beyond == len(sizes) - stats["records_out"] > 0
    assert stats["records_in"] == len(sizes) and stats["dropped"] == {"beyond_max_items": beyond}
    assert stats == read_stats(out / "emu3_stats.json")
    errors = list(iter_jsonl(out / "list/error.jsonl"))
    assert Counter(e["drop_reason"] for e in errors) == {"beyond_max_items": beyond}
    train = json.loads((out / "list/train.json").read_text())
    assert stats["train_items"] == len(train["path_list"]) == 5
    assert len(set(train["path_list"])) == 5
    assert train["prefix"] == str((out / "feature").resolve())
    assert all(p.startswith("part_") for p in train["path_list"])  # feature/part_<k>/src/<id>.pth
    assert all((out / "feature" / p).exists() for p in train["path_list"])
    datalist = list(iter_jsonl(out / "list/datalist.jsonl"))
    assert [d["path"] for d in datalist][:5] == train["path_list"]  # the same relative paths

    plain = tmp_path / "plain"
    assert main(["export-emu3", "--config", "config/sample.yaml", "--input", str(input_path),
                 "--outdir", str(plain), "--no-tokenize"]) == 0  # fmt: skip
    assert not (plain / "feature").exists()
    prompts = json.loads((plain / "list/prompts.json").read_text())
    assert [p["name"] for p in prompts] == [f"src/{i:09d}" for i in range(len(sizes))]
    assert prompts[0] == {
        "name": "src/000000000",
        "image": records[0]["image"],
        "text": format_prompt(records[0]),
    }
    assert json.loads((plain / "list/train.json").read_text()) == {
        "prefix": str((plain / "feature").resolve()),
        "path_list": [f"src/{i:09d}.pth" for i in range(len(sizes))],
    }  # the seed's keys only; no features written is said in emu3_stats.json
    assert json.loads((plain / "emu3_stats.json").read_text())["tokenize"] is False


def test_seed_records_without_source_get_the_seeds_feature_paths(tmp_path, tiny_tokenizer):
    input_path, records = make_input(tmp_path, sizes=SIZES[:3])
    seed = []
    for record in records:  # the seed's own masked lines: no source
        record = {k: v for k, v in record.items() if k != "source"}
        seed.append(record)
    input_path.write_text("".join(json.dumps(r) + "\n" for r in seed))
    settings = Emu3Settings.from_config(
        {"tokenizer": str(tiny_tokenizer), "image_area": 32 * 32, "device": "cpu"}
    )
    out = tmp_path / "out"
    stats = export_emu3(input_path, out, settings)
    assert stats["records_out"] == stats["tokenized"] == 3
    ids = [r["image_id"] for r in seed]
    train = json.loads((out / "list/train.json").read_text())
    assert set(train) == {"prefix", "path_list"}  # exactly the seed's keys
    assert train["prefix"] == str((out / "feature").resolve())
    assert train["path_list"] == [f"{i}.pth" for i in ids]
    assert sorted(p.name for p in (out / "feature").iterdir()) == sorted(f"{i}.pth" for i in ids)
    assert not (out / "feature" / "_").exists()
    items = emu3_dataset_items(out / "list/train.json")
    assert [data["name"] for *_, data in items] == ids
    assert [texts for *_, texts, _ in items] == [format_prompt(r) for r in seed]
    datalist = list(iter_jsonl(out / "list/datalist.jsonl"))
    assert [(d["name"], d["path"], d["source"]) for d in datalist] == [
        (i, f"{i}.pth", None) for i in ids
    ]
    again = CountingFactory(settings)  # the journal knows them under the same names
    assert export_emu3(input_path, out, settings, again)["reused"] == 3 and again.loads == 0


def test_a_full_emu3_hf_checkpoint_loads_only_its_vq_model(tmp_path):
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3TextConfig,
        Emu3VQVAEConfig,
    )

    text = Emu3TextConfig(vocab_size=400, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    vocab = {VISUAL_TOKEN.format(token_id=i): 100 + i for i in range(TINY["codebook_size"])}
    config = Emu3Config(
        vq_config=Emu3VQVAEConfig(**TINY).to_dict(),
        text_config=text.to_dict(),
        vocabulary_map=vocab,
    )
    torch.manual_seed(1)
    model = Emu3ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "emu3-hf", max_shard_size="1MB")  # sharded, with an index
    assert (tmp_path / "emu3-hf/model.safetensors.index.json").exists()

    tokenizer = load_tokenizer(
        Emu3Settings.from_config({"tokenizer": str(tmp_path / "emu3-hf"), "device": "cpu"})
    )
    assert tokenizer.factor == 4 and not tokenizer.stand_in
    pixels = np.random.default_rng(0).integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = torch.stack(model.model.vqmodel.encode(x, torch.tensor([[32, 48]] * 2)))
    assert np.array_equal(tokenizer.encode(pixels), expected.numpy())

    (tmp_path / "other").mkdir()
    (tmp_path / "other/config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(Emu3Error, match="not an Emu3 vision tokenizer"):
        load_tokenizer(
            Emu3Settings.from_config({"tokenizer": str(tmp_path / "other"), "device": "cpu"})
        )


def test_a_rerun_that_finds_its_feature_folder_emptied_links_the_journaled_features(
    tmp_path, tiny_tokenizer
):
    """The workflow's layout: Snakemake empties a part's declared feature folder before it reruns
    the job; the features saved in the store beside the journal are linked, not tokenized, again."""
    import shutil

    input_path, _ = make_input(tmp_path)
    settings = Emu3Settings.from_config(
        {"tokenizer": str(tiny_tokenizer), "image_area": 32 * 32, "device": "cpu"}
    )
    out = tmp_path / "emu3"
    part = part_files(out, 0)
    export_part(input_path, part, settings, 0)
    gather(out, [part], settings)
    train = json.loads((out / "list/train.json").read_text())
    assert train["path_list"] == [f"part_0/src/{i:09d}.pth" for i in range(len(SIZES))]
    for name in train["path_list"]:  # the listed file is a hard link of the saved one
        saved = out / "journal" / name
        assert (out / "feature" / name).samefile(saved)
    before = {d[4]["name"]: d[4]["images"] for d in emu3_dataset_items(out / "list/train.json")}
    shutil.rmtree(part.features)  # what Snakemake does before it reruns emu3_part
    (out / "journal/part_0/src/000000001.pth").unlink()  # a saved feature lost: tokenized again
    again = CountingFactory(settings)
    stats = export_part(input_path, part, settings, 0, again)
    assert again.encoded == 1 and stats["reused"] == len(SIZES) - 1
    assert stats["feature_copies"] == 0
    gather(out, [part], settings)
    items = emu3_dataset_items(out / "list/train.json")
    assert len(items) == len(SIZES)
    assert all(torch.equal(before[data["name"]], data["images"]) for *_, data in items)


def test_the_params_are_the_output_keys_and_the_rest_are_knobs():
    config = validate_config({"sources": [{"name": "s", "url_list": "x"}], **RANDOM_WEIGHTS})
    section = config["export"]["emu3"]
    assert set(OUTPUT_KEYS) | set(TUNING_KEYS) == set(section)  # every key is one or the other
    assert not set(OUTPUT_KEYS) & set(TUNING_KEYS)
    assert list(output_settings(section)) == list(OUTPUT_KEYS)
