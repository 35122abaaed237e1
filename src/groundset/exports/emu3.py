"""Emu3 export: location-control prompts, visual tokens and the lists Emu3's training code reads.

Under the export folder (`groundset export-emu3 --outdir DIR`; `export/emu3` in the workflow):
  feature/<source>/<image_id>.pth  {"name", "images" (int64 token grid h×w), "texts"}: what
                                   Emu3's `Emu3FeatureDataset` loads with `torch.load`
                                   (`feature/<image_id>.pth` for a record without a source;
                                   `feature/part_<k>/…` in the workflow, one folder per part)
  list/datalist.jsonl              one line per exported image (name, path, image, texts, tokens)
  list/train.json                  {"prefix": <absolute feature folder>, "path_list": [...]}:
                                   the seed's two keys, nothing else; paths relative to prefix
  list/error.jsonl                 records not exported: drop lines (`core.stats.drop_line`)
  list/prompts.json                [{"name", "image", "text"}]: the input of Emu3's prepare_data.py
`emu3_stats.json` (and each part's `list/parts/stats_<k>.json`) is the stats envelope: records
read in, exported out, `dropped` by reason (`no_caption`, `image_missing`, `image_unreadable`,
`bad_name`, and `beyond_max_items` for records past a part's share of `max_items`, each also a
drop line).

The records are split into `parts` by a hash of their key (`records.record_key`), one job
(one GPU) per part, whose files are one `Emu3PartFiles`. Every saved feature is journaled, so a
rerun tokenizes nothing twice and a changed prompt template rewrites only the texts. A part's
feature folder is a declared output in the workflow, which Snakemake empties before it reruns
the job: features are saved into the part's store beside its journal (resume state, never an
output) and hard-linked into the folder (as `groundset.stages.mask` does with masks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from groundset.core import prompts
from groundset.core.config import TUNING, fill_section, keys_for, pick_keys, section_defaults
from groundset.core.io import atomic_write, dumps_record, iter_jsonl, read_json
from groundset.core.journal import Journal
from groundset.core.layout import EMU3, EMU3_PART
from groundset.core.prompts import grid as grid
from groundset.core.prompts import parse_prompt
from groundset.core.records import (
    RecordError,
    feature_relpath,
    image_path,
    provenance,
    record_key,
    same_image,
)
from groundset.core.stats import add_counts, drop_line, envelope, read_stats, write_stats
from groundset.stages.mask import publish, resolve_device

log = logging.getLogger(__name__)

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


# `export.emu3:` keys the export's outputs depend on: the part and gather jobs' params.
OUTPUT_KEYS = keys_for("export.emu3", "emu3")
# Tuning knobs: how fast and where a job runs, never what its outputs hold. The jobs read them
# from the config at run time, so changing one marks nothing stale.
TUNING_KEYS = keys_for("export.emu3", "emu3", TUNING)


def output_settings(section: dict) -> dict:
    """The keys of an `export.emu3:` config section that change the export's outputs (params)."""
    return pick_keys(section, OUTPUT_KEYS)


@dataclass(frozen=True)
class Emu3PartFiles:
    """What one part's export job writes (the rule's outputs and params have these names)."""

    records: str  # the part's list lines (name, path under `features`, image, texts, tokens)
    errors: str  # records not exported, with their reasons
    stats: str  # the part's counts
    features: str  # the folder of its features: <features>/<source>/<image_id>.pth
    journal: str  # resume state: every saved feature
    # resume state: where features are saved, then hard-linked into `features` (which Snakemake
    # empties before a rerun); None saves them in `features` itself (`groundset export-emu3`)
    store: str | None = None


@dataclass(frozen=True)
class Emu3ListFiles:
    """What the Emu3 gather writes (the rule's outputs have these names)."""

    datalist: str  # one line per exported image
    train: str  # {"prefix", "path_list"}, as Emu3's training code reads it
    errors: str  # every part's errors
    prompts: str  # [{"name", "image", "text"}] for Emu3's prepare_data.py
    stats: str  # the totals


@dataclass(frozen=True)
class Emu3Settings:
    """The `export.emu3` section of the config (the prompt template flattened to header, entity).

    Built by from_config only: the schema (workflow/schemas/config.schema.yaml) holds every
    default and allowed value, so no field repeats one."""

    tokenizer: str | None
    image_area: int
    max_items: int | None
    header: str
    entity: str
    tokenize: bool
    batch_size: int
    device: str
    decode_workers: int
    parts: int

    @classmethod
    def from_config(cls, section: dict) -> Emu3Settings:
        """Settings from a (partial) `export.emu3` config dict, checked and filled from the schema
        (ConfigError naming the key; the prompt template nests under `prompt`); keys without a
        field (gpus, random_weights) are the workflow's."""
        values = fill_section("export.emu3", section)
        known = {f.name for f in fields(cls)} - {"header", "entity"}
        settings = cls(
            **{k: v for k, v in values.items() if k in known},
            header=values["prompt"]["header"],
            entity=values["prompt"]["entity"],
        )
        problem = prompts.template_problem(settings.header, settings.entity)
        if problem:  # what the schema cannot express (validate_config checks it before any job)
            raise Emu3Error(f"export.emu3.prompt: {problem}")
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


def format_prompt(record: dict, header: str | None = None, entity: str | None = None) -> str:
    """A record's Emu3 prompt (`prompts.format_prompt`); header and entity default to the
    schema's `export.emu3.prompt` (the seed's layout)."""
    return prompts.format_prompt(record, *template(header, entity))


def template(header: str | None = None, entity: str | None = None) -> tuple[str, str]:
    """Header and entity line, the schema's `export.emu3.prompt` where not given (the seed's)."""
    prompt = section_defaults("export.emu3")["prompt"]
    return (
        prompt["header"] if header is None else header,
        prompt["entity"] if entity is None else entity,
    )


def resized_size(width: int, height: int, area: int, factor: int) -> tuple[int, int]:
    """(width, height) scaled to `area` with the aspect kept (Emu3's smart_resize), in multiples of `factor`."""
    ratio = math.sqrt(area / (width * height))
    target_w, target_h = round(width * ratio), round(height * ratio)
    return (
        max(factor, round(target_w / factor) * factor),
        max(factor, round(target_h / factor) * factor),
    )


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
    """The list and error lines of one part, its published features, and its counts."""

    def __init__(self, records, errors, saved_dir: Path, features_dir: Path, tokenize: bool):
        self.records, self.errors = records, errors
        self.saved_dir, self.features_dir = saved_dir, features_dir
        self.tokenize = tokenize
        self.counts: Counter = Counter()
        self.reasons: Counter = Counter()

    def item(self, item: _Item, tokens: tuple[int, int] | None) -> None:
        """One exported image's list line (and its feature, where the list names it)."""
        if self.tokenize:
            saved = self.saved_dir / item.feature
            self.counts["feature_copies"] += publish(saved, self.features_dir / item.feature)
        line = {
            "name": item.key,
            "image": image_path(item.record),
            "image_id": item.record.get("image_id"),
            "source": item.record.get("source"),
            "path": item.feature,
            **provenance(item.record),
        }
        if self.tokenize:
            line.update(texts=item.prompt, tokens=list(tokens))
        else:
            line["text"] = item.prompt
        self.records.write(dumps_record(line) + "\n")
        self.counts["exported"] += 1

    def error(self, record: dict, reason: str, detail: str = "") -> None:
        """One record not exported: its drop line."""
        line = drop_line(record, EMU3_PART.name, reason, detail or None)
        self.errors.write(dumps_record(line) + "\n")
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


class _PartRun:
    """One part's export under way: records in windows, decoded and tokenized in batches, lines
    written in input order."""

    def __init__(self, files: Emu3PartFiles, settings: Emu3Settings, factory, stack) -> None:
        """A run writing into `files` (opened on `stack`), its tokenizer made by `factory` when
        first needed."""
        self.settings, self.factory = settings, factory
        self.features_dir = Path(files.features).resolve()
        self.saved_dir = Path(files.store).resolve() if files.store else self.features_dir
        self.digest = settings.digest()
        self.tokenizer: VisionTokenizer | None = None
        self.journal = Journal(files.journal) if settings.tokenize else None
        if self.journal is not None:
            stack.enter_context(self.journal)
        self.writer = _PartWriter(
            stack.enter_context(atomic_write(files.records)),
            stack.enter_context(atomic_write(files.errors)),
            self.saved_dir,
            self.features_dir,
            settings.tokenize,
        )
        self.pool = stack.enter_context(ThreadPoolExecutor(max(1, settings.decode_workers)))
        self.pending: list[_Item] = []

    @property
    def counts(self) -> Counter:
        """The part's counts so far."""
        return self.writer.counts

    def add(self, record: dict) -> None:
        """One record into the window (flushed when full)."""
        self.counts["records"] += 1
        self.pending.append(self.prepare(record))
        if len(self.pending) >= max(1, self.settings.batch_size) * 4:
            self.flush()

    def full(self, quota: int | None) -> bool:
        """Whether the part has exported its quota (pending records flushed to know)."""
        if quota is None:
            return False
        if self.counts["exported"] + sum(not i.problem for i in self.pending) < quota:
            return False
        self.flush()
        return self.counts["exported"] >= quota

    def prepare(self, record: dict) -> _Item:
        """A record's item: its prompt, and its tokens' shape where the journal has them."""
        settings = self.settings
        problem = _check(record)
        if problem:
            return _Item(str(record.get("image_id")), record, problem=(problem, ""))
        prompt = format_prompt(record, settings.header, settings.entity)
        self.counts["texts_cleaned"] += prompts.texts_cleaned(record, settings.header)
        item = _Item(record_key(record), record, prompt, feature_relpath(record))
        if settings.tokenize:
            self.reuse(item)
        return item

    def reuse(self, item: _Item) -> None:
        """Take an item's tokens from an earlier run's feature (its texts rewritten if changed)."""
        done = self.journal.done(item.key)
        feature = self.saved_dir / item.feature
        fresh = done and done.get("digest") == self.digest and same_image(done, item.record)
        if not (fresh and feature.exists()):
            return
        if done.get("texts_sha1") != _sha1(item.prompt):  # the prompt changed: texts only
            tokens = load_feature(feature)["images"].numpy()
            save_feature(feature, item.key, tokens, item.prompt)
            self.journal.append([{**done, "texts_sha1": _sha1(item.prompt)}])
            self.counts["texts_rewritten"] += 1
        item.shape = tuple(done["shape"])
        self.counts["reused"] += 1

    def decode(self, item: _Item) -> None:
        """An item's pixels at the Emu3 area (or why its image cannot be read)."""
        try:
            path = image_path(item.record)
            item.pixels = load_pixels(path, self.settings.image_area, self.tokenizer.factor)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            item.problem = ("image_unreadable", f"{type(err).__name__}: {err}")

    def tokenize(self, batch: list[_Item]) -> None:
        """Tokens of a batch of same-size images, saved as features and journaled."""
        tokens = self.tokenizer.encode(np.stack([item.pixels for item in batch]))
        entries = []
        for item, grid_tokens in zip(batch, tokens, strict=True):
            save_feature(self.saved_dir / item.feature, item.key, grid_tokens, item.prompt)
            item.shape, item.pixels = tuple(grid_tokens.shape), None
            entries.append({"key": item.key, "url": item.record.get("url"),
                            "digest": self.digest, "shape": list(item.shape),
                            "texts_sha1": _sha1(item.prompt)})  # fmt: skip
        self.journal.append(entries)
        self.counts["tokenized"] += len(batch)

    def flush(self) -> None:
        """Tokenize what the window needs, then write its lines in input order."""
        needs = [
            i for i in self.pending if self.settings.tokenize and not i.problem and not i.shape
        ]
        if needs and self.tokenizer is None:
            self.tokenizer = self.factory()
        list(self.pool.map(self.decode, needs))
        groups: dict[tuple, list[_Item]] = {}
        for item in needs:
            if item.pixels is not None:
                groups.setdefault(item.pixels.shape, []).append(item)
        size = self.settings.batch_size
        for items in groups.values():  # same-size images share a batch
            for start in range(0, len(items), size):
                self.tokenize(items[start : start + size])
        for item in self.pending:
            if item.problem:
                self.writer.error(item.record, *item.problem)
            else:
                self.writer.item(item, item.shape)
        self.pending.clear()

    def stats(self, part: int) -> dict:
        """The part's stats envelope (records beyond its max_items share are dropped)."""
        counts, settings = self.counts, self.settings
        dropped = dict(self.writer.reasons)
        records_in = counts["records"] + counts["beyond_max_items"]
        return envelope(
            EMU3_PART.name, records_in, counts["exported"], dropped, part=part,
            **{k: counts[k] for k in PART_COUNTS},
            tokenize=settings.tokenize,
            stand_in_tokenizer=settings.tokenize and settings.tokenizer is None,
            stand_in=settings.tokenize and settings.tokenizer is None,
            image_area=settings.image_area,
            factor=self.tokenizer.factor if self.tokenizer is not None else None,
        )  # fmt: skip


# Counts of a part that its stats keep beside the envelope, and the gather sums.
PART_COUNTS = ("tokenized", "reused", "texts_rewritten", "texts_cleaned", "feature_copies",
               "beyond_max_items")  # fmt: skip


def export_part(
    input_path: str | os.PathLike,
    files: Emu3PartFiles,
    settings: Emu3Settings,
    part: int = 0,
    tokenizer_factory: Callable[[], VisionTokenizer] | None = None,
) -> dict:
    """Export the records of one part into `files`: features (unless no-tokenize), list lines,
    drop lines (records beyond its max_items share too) and the stats envelope."""
    factory = tokenizer_factory or (lambda: load_tokenizer(settings))
    with contextlib.ExitStack() as stack:
        run = _PartRun(files, settings, factory, stack)
        records = _records_of_part(input_path, part, settings.parts)
        for record in tqdm(records, desc=f"emu3 part {part}", unit="rec", mininterval=5):
            if run.full(settings.quota):
                run.counts["beyond_max_items"] += 1
                run.writer.error(
                    record, "beyond_max_items", f"export.emu3.max_items {settings.max_items}"
                )
                continue
            run.add(record)
        run.flush()
        stats = run.stats(part)
    if run.counts["feature_copies"]:
        log.warning("%s: no hard links here, %d features copied from %s", run.features_dir,
                    run.counts["feature_copies"], run.saved_dir)  # fmt: skip
    write_stats(files.stats, stats)
    log.info("emu3 part %d: %s", part, stats)
    return stats


def _under(folder: str | os.PathLike, prefix: Path) -> str:
    """`folder` relative to `prefix` as a path_list prefix ("" for prefix itself, else "a/b/")."""
    rel = Path(os.path.relpath(Path(folder).resolve(), prefix)).as_posix()
    if rel == ".." or rel.startswith("../"):
        raise Emu3Error(f"feature folder {folder} is not under the train.json prefix {prefix}")
    return "" if rel == "." else rel + "/"


class _ListWriter:
    """The lists of the gather: datalist, train.json (max_items), prompts; and their counts."""

    def __init__(self, datalist, train, prompts, prefix: Path, max_items: int | None) -> None:
        """Writers into the open list files (their heads written)."""
        self.datalist, self.train, self.prompts = datalist, train, prompts
        self.max_items = max_items
        self.listed = self.not_listed = 0
        train.write('{"prefix": ' + json.dumps(str(prefix)) + ', "path_list": [')
        prompts.write("[")

    def add(self, line: dict, under: str) -> None:
        """One part's list line (its path made relative to the prefix, as train.json lists it)."""
        line["path"] = under + (line.get("path") or f"{line['name']}.pth")
        self.datalist.write(dumps_record(line) + "\n")
        if self.max_items is not None and self.listed >= self.max_items:
            self.not_listed += 1
            return
        sep = ", " if self.listed else ""
        self.train.write(sep + json.dumps(line["path"]))
        entry = {"name": line["name"], "image": line["image"],
                 "text": line.get("texts", line.get("text"))}  # fmt: skip
        self.prompts.write(sep + json.dumps(entry, ensure_ascii=False))
        self.listed += 1

    def close(self) -> None:
        """The lists' ends: train.json holds the seed's keys only (features: emu3_stats.json)."""
        self.train.write("]}\n")
        self.prompts.write("]\n")


def gather_emu3(
    records: list[str],
    errors: list[str],
    stats: list[str],
    features: list[str],
    files: Emu3ListFiles,
    prefix: str | os.PathLike,
    settings: Emu3Settings,
) -> dict:
    """The lists of all parts (their records, errors, stats and feature folders, aligned):
    datalist.jsonl, train.json (max_items; paths relative to `prefix`), error.jsonl and the
    stats envelope (the parts' summed)."""
    if not len(records) == len(errors) == len(stats) == len(features):
        raise Emu3Error(
            f"{len(records)} part lists, {len(errors)} error files, {len(stats)} stats and "
            f"{len(features)} feature folders"
        )
    prefix = Path(prefix).resolve()
    total: dict = {}
    counts: Counter = Counter()
    stand_in = False
    with (
        atomic_write(files.datalist) as datalist,
        atomic_write(files.train) as train,
        atomic_write(files.errors) as error_out,
        atomic_write(files.prompts) as prompts_out,
    ):
        lists = _ListWriter(datalist, train, prompts_out, prefix, settings.max_items)
        for part_records, part_errors, part_stats_path, part_features in zip(
            records, errors, stats, features, strict=True
        ):
            under = _under(part_features, prefix)
            part_stats = read_stats(part_stats_path)
            add_counts(total, part_stats)
            stand_in |= bool(part_stats.get("stand_in_tokenizer"))
            counts.update({k: part_stats.get(k, 0) for k in PART_COUNTS})
            for line in iter_jsonl(part_records):
                lists.add(line, under)
            with open(part_errors, encoding="utf-8") as handle:
                shutil.copyfileobj(handle, error_out)
        lists.close()
    result = envelope(
        EMU3.name, total.get("records_in", 0), total.get("records_out", 0),
        total.get("dropped", {}),
        **{k: counts[k] for k in PART_COUNTS},
        train_items=lists.listed,
        not_listed_max_items=lists.not_listed,
        tokenize=settings.tokenize,
        stand_in_tokenizer=stand_in,
        stand_in=stand_in,
        image_area=settings.image_area,
        feature_dir=str(prefix),
    )  # fmt: skip
    write_stats(files.stats, result)
    log.info("emu3 export: %s", result)
    return result


def _named(stream: Iterator[dict], name: str) -> dict | None:
    """The next record of `stream` whose key is `name` (those before it are not exported)."""
    for record in stream:
        with contextlib.suppress(RecordError):
            if record_key(record) == name:
                return record
    return None


def prompt_problems(
    datalist: str | os.PathLike, masked: str | os.PathLike, settings: Emu3Settings
) -> list[str]:
    """Lines of `datalist` whose prompt does not parse back to exactly its masked record's
    caption, entities and boxes (each part's lines follow the input's order: one pass per part)."""
    streams: dict[int, Iterator[dict]] = {}
    problems: list[str] = []
    for number, line in enumerate(iter_jsonl(datalist), 1):
        name = str(line.get("name"))
        part = part_of(name, settings.parts) if settings.parts > 1 else 0
        stream = streams.setdefault(part, _records_of_part(masked, part, settings.parts))
        record = _named(stream, name)
        parsed = parse_prompt(str(line.get("texts", line.get("text"))), *template(
            settings.header, settings.entity))  # fmt: skip
        if record is None:
            problems.append(f"{datalist}:{number}: {name} is not a masked record (or out of order)")
            streams[part] = iter(())
        elif parsed is None:
            problems.append(f"{datalist}:{number}: {name}: the prompt does not parse back")
        elif parsed != prompts.prompt_parts(record, settings.header):
            problems.append(
                f"{datalist}:{number}: {name}: the prompt parses to other entities or boxes "
                "than its record's"
            )
    return problems


def outdir_files(outdir: str | os.PathLike) -> tuple[Emu3PartFiles, Emu3ListFiles]:
    """The one-part layout of `groundset export-emu3 --outdir DIR` (the journal in list/parts)."""
    outdir = Path(outdir)
    parts = outdir / "list" / "parts"
    part = Emu3PartFiles(
        records=str(parts / "part_0.jsonl"),
        errors=str(parts / "error_0.jsonl"),
        stats=str(parts / "stats_0.json"),
        features=str(outdir / "feature"),
        journal=str(parts / "journal_0.jsonl"),
    )
    lists = Emu3ListFiles(
        datalist=str(outdir / "list" / "datalist.jsonl"),
        train=str(outdir / "list" / "train.json"),
        errors=str(outdir / "list" / "error.jsonl"),
        prompts=str(outdir / "list" / "prompts.json"),
        stats=str(outdir / "emu3_stats.json"),
    )
    return part, lists


def export_emu3(
    input_path: str | os.PathLike,
    outdir: str | os.PathLike,
    settings: Emu3Settings,
    tokenizer_factory: Callable[[], VisionTokenizer] | None = None,
) -> dict:
    """The whole export in one process (`groundset export-emu3`): one part, then the lists."""
    settings = replace(settings, parts=1)
    part, lists = outdir_files(outdir)
    export_part(input_path, part, settings, 0, tokenizer_factory)
    return gather_emu3(
        [part.records], [part.errors], [part.stats], [part.features], lists, part.features, settings
    )
