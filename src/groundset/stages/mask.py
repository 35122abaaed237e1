"""Mask stage: a SAM2 mask per entity box of every captioned record.

The real `sam2` package (`build_sam2` + `SAM2ImagePredictor`): images are decoded by a thread
pool ahead of the model, resized and normalized on the model's device, encoded in batches
(bf16 autocast on CUDA, `torch.inference_mode`), and all boxes of an image are decoded in one
prompt batch. Masks go to one `.npy` per image (bool `(N, H, W)`, N = entities in record order)
or into the record as COCO RLE. Per entity the record gets the SAM2 score, the fraction of the
mask inside its box and the mask/box area ratio: a mask job computes and keeps one mask per
entity, whatever its quality. The quality floors (`mask.min_score`, `mask.min_inside_fraction`,
`mask.low_quality`) are applied afterwards by the cheap gather (`apply_floors`), so changing a
floor recomputes nothing. Every finished image is journaled, so a killed job, rerun, skips it.

A job's files are one `MaskChunkFiles`. In the workflow its mask folder is a declared output,
which Snakemake empties before it reruns the job; so masks are computed into a store shared by
all chunks (resume state, like the journal never an output) and hard-linked into the mask
folder, and a rerun links what the journal already has instead of computing it again. A journal
entry holds what its masks were computed from (settings digest, image and boxes): anything
else is computed again.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from groundset.core.config import TUNING, fill_section, keys_for, pick_keys
from groundset.core.io import (
    atomic_save,
    atomic_write,
    check_chunk_plan,
    dumps_record,
    iter_jsonl,
    read_json,
)
from groundset.core.journal import Journal
from groundset.core.records import RecordError, flatten_record, mask_relpath, record_key, same_image
from groundset.core.stats import add_counts, drop_line, envelope, write_stats

log = logging.getLogger(__name__)

STAGE = "mask"
# What a mask job counts beside its envelope's records in, out and dropped (its stats file's
# extras; the gather totals them, zero chunks included).
COUNTS = (
    "from_journal",
    "computed",
    "entities",
    "entities_dropped",
    "entities_flagged",
    "without_entities",
    "mask_bytes",
    "mask_copies",
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class MaskError(RuntimeError):
    """A problem that stops the mask job (model config, checkpoint)."""


# `mask:` keys a mask job's outputs depend on: the rule's params (changing one reruns the job),
# and the journal's digest (an image masked under other values is masked again).
OUTPUT_KEYS = keys_for("mask", "mask")
# The quality floors: which entities stay (drop) or are flagged. Applied by the gather over
# the stored masks and scores (its params): changing one reruns no mask job.
FLOOR_KEYS = keys_for("mask", "mask_floors")
# Tuning knobs: how fast and where a job runs, never what its outputs hold. The job reads them
# from the config at run time, so changing one marks nothing stale.
TUNING_KEYS = keys_for("mask", "mask", TUNING)


def output_settings(section: dict) -> dict:
    """The keys of a `mask:` config section that change a mask job's outputs (its params)."""
    return pick_keys(section, OUTPUT_KEYS)


def floor_settings(section: dict) -> dict:
    """The quality floors of a `mask:` config section (the gather's params)."""
    return pick_keys(section, FLOOR_KEYS)


@dataclass(frozen=True)
class MaskChunkFiles:
    """What one mask job writes (the rule's outputs and params have these names)."""

    records: str  # masked records, aligned with their masks
    dropped: str  # records dropped, each with its drop_reason
    stats: str  # the job's counts
    masks: str  # the folder the records' mask_file names: <masks>/<source>/<image_id>.npy
    journal: str  # resume state: every finished image
    # resume state: where masks are computed, then hard-linked into `masks` (which Snakemake
    # empties before a rerun); None computes them in `masks` itself (`groundset mask`)
    store: str | None = None


@dataclass(frozen=True)
class MaskSettings:
    """The `mask:` config section.

    Built by from_config only: the schema (workflow/schemas/config.schema.yaml) holds every
    default and allowed value, so no field repeats one."""

    model_config: str
    checkpoint: str | None
    mask_format: str
    min_score: float
    min_inside_fraction: float
    low_quality: str
    batch_size: int
    device: str
    decode_workers: int

    @property
    def digest(self) -> str:
        """What decides a mask entry's content (OUTPUT_KEYS): an entry made under other values is
        redone."""
        key = tuple(getattr(self, name) for name in OUTPUT_KEYS)
        return hashlib.sha256(repr(key).encode()).hexdigest()[:12]

    @classmethod
    def from_config(cls, section: dict) -> MaskSettings:
        """Settings from a (partial) `mask:` config dict, checked and filled from the schema
        (ConfigError naming the key); keys without a field (gpus, random_weights) are the
        workflow's."""
        values = fill_section("mask", section)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# --- records --------------------------------------------------------------------------------


def pixel_boxes(entities: list[dict], width: int, height: int) -> np.ndarray:
    """(N, 4) float32 pixel boxes [x1, y1, x2, y2] from normalized ones."""
    if not entities:
        return np.zeros((0, 4), dtype=np.float32)
    boxes = np.asarray([e["bbox"] for e in entities], dtype=np.float32)
    return boxes * np.asarray([width, height, width, height], dtype=np.float32)


def input_digest(flat: dict) -> str:
    """What a record's masks are computed from (its image and boxes): a journaled entry made
    from another image or other boxes (the record was captioned again) is computed again."""
    boxes = [entity["bbox"] for entity in flat["entities"]]
    return hashlib.sha256(json.dumps([flat["image"], boxes]).encode()).hexdigest()[:16]


def mask_path(mask_dir: str | os.PathLike, record: dict) -> Path:
    """`<mask_dir>/<source>/<image_id>.npy`, or `<mask_dir>/<image_id>.npy` without a source."""
    return Path(mask_dir) / mask_relpath(record)


# --- images ---------------------------------------------------------------------------------


def decode_image(path: str) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 RGB array (OSError/ValueError if unreadable)."""
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))  # writable: torch.from_numpy wants that


def resolve_device(device: str) -> str:
    """A torch device name; `auto` is cuda when a GPU is visible, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(settings: MaskSettings):
    """(SAM2ImagePredictor, torch.device) built from the config and checkpoint (None: random)."""
    import torch
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    device = resolve_device(settings.device)
    if settings.checkpoint is None:
        log.warning(
            "mask: NO CHECKPOINT (mask.checkpoint: null): SAM2 has RANDOM weights, masks and "
            "scores are meaningless (tests only). Download e.g. sam2.1_hiera_large.pt and set "
            "mask.checkpoint"
        )
        torch.manual_seed(0)  # the same random weights in every job, so reruns agree
    elif not Path(settings.checkpoint).is_file():
        raise MaskError(f"mask.checkpoint {settings.checkpoint} is not a file")
    try:
        model = build_sam2(settings.model_config, settings.checkpoint, device=device)
    except Exception as err:  # hydra raises its own types for a bad config name
        raise MaskError(f"cannot build SAM2 from {settings.model_config}: {err}") from err
    return SAM2ImagePredictor(model), torch.device(device)


class Masker:
    """Batched SAM2 inference: embed a batch of images, then masks for each image's boxes."""

    def __init__(self, predictor, device):
        import torch

        self.torch = torch
        self.predictor = predictor
        self.device = device
        self.resolution = predictor.model.image_size
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def autocast(self):
        """bf16 autocast on CUDA, nothing elsewhere."""
        if self.device.type == "cuda":
            return self.torch.autocast("cuda", dtype=self.torch.bfloat16)
        return contextlib.nullcontext()

    def _preprocess(self, images: list[np.ndarray]):
        """Resize to the model's square input and normalize, on the model's device."""
        torch = self.torch
        batch = []
        for image in images:
            tensor = torch.from_numpy(image).to(self.device, non_blocking=True)
            tensor = tensor.permute(2, 0, 1)[None].float().div_(255.0)
            tensor = torch.nn.functional.interpolate(
                tensor, (self.resolution, self.resolution), mode="bilinear",
                align_corners=False, antialias=True,
            )  # fmt: skip
            batch.append(tensor)
        return (torch.cat(batch) - self.mean) / self.std

    def embed(self, images: list[np.ndarray]) -> None:
        """Image embeddings of a batch (the predictor's batch state)."""
        predictor = self.predictor
        with self.torch.inference_mode(), self.autocast():
            batch = self._preprocess(images)
            backbone = predictor.model.forward_image(batch)
            _, feats, _, _ = predictor.model._prepare_backbone_features(backbone)
            if predictor.model.directly_add_no_mem_embed:
                feats[-1] = feats[-1] + predictor.model.no_mem_embed
            sizes = predictor._bb_feat_sizes
            maps = [
                feat.permute(1, 2, 0).view(len(images), -1, *size)
                for feat, size in zip(feats[::-1], sizes[::-1], strict=True)
            ][::-1]
        predictor._features = {"image_embed": maps[-1], "high_res_feats": maps[:-1]}
        predictor._orig_hw = [image.shape[:2] for image in images]
        predictor._is_image_set = True
        predictor._is_batch = True

    def predict(self, index: int, boxes: np.ndarray):
        """(bool masks (N, H, W) on the device, scores (N,) numpy) for image `index` of the batch."""
        predictor = self.predictor
        with self.torch.inference_mode(), self.autocast():
            _, coords, labels, box = predictor._prep_prompts(
                None, None, boxes, None, normalize_coords=True, img_idx=index
            )
            masks, scores, _ = predictor._predict(
                coords, labels, box, None, multimask_output=False, img_idx=index
            )
        return masks[:, 0], scores[:, 0].float().cpu().numpy()


def mask_quality(masks, boxes: np.ndarray) -> tuple[list[float], list[float]]:
    """Per entity: fraction of the mask inside its box, and mask area / box area."""
    areas = masks.flatten(1).sum(1).float().cpu().numpy()
    height, width = masks.shape[1:]
    inside, ratio = [], []
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        c1, r1 = int(np.floor(max(0.0, x1))), int(np.floor(max(0.0, y1)))
        c2, r2 = int(np.ceil(min(width, x2))), int(np.ceil(min(height, y2)))
        within = float(masks[i, r1:r2, c1:c2].sum()) if r2 > r1 and c2 > c1 else 0.0
        box_area = max(1.0, float((x2 - x1) * (y2 - y1)))
        inside.append(round(within / float(areas[i]), 4) if areas[i] else 0.0)
        ratio.append(round(float(areas[i]) / box_area, 4))
    return inside, ratio


def encode_rle(masks: np.ndarray) -> list[dict]:
    """COCO RLE (`{"size": [H, W], "counts": str}`) of each mask of a (N, H, W) bool array."""
    from pycocotools import mask as mask_utils

    # (H, W, N) in Fortran order, as pycocotools wants it: one copy, no uint8 conversion pass
    fortran = np.ascontiguousarray(masks.astype(bool, copy=False).transpose(0, 2, 1))
    encoded = mask_utils.encode(fortran.view(np.uint8).transpose(2, 1, 0))
    return [{"size": [int(r["size"][0]), int(r["size"][1])],
             "counts": r["counts"].decode("ascii")} for r in encoded]  # fmt: skip


def decode_rle(rles: list[dict]) -> np.ndarray:
    """(N, H, W) bool masks from `encode_rle`'s output."""
    from pycocotools import mask as mask_utils

    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    coded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return mask_utils.decode(coded).transpose(2, 0, 1).astype(bool)


def save_npy(path: Path, masks: np.ndarray) -> int:
    """Write a bool (N, H, W) array atomically; returns its bytes (a full disk says so)."""
    atomic_save(path, lambda handle: np.save(handle, masks), fsync=False)
    return path.stat().st_size


# A filesystem without hard links (or another device) gets copies: errnos that say so.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def publish(computed: Path, published: Path) -> bool:
    """Hard-link a computed file to where the records name it (a copy where links are not
    possible; the same path: nothing); True if it had to be copied."""
    if computed == published:
        return False
    published.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if published.samefile(computed):
            return False
        published.unlink()  # an earlier version: the files are replaced, never written into
    try:
        os.link(computed, published)
        return False
    except OSError as err:
        if err.errno not in _NO_LINK:
            raise
    shutil.copyfile(computed, published)
    return True


# --- chunks ---------------------------------------------------------------------------------


@dataclass
class _Item:
    """One record on its way through the masker."""

    record: dict
    key: str
    image: np.ndarray | None = None
    error: str | None = None


def _decode(record: dict) -> _Item:
    """Flatten a record and decode its image (errors become a drop reason)."""
    flat = flatten_record(record)
    item = _Item(flat, record_key(flat))
    if not flat["entities"]:
        return item
    if not flat["image"] or not Path(flat["image"]).is_file():
        item.error = "image_missing"
        return item
    try:
        mask_relpath(flat)
    except RecordError as err:  # an id or source that cannot name its mask file
        item.error = f"bad_name: {err}"
        return item
    try:
        item.image = decode_image(flat["image"])
    except Exception as err:  # PIL raises many types for broken files
        item.error = f"image_unreadable: {type(err).__name__}"
    return item


def _batches(
    records: Iterator[dict], pool: cf.ThreadPoolExecutor, size: int
) -> Iterator[list[_Item]]:
    """Decoded items in batches of `size`, decoding the next batch while the caller works."""
    pending: list[cf.Future] = []
    for record in records:
        pending.append(pool.submit(_decode, record))
        if len(pending) >= 2 * size:
            yield [f.result() for f in pending[:size]]
            pending = pending[size:]
    while pending:
        yield [f.result() for f in pending[:size]]
        pending = pending[size:]


def _journaled(journal: Journal, item: _Item, settings: MaskSettings) -> bool:
    """Whether the journal holds this image's masks under these settings (and its npy file)."""
    entry = journal.done(item.key)
    if entry is None or entry.get("settings") != settings.digest:
        return False
    if entry.get("input") != input_digest(flatten_record(item.record)):
        return False
    if not same_image(entry, item.record):
        return False  # another image under this id (a re-download renumbered them)
    if entry.get("error"):
        return False  # cheap to try again: the image may be back
    if settings.mask_format == "rle" or not entry.get("mask_file"):
        return True
    return Path(entry["mask_file"]).is_file()


def _lazy(masker: Masker | Callable[[], Masker] | None) -> Callable[[], Masker]:
    """The masker, made on first use when `masker` is a factory."""
    holder: list = [masker]

    def get_masker() -> Masker:
        if callable(holder[0]) and not isinstance(holder[0], Masker):
            holder[0] = holder[0]()
        if holder[0] is None:
            raise MaskError("records with entities but no model to mask them")
        return holder[0]

    return get_masker


def _compute(records_path, journal: Journal, settings: MaskSettings, get_masker, computed_dir: Path,
             counts: Counter) -> None:  # fmt: skip
    """Mask every record the journal lacks, journaling each batch as it is done."""
    todo = (r for r in iter_jsonl(records_path)
            if not _journaled(journal, _Item(r, record_key(r)), settings))  # fmt: skip
    with cf.ThreadPoolExecutor(max(1, settings.decode_workers)) as pool, \
            cf.ThreadPoolExecutor(2) as writer, \
            tqdm(desc="mask", unit="img", mininterval=5) as bar:  # fmt: skip
        for batch in _batches(todo, pool, settings.batch_size):
            entries = _mask_batch(batch, get_masker, settings, computed_dir, writer, counts)
            journal.append([
                {**entry, "settings": settings.digest, "input": input_digest(item.record),
                 "url": item.record.get("url")}  # fmt: skip
                for item, entry in zip(batch, entries, strict=True)
            ])  # fmt: skip
            bar.update(len(batch))


def _write_chunk(records_path, files: MaskChunkFiles, journal: Journal, settings: MaskSettings,
                 counts: Counter, reasons: Counter) -> None:  # fmt: skip
    """The chunk's masked records (masks published into its folder) and drop lines, in input
    order, from the journal."""
    masks_dir = Path(files.masks).resolve()
    with atomic_write(files.records) as out, atomic_write(files.dropped) as drop:
        for record in iter_jsonl(records_path):
            counts["records"] += 1
            flat = flatten_record(record)
            entry = journal.done(record_key(flat))
            if entry is None:
                raise MaskError(f"{record_key(flat)}: not masked (internal error)")
            if entry.get("error"):
                kind = entry["error"].split(":")[0]
                reasons[kind] += 1
                drop.write(dumps_record(drop_line(flat, STAGE, kind, entry["error"])) + "\n")
                continue
            out_record = _with_masks(flat, entry, settings)
            if out_record["mask_file"]:  # where the records name it: the mask folder
                published = masks_dir / mask_relpath(flat)
                counts["mask_copies"] += publish(Path(out_record["mask_file"]), published)
                out_record["mask_file"] = str(published)
            counts["masked"] += 1
            counts["without_entities"] += not out_record["entities"]
            counts["entities"] += len(out_record["entities"])
            counts["mask_bytes"] += entry.get("bytes", 0)
            out.write(dumps_record(out_record) + "\n")


def mask_chunk(
    records_path: str | os.PathLike,
    files: MaskChunkFiles,
    settings: MaskSettings,
    masker: Masker | Callable[[], Masker] | None = None,
) -> dict:
    """Masks for every record of a captioned JSONL into `files`; returns the stats envelope.

    `masker` may be a factory, called once the first image needs the model. Images already
    journaled (with their computed mask file still there, for npy) are not computed again.
    """
    counts: Counter = Counter(dict.fromkeys(COUNTS, 0))
    reasons: Counter = Counter()
    began = time.monotonic()
    masks_dir = Path(files.masks).resolve()
    computed_dir = Path(files.store).resolve() if files.store else masks_dir
    with Journal(files.journal) as journal:
        _compute(records_path, journal, settings, _lazy(masker), computed_dir, counts)
        _write_chunk(records_path, files, journal, settings, counts, reasons)
    counts["from_journal"] = counts["records"] - counts["computed"]
    counts["seconds"] = round(time.monotonic() - began, 3)
    records_in, masked = counts.pop("records"), counts.pop("masked")
    result = envelope(
        STAGE,
        records_in,
        masked,
        reasons,
        **dict(counts),
        **model_facts(settings),
        bytes_per_masked_image=per_image(counts["mask_bytes"], masked),
    )
    if counts["mask_copies"]:
        log.warning("%s: no hard links here, %d masks copied from %s", masks_dir,
                    counts["mask_copies"], computed_dir)  # fmt: skip
    write_stats(files.stats, result)
    return result


def model_facts(settings: MaskSettings) -> dict:
    """What the mask stats say of the model: its config, its format, random weights or not."""
    return {
        "mask_format": settings.mask_format,
        "model_config": settings.model_config,
        "random_weights": settings.checkpoint is None,
        "stand_in": settings.checkpoint is None,  # SAM2 with random weights
    }


def per_image(mask_bytes: int, masked: int) -> float:
    """Mask bytes per masked image (0 when none was masked)."""
    return round(mask_bytes / masked, 1) if masked else 0.0


def _mask_batch(
    batch: list[_Item], get_masker: Callable[[], Masker], settings: MaskSettings,
    computed_dir: Path, writer: cf.ThreadPoolExecutor, counts: Counter,
) -> list[dict]:  # fmt: skip
    """Journal entries for one decoded batch (masks written under `computed_dir` before the
    entries, which name them, are returned)."""
    entries: list[dict] = []
    ready = [item for item in batch if item.image is not None]
    masker = get_masker() if ready else None
    if ready:
        masker.embed([item.image for item in ready])
    writes = []
    for item in batch:
        if item.error:
            entries.append({"key": item.key, "error": item.error})
            continue
        if item.image is None:  # no entities: nothing to mask
            entries.append({"key": item.key, "mask_scores": [], "mask_inside_fraction": [],
                            "mask_area_ratio": [], "mask_file": None})  # fmt: skip
            continue
        index = ready.index(item)
        height, width = item.image.shape[:2]
        boxes = pixel_boxes(item.record["entities"], width, height)
        masks, scores = masker.predict(index, boxes)
        inside, ratio = mask_quality(masks, boxes)
        array = masks.cpu().numpy()
        entry = {"key": item.key, "mask_scores": [round(float(s), 4) for s in scores],
                 "mask_inside_fraction": inside, "mask_area_ratio": ratio,
                 "shape": [int(height), int(width)]}  # fmt: skip
        if settings.mask_format == "rle":
            entry["mask_rle"] = encode_rle(array)
            entry["mask_file"] = None
            entry["bytes"] = sum(len(r["counts"]) for r in entry["mask_rle"])
        else:
            path = mask_path(computed_dir, item.record)
            entry["mask_file"] = str(path)
            writes.append((writer.submit(save_npy, path, array), entry))
        counts["computed"] += 1
        entries.append(entry)
    for future, entry in writes:
        entry["bytes"] = future.result()  # on disk before the journal says so
    return entries


def _with_masks(flat: dict, entry: dict, settings: MaskSettings) -> dict:
    """The output record of a mask job: every entity, aligned with its mask, score and quality."""
    out = {**flat}
    for name in ("mask_scores", "mask_inside_fraction", "mask_area_ratio"):
        out[name] = list(entry[name])
    out["mask_file"] = entry.get("mask_file")
    if settings.mask_format == "rle":
        out["mask_rle"] = entry.get("mask_rle", [])
    if entry.get("shape"):
        out["mask_shape"] = [len(flat["entities"]), *entry["shape"]]
    return out


# --- quality floors, applied after the masks ------------------------------------------------

ALIGNED = ("entities", "mask_scores", "mask_inside_fraction", "mask_area_ratio", "mask_rle")
BELOW_FLOORS = "all_entities_below_quality_floors"


def apply_floors(
    record: dict, settings: MaskSettings, floored_dir: Path | None, counts: Counter
) -> dict | None:
    """A masked record under the quality floors: entities dropped (None when none is left) or
    flagged. A record that loses entities gets its kept masks in `floored_dir` (same relative
    path), so its `mask_file` stays aligned with its entities; the job's file is never touched."""
    n = len(record.get("entities") or [])
    passing = [
        score >= settings.min_score and inside >= settings.min_inside_fraction
        for score, inside in zip(
            record.get("mask_scores") or [], record.get("mask_inside_fraction") or [], strict=True
        )
    ]
    if settings.low_quality == "flag":
        flags = [not ok for ok in passing]
        counts["entities_flagged"] += sum(flags)
        return {**record, "mask_low_quality": flags}
    pick = [i for i, ok in enumerate(passing) if ok]
    counts["entities_dropped"] += n - len(pick)
    if len(pick) == n:
        return record
    return _keep_entities(record, pick, floored_dir) if pick else None


def _keep_entities(record: dict, pick: list[int], floored_dir: Path | None) -> dict:
    """A masked record with only the entities `pick` (and their masks, in `floored_dir`)."""
    out = {**record}
    for name in ALIGNED:
        if isinstance(record.get(name), list):
            out[name] = [record[name][i] for i in pick]
    if record.get("mask_shape"):
        out["mask_shape"] = [len(pick), *record["mask_shape"][1:]]
    if record.get("mask_file"):
        if floored_dir is None:
            raise MaskError("entities dropped by a floor but no folder for the kept masks")
        path = Path(floored_dir).resolve() / mask_relpath(record)
        save_npy(path, np.load(record["mask_file"])[pick])
        out["mask_file"] = str(path)
    return out


@dataclass(frozen=True)
class MaskGatherFiles:
    """What the mask gather writes (the rule's outputs have these names)."""

    records: str  # every chunk's masked records, in chunk order, under the quality floors
    dropped: str  # every chunk's dropped records, then those no floor left an entity
    stats: str  # the totals
    floored: str | None = None  # masks of records that lost entities to a floor


def gather_masks(
    chunks: list[str], dropped: list[str], stats: list[str], files: MaskGatherFiles,
    settings: MaskSettings, index: str | os.PathLike | None = None,
) -> dict:  # fmt: skip
    """Concatenate the masked chunks (the quality floors applied) and their drop files in order
    and total their stats (the three lists aligned); with `index`, the chunks must be those of
    the caption chunk index."""
    if not len(chunks) == len(dropped) == len(stats):
        raise ValueError(
            f"chunk file lists not aligned: {len(chunks)}, {len(dropped)}, {len(stats)}"
        )
    per_chunk = [read_json(path) for path in stats]
    if index is not None:
        check_chunk_plan(index, list(chunks), per_chunk)
    floored = Path(files.floored) if files.floored else None
    if floored is not None:
        floored.mkdir(parents=True, exist_ok=True)  # a declared folder, also if empty
    totals: Counter = Counter(dict.fromkeys(COUNTS, 0))
    head: dict = {"records_in": 0, "records_out": 0, "dropped": {}}
    for chunk_stats in per_chunk:
        add_counts(head, chunk_stats)
        totals.update({key: chunk_stats.get(key, 0) for key in (*COUNTS, "seconds")})
    for key in ("entities", "without_entities", "entities_dropped", "entities_flagged"):
        totals[key] = 0  # counted below, under the floors
    reasons = Counter(head["dropped"])
    masked = 0
    with atomic_write(files.records) as out, atomic_write(files.dropped, "wb") as drop:
        for path in dropped:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, drop, 1 << 20)
        for path in chunks:
            for record in iter_jsonl(path):
                kept = apply_floors(record, settings, floored, totals)
                if kept is None:
                    reasons[BELOW_FLOORS] += 1
                    line = drop_line(record, STAGE, BELOW_FLOORS, "no entity left above the floors")
                    drop.write((dumps_record(line) + "\n").encode())
                    continue
                masked += 1
                totals["entities"] += len(kept.get("entities") or [])
                totals["without_entities"] += not kept.get("entities")
                out.write(dumps_record(kept) + "\n")
    totals["seconds"] = round(totals["seconds"], 3)
    result = envelope(
        STAGE,
        head["records_in"],
        masked,
        reasons,
        **model_facts(settings),
        chunks=len(chunks),
        **dict(totals),
        floors={key: getattr(settings, key) for key in FLOOR_KEYS},
        bytes_per_masked_image=per_image(totals["mask_bytes"], masked),
    )
    write_stats(files.stats, result)
    return result
