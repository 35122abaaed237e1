"""Emu3 export: location-control prompts, visual tokens and the lists Emu3's training code reads.

Under the export folder (`export/emu3` in the workflow):
  feature/<source>/<image_id>.pth  {"name", "images" (int64 token grid h×w), "texts"}: what
                                   Emu3's `Emu3FeatureDataset` loads with `torch.load`
                                   (`feature/<image_id>.pth` for a record without a source)
  list/datalist.jsonl              one line per exported image (name, path, image, texts, tokens)
  list/train.json                  {"prefix": <absolute feature folder>, "path_list": [...]}:
                                   the seed's two keys, nothing else
  list/error.jsonl                 records not exported, each with its reason
  list/prompts.json                [{"name", "image", "text"}]: the input of Emu3's prepare_data.py
The records are split into `parts` by a hash of their key (`records.record_key`), one job
(one GPU) per part. Every saved feature is journaled, so a rerun tokenizes nothing twice and a
changed prompt template rewrites only the texts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .io import atomic_write, dumps_record, iter_jsonl, read_json, write_json
from .journal import Journal
from .mask import resolve_device
from .records import RecordError, feature_relpath, image_path, record_boxes, record_key

log = logging.getLogger(__name__)

# The seed's layout: caption, this header, then one entity line per box on a 0-1000 grid.
DEFAULT_HEADER = "\nPrecise location control:\n\n"
DEFAULT_ENTITY = "Entity: [{name}]; box: [{x1}, {y1}, {x2}, {y2}].\n\n"
# The stand-in tokenizer (`tokenizer: null`): a tiny random Emu3VQVAE, 2× spatial downsampling.
STAND_IN_VQ = {
    "codebook_size": 512,
    "embed_dim": 4,
    "latent_channels": 4,
    "base_channels": 32,
    "channel_multiplier": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "temporal_downsample_factor": 2,
    "hidden_size": 64,
}


class Emu3Error(RuntimeError):
    """A configuration or model problem that stops the export."""


@dataclass(frozen=True)
class Emu3Settings:
    """The `export.emu3` section of the config."""

    tokenizer: str | None = None
    image_area: int = 720 * 720
    max_items: int | None = None
    header: str = DEFAULT_HEADER
    entity: str = DEFAULT_ENTITY
    tokenize: bool = True
    batch_size: int = 8
    device: str = "auto"
    decode_workers: int = 2
    parts: int = 1

    @classmethod
    def from_config(cls, section: dict) -> Emu3Settings:
        """Settings from `export.emu3` (the prompt template nests under `prompt`)."""
        prompt = section.get("prompt") or {}
        known = {f.name for f in fields(cls)} - {"header", "entity"}
        settings = cls(
            **{k: v for k, v in section.items() if k in known},
            header=prompt.get("header", DEFAULT_HEADER),
            entity=prompt.get("entity", DEFAULT_ENTITY),
        )
        try:
            settings.entity.format(name="x", x1=0, y1=0, x2=1, y2=1)
        except (KeyError, IndexError, ValueError) as err:
            raise Emu3Error(
                f"export.emu3.prompt.entity {settings.entity!r} is not a valid template: "
                f"use only {{name}}, {{x1}}, {{y1}}, {{x2}}, {{y2}} ({err})"
            ) from err
        return settings

    @property
    def quota(self) -> int | None:
        """Images each part exports at most (max_items spread over the parts)."""
        return None if self.max_items is None else math.ceil(self.max_items / self.parts)

    def digest(self) -> str:
        """What the visual tokens depend on: the tokenizer and the image area."""
        source = "stand-in-v1" if self.tokenizer is None else os.path.abspath(self.tokenizer)
        return hashlib.sha1(f"{source}|{self.image_area}".encode()).hexdigest()[:16]


def part_of(key: str, parts: int) -> int:
    """The part a record belongs to (a stable hash of its key)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % parts


def grid(value: float) -> int:
    """A normalized coordinate on the 0-1000 integer grid."""
    return min(1000, max(0, round(float(value) * 1000)))


def format_prompt(record: dict, header: str = DEFAULT_HEADER, entity: str = DEFAULT_ENTITY) -> str:
    """The caption, the header, then one entity line per box (coordinates on a 0-1000 grid)."""
    lines = [
        entity.format(name=name, x1=grid(x1), y1=grid(y1), x2=grid(x2), y2=grid(y2))
        for name, (x1, y1, x2, y2) in record_boxes(record)
    ]
    return str(record.get("caption") or "") + header + "".join(lines)


def resized_size(width: int, height: int, area: int, factor: int) -> tuple[int, int]:
    """(width, height) scaled to `area` with the aspect kept (Emu3's smart_resize), in multiples of `factor`."""
    ratio = math.sqrt(area / (width * height))
    target_w, target_h = round(width * ratio), round(height * ratio)
    return (
        max(factor, round(target_w / factor) * factor),
        max(factor, round(target_h / factor) * factor),
    )


def token_shape(width: int, height: int, area: int, factor: int) -> tuple[int, int]:
    """(rows, columns) of the token grid of a width×height image."""
    w, h = resized_size(width, height, area, factor)
    return h // factor, w // factor


def _image_or_none(record: dict) -> str | None:
    """The record's image path, or None when it names none (for error lines)."""
    try:
        return image_path(record)
    except RecordError:
        return None


def load_pixels(path: str, area: int, factor: int) -> np.ndarray:
    """The image as RGB uint8 (h, w, 3), resized to the Emu3 area in multiples of `factor`."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    return np.asarray(rgb.resize(resized_size(*rgb.size, area, factor), Image.Resampling.BICUBIC))


class VisionTokenizer:
    """An Emu3 vision tokenizer on one device: uint8 RGB batches in, token grids out."""

    def __init__(self, encode: Callable, factor: int, device, stand_in: bool = False):
        self._encode = encode
        self.factor = factor
        self.device = device
        self.stand_in = stand_in

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Token ids (b, h/factor, w/factor) of a batch of same-size images (b, h, w, 3)."""
        import torch

        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float()
        x = x.div_(127.5).sub_(1.0)  # Emu3's processor: rescale 1/255, normalize mean 0.5, std 0.5
        with torch.inference_mode():
            tokens = self._encode(x)
        return tokens.to(torch.int64).cpu().numpy()


def _hf_encode(model) -> Callable:
    """`encode` of transformers' Emu3VQVAE on a batch of one size."""
    import torch

    def encode(x):
        sizes = torch.tensor([list(x.shape[-2:])] * x.shape[0])
        return torch.stack(model.encode(x, sizes))

    return encode


def stand_in_vqvae(seed: int = 0):
    """A tiny randomly initialised Emu3VQVAE (tests and the offline sample only)."""
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(seed)
    return Emu3VQVAE(Emu3VQVAEConfig(**STAND_IN_VQ)).eval()


def _vqvae_from_full_checkpoint(path: Path, config: dict):
    """The Emu3VQVAE inside a full Emu3 `-hf` checkpoint, without loading the language model."""
    from safetensors import safe_open
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    model = Emu3VQVAE(Emu3VQVAEConfig(**config["vq_config"])).eval()
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)["weight_map"]
        files = sorted({f for key, f in weight_map.items() if "vqmodel." in key})
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                if "vqmodel." in key:
                    state[key.split("vqmodel.", 1)[1]] = handle.get_tensor(key)
    if not state:
        raise Emu3Error(f"{path}: no vqmodel.* weights in the Emu3 checkpoint")
    model.load_state_dict(state, strict=True)
    return model


def load_tokenizer(settings: Emu3Settings) -> VisionTokenizer:
    """The vision tokenizer of `export.emu3.tokenizer` (null: a tiny random stand-in, loudly)."""
    device = resolve_device(settings.device)
    if settings.tokenizer is None:
        log.warning(
            "emu3: NO TOKENIZER (export.emu3.tokenizer: null): visual tokens come from a tiny "
            "RANDOM Emu3VQVAE and mean nothing (tests only). Set export.emu3.tokenizer to "
            "BAAI/Emu3-VisionTokenizer or an Emu3 -hf checkpoint"
        )
        model = stand_in_vqvae()
        return VisionTokenizer(
            _hf_encode(model.to(device)), model.vision_spatial_factor, device, True
        )
    path = Path(settings.tokenizer)
    if not (path / "config.json").is_file():
        raise Emu3Error(f"export.emu3.tokenizer {path}: no config.json (a model folder is needed)")
    config = read_json(path / "config.json")
    kind = config.get("model_type")
    if kind == "emu3_vqgan":  # transformers' Emu3VQVAE saved on its own
        from transformers import Emu3VQVAE

        model = Emu3VQVAE.from_pretrained(path).eval()
    elif kind == "emu3":  # a full Emu3 -hf checkpoint: only its VQ model is loaded
        model = _vqvae_from_full_checkpoint(path, config)
    elif "auto_map" in config:  # BAAI/Emu3-VisionTokenizer, the original remote code
        from transformers import AutoModel

        model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        factor = 2 ** (len(config["ch_mult"]) - 1)
        return VisionTokenizer(model.to(device).encode, factor, device)
    else:
        raise Emu3Error(f"{path}: model_type {kind!r} is not an Emu3 vision tokenizer")
    model = model.to(device)
    return VisionTokenizer(_hf_encode(model), model.vision_spatial_factor, device)


def save_feature(path: Path, name: str, tokens: np.ndarray, texts: str) -> None:
    """Write one feature file atomically, as Emu3's dataset loads it (weights_only-safe)."""
    import torch

    feature = {
        "name": name,
        "images": torch.from_numpy(np.ascontiguousarray(tokens)),
        "texts": texts,
    }
    with atomic_write(path, "wb") as handle:
        torch.save(feature, handle)


def load_feature(path: str | os.PathLike) -> dict:
    """A feature file, loaded the way Emu3's dataset does (`torch.load`, weights only)."""
    import torch

    return torch.load(path, weights_only=True)


def part_paths(outdir: str | os.PathLike, part: int) -> dict[str, Path]:
    """The files of one part: its list, errors, stats and journal."""
    parts = Path(outdir) / "list" / "parts"
    return {
        "records": parts / f"part_{part}.jsonl",
        "errors": parts / f"error_{part}.jsonl",
        "stats": parts / f"stats_{part}.json",
        "journal": parts / f"journal_{part}.jsonl",
    }


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


@dataclass
class _Item:
    """One input record on its way to the lists: its prompt, tokens' shape or why it failed."""

    key: str
    record: dict
    prompt: str = ""
    feature: str = ""
    pixels: np.ndarray | None = None
    shape: tuple[int, int] | None = None
    problem: tuple[str, str] | None = None


class _PartWriter:
    """The list and error lines of one part, and its counts."""

    def __init__(self, records, errors, outdir: Path, tokenize: bool):
        self.records, self.errors = records, errors
        self.feature_dir = outdir / "feature"
        self.tokenize = tokenize
        self.counts: Counter = Counter()
        self.reasons: Counter = Counter()

    def item(self, item: _Item, tokens: tuple[int, int] | None) -> None:
        """One exported image's list line."""
        line = {
            "name": item.key,
            "image": image_path(item.record),
            "image_id": item.record.get("image_id"),
            "source": item.record.get("source"),
            "path": item.feature,
        }
        if self.tokenize:
            line.update(texts=item.prompt, tokens=list(tokens))
        else:
            line["text"] = item.prompt
        self.records.write(dumps_record(line) + "\n")
        self.counts["exported"] += 1

    def error(self, record: dict, reason: str, detail: str = "") -> None:
        """One record not exported, with its reason."""
        entry = {"image_id": record.get("image_id"), "source": record.get("source")}
        entry.update(image=_image_or_none(record), reason=reason, detail=detail)
        self.errors.write(dumps_record(entry) + "\n")
        self.reasons[reason] += 1


def _records_of_part(path: str | os.PathLike, part: int, parts: int) -> Iterator[dict]:
    """The input records that belong to `part`."""
    for record in iter_jsonl(path):
        if parts == 1:
            yield record
            continue
        try:
            key = record_key(record)
        except RecordError:  # neither id nor image: part 0 reports it (image_missing)
            key = None
        if (0 if key is None else part_of(key, parts)) == part:
            yield record


def _check(record: dict) -> str | None:
    """Why a record cannot be exported, if it cannot."""
    if not str(record.get("caption") or "").strip():
        return "no_caption"
    path = _image_or_none(record)
    if not path or not os.path.exists(path):
        return "image_missing"
    try:
        feature_relpath(record)
    except RecordError:
        return "bad_name"  # an id or source that cannot name a feature file
    return None


def export_part(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    settings: Emu3Settings,
    part: int = 0,
    tokenizer_factory: Callable[[], VisionTokenizer] | None = None,
) -> dict:
    """Export the records of one part: features (unless no-tokenize), list lines, errors, stats."""
    outdir = Path(outdir)
    paths = part_paths(outdir, part)
    factory = tokenizer_factory or (lambda: load_tokenizer(settings))
    digest = settings.digest()
    tokenizer: VisionTokenizer | None = None
    window = max(1, settings.batch_size) * 4
    quota = settings.quota
    journal = Journal(paths["journal"]) if settings.tokenize else None
    stack = contextlib.ExitStack()
    with stack:
        if journal is not None:
            stack.enter_context(journal)
        writer = _PartWriter(
            stack.enter_context(atomic_write(paths["records"])),
            stack.enter_context(atomic_write(paths["errors"])),
            outdir,
            settings.tokenize,
        )
        pool = stack.enter_context(ThreadPoolExecutor(max(1, settings.decode_workers)))
        pending: list[_Item] = []

        def flush() -> None:
            nonlocal tokenizer
            needs = [i for i in pending if settings.tokenize and not i.problem and not i.shape]
            if needs and tokenizer is None:
                tokenizer = factory()

            def decode(item: _Item) -> None:
                try:
                    path = image_path(item.record)
                    item.pixels = load_pixels(path, settings.image_area, tokenizer.factor)
                except (OSError, ValueError, Image.DecompressionBombError) as err:
                    item.problem = ("image_unreadable", f"{type(err).__name__}: {err}")

            list(pool.map(decode, needs))
            groups: dict[tuple, list[_Item]] = {}
            for item in needs:
                if item.pixels is not None:
                    groups.setdefault(item.pixels.shape, []).append(item)
            for items in groups.values():  # same-size images share a batch
                for start in range(0, len(items), settings.batch_size):
                    batch = items[start : start + settings.batch_size]
                    tokens = tokenizer.encode(np.stack([item.pixels for item in batch]))
                    entries = []
                    for item, grid_tokens in zip(batch, tokens, strict=True):
                        feature = writer.feature_dir / item.feature
                        save_feature(feature, item.key, grid_tokens, item.prompt)
                        item.shape, item.pixels = tuple(grid_tokens.shape), None
                        entries.append(
                            {
                                "key": item.key,
                                "digest": digest,
                                "shape": list(item.shape),
                                "texts_sha1": _sha1(item.prompt),
                            }
                        )
                    journal.append(entries)
                    writer.counts["tokenized"] += len(batch)
            for item in pending:  # the lists keep the input order
                if item.problem:
                    writer.error(item.record, *item.problem)
                else:
                    writer.item(item, item.shape)
            pending.clear()

        def prepare(record: dict) -> _Item:
            problem = _check(record)
            if problem:
                return _Item(str(record.get("image_id")), record, problem=(problem, ""))
            prompt = format_prompt(record, settings.header, settings.entity)
            item = _Item(record_key(record), record, prompt, feature_relpath(record))
            if not settings.tokenize:
                return item
            done = journal.done(item.key)
            feature = writer.feature_dir / item.feature
            if done and done.get("digest") == digest and feature.exists():
                if done.get("texts_sha1") != _sha1(prompt):  # the prompt changed: texts only
                    tokens = load_feature(feature)["images"].numpy()
                    save_feature(feature, item.key, tokens, prompt)
                    journal.append([{**done, "texts_sha1": _sha1(prompt)}])
                    writer.counts["texts_rewritten"] += 1
                item.shape = tuple(done["shape"])
                writer.counts["reused"] += 1
            return item

        records = _records_of_part(input_path, part, settings.parts)
        for record in tqdm(records, desc=f"emu3 part {part}", unit="rec", mininterval=5):
            if quota is not None:
                tentative = writer.counts["exported"] + sum(not i.problem for i in pending)
                if tentative >= quota:
                    flush()
                    if writer.counts["exported"] >= quota:
                        writer.counts["beyond_max_items"] += 1 + sum(1 for _ in records)
                        break
            writer.counts["records"] += 1
            pending.append(prepare(record))
            if len(pending) >= window:
                flush()
        flush()
    stats = {
        "part": part,
        **{
            k: writer.counts[k]
            for k in ("records", "exported", "tokenized", "reused", "texts_rewritten")
        },
        "beyond_max_items": writer.counts["beyond_max_items"],
        "errors": sum(writer.reasons.values()),
        "error_reasons": dict(writer.reasons),
        "tokenize": settings.tokenize,
        "stand_in_tokenizer": settings.tokenize and settings.tokenizer is None,
        "image_area": settings.image_area,
        "factor": tokenizer.factor if tokenizer is not None else None,
    }
    write_json(paths["stats"], stats)
    log.info("emu3 part %d: %s", part, stats)
    return stats


def gather_emu3(outdir: str | os.PathLike, settings: Emu3Settings) -> dict:
    """The lists of all parts: datalist.jsonl, train.json (max_items), error.jsonl, stats."""
    outdir = Path(outdir)
    lists = outdir / "list"
    prefix = str((outdir / "feature").resolve())
    counts: Counter = Counter()
    reasons: Counter = Counter()
    stand_in = False
    with (
        atomic_write(lists / "datalist.jsonl") as datalist,
        atomic_write(lists / "train.json") as train,
        atomic_write(lists / "error.jsonl") as errors,
        atomic_write(lists / "prompts.json") as prompts,
    ):
        train.write('{"prefix": ' + json.dumps(prefix) + ', "path_list": [')
        prompts.write("[")
        listed = 0
        for part in range(settings.parts):
            paths = part_paths(outdir, part)
            part_stats = read_json(paths["stats"])
            stand_in |= bool(part_stats.get("stand_in_tokenizer"))
            for key in (
                "records",
                "exported",
                "tokenized",
                "reused",
                "texts_rewritten",
                "beyond_max_items",
            ):
                counts[key] += part_stats.get(key, 0)
            reasons.update(part_stats["error_reasons"])
            for line in iter_jsonl(paths["records"]):
                datalist.write(dumps_record(line) + "\n")
                if settings.max_items is not None and listed >= settings.max_items:
                    counts["not_listed_max_items"] += 1
                    continue
                sep = ", " if listed else ""
                path = line.get("path") or f"{line['name']}.pth"  # parts of older versions
                train.write(sep + json.dumps(path))
                entry = {
                    "name": line["name"],
                    "image": line["image"],
                    "text": line.get("texts", line.get("text")),
                }
                prompts.write(sep + json.dumps(entry, ensure_ascii=False))
                listed += 1
            with open(paths["errors"], encoding="utf-8") as handle:
                for line in handle:
                    errors.write(line)
        train.write("]}\n")  # the seed's keys only (whether features exist: emu3_stats.json)
        prompts.write("]\n")
    stats = {
        **{k: counts[k] for k in ("records", "exported", "tokenized", "reused", "texts_rewritten")},
        "train_items": listed,
        "not_listed_max_items": counts["not_listed_max_items"],
        "beyond_max_items": counts["beyond_max_items"],
        "errors": sum(reasons.values()),
        "error_reasons": dict(reasons),
        "tokenize": settings.tokenize,
        "stand_in_tokenizer": stand_in,
        "image_area": settings.image_area,
        "feature_dir": prefix,
    }
    write_json(outdir / "emu3_stats.json", stats)
    log.info("emu3 export: %s", stats)
    return stats


def export_emu3(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    settings: Emu3Settings,
    tokenizer_factory: Callable[[], VisionTokenizer] | None = None,
) -> dict:
    """The whole export in one process (`groundset export-emu3`): one part, then the lists."""
    settings = replace(settings, parts=1)
    export_part(input_path, outdir, settings, 0, tokenizer_factory)
    return gather_emu3(outdir, settings)
