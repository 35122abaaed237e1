"""Filter stage helpers: the image probe, data-juicer recipes from the template, running data-juicer.

The stage runs as two steps per shard: `groundset.stages.filter.score` (probe, then data-juicer computes all
five filters' stats, nothing removed) and `groundset.stages.filter.select` (the thresholds). This module holds
what both share and the seed's way — the template filled with the thresholds and run by stock
data-juicer (`make_dj_config` + `filter_shard`, `groundset dj-config`), which the tests and
bench/bench_filter.py compare groundset's scores and speed against.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import re
import shutil
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from tqdm import tqdm

from groundset.core.config import keys_for, pick_keys
from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.stats import drop_line, envelope, write_stats

log = logging.getLogger(__name__)

OPS = (
    "image_shape_filter",
    "image_aspect_ratio_filter",
    "image_nsfw_filter",
    "image_watermark_filter",
    "image_aesthetics_filter",
)
AESTHETICS_KEY = "image_aesthetics_scores"
STATS = "__dj__stats__"

# `filter:` keys that decide which scored records a shard keeps ("section.key" inside a
# subsection): the select job's params, so changing one reruns select and what follows only.
SELECT_KEYS = keys_for("filter", "select")


def select_settings(section: dict) -> dict:
    """The keys of a `filter:` config section that change what a shard keeps (select's params)."""
    return pick_keys(section, SELECT_KEYS)


# --- probe -------------------------------------------------------------------------------


_strict_lock = threading.Lock()
_strict_users = 0
_lenient_before = False


@contextlib.contextmanager
def strict_decoding() -> Iterator[None]:
    """PIL refuses truncated images for the block, whatever the process set: importing
    data-juicer sets `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which fills a truncated JPEG with
    grey instead of failing. Thread-safe; the previous setting is back after the last user."""
    global _strict_users, _lenient_before
    from PIL import ImageFile

    with _strict_lock:
        if _strict_users == 0:
            _lenient_before = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        _strict_users += 1
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _lenient_before


def probe_image(path: str) -> tuple[str | None, tuple[int, int] | None]:
    """(why an image cannot be used as "kind: detail" or None, its (width, height) from the header)."""
    from PIL import Image, UnidentifiedImageError

    size = None
    try:
        if os.path.getsize(path) == 0:
            return "empty_file: 0 bytes", None
        with strict_decoding(), Image.open(path) as img:
            size = img.size  # the header: what data-juicer's shape/aspect filters measure
            img.draft("RGB", (256, 256))  # JPEG: decode at reduced size; still reads every byte
            img.convert("RGB").load()
    except FileNotFoundError:
        return "missing_file: not found", None
    except UnidentifiedImageError as err:
        return f"not_an_image: {err}", None
    except Exception as err:  # noqa: BLE001 (any decoder error is a reason to drop)
        kind = "truncated" if "truncated" in str(err) else "decode_error"
        return f"{kind}: {type(err).__name__}: {err}", size
    return None, size


def probe_record(record: dict) -> tuple[str | None, list[tuple[int, int]]]:
    """The first reason one of a record's images is unusable (or None), and the images' sizes."""
    images = record.get("image")
    if isinstance(images, str):
        images = [images]
    if not images:
        return "no_image: the record lists no image", []
    sizes = []
    for path in images:
        reason, size = probe_image(path)
        if reason:
            return reason, sizes
        sizes.append(size)
    return None, sizes


def with_absolute_images(record: dict) -> dict:
    """The record with its image paths absolute (relative ones are relative to the working
    directory, where the probe opened them; data-juicer resolves them against its input file)."""
    images = record.get("image")
    if isinstance(images, str):
        return {**record, "image": os.path.abspath(images)}
    if images and any(not os.path.isabs(path) for path in images):
        return {**record, "image": [os.path.abspath(path) for path in images]}
    return record


def with_size_stats(record: dict, sizes: list[tuple[int, int]]) -> dict:
    """Add header sizes as data-juicer stats, so its shape and aspect filters need no decode."""
    stats = dict(record.get(STATS) or {})
    stats.setdefault("image_width", [w for w, _ in sizes])
    stats.setdefault("image_height", [h for _, h in sizes])
    stats.setdefault("aspect_ratios", [w / h for w, h in sizes])
    return {**record, STATS: stats}


def _chunks(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """Consecutive lists of up to `size` records."""
    while chunk := list(itertools.islice(records, size)):
        yield chunk


def probe_shard(
    shard: str | os.PathLike,
    output: str | os.PathLike,
    dropped: str | os.PathLike,
    threads: int = 1,
    header_sizes: bool = True,
    stage: str = "score",
) -> dict:
    """Copy the decodable records of a shard to `output`, the others to `dropped` as drop lines
    of `stage` (drop_reason: the kind, detail: what the decoder said); return the counts.

    With `header_sizes`, each kept record carries its images' sizes read from the file headers
    as data-juicer stats, so data-juicer's shape and aspect filters threshold without a decode.
    """
    counts: Counter = Counter()
    reasons: Counter = Counter()
    with (
        atomic_write(output) as kept,
        atomic_write(dropped) as bad,
        ThreadPoolExecutor(max(1, threads)) as pool,
        tqdm(unit="img", desc=f"probe {Path(shard).name}", mininterval=5) as bar,
    ):
        for chunk in _chunks(iter_jsonl(shard), 256):
            for record, (reason, sizes) in zip(chunk, pool.map(probe_record, chunk), strict=True):
                counts["records_in"] += 1
                if reason is None:
                    record = with_absolute_images(record)  # as probed, not as data-juicer
                    kept.write(  # would resolve them (its file)
                        dumps_record(with_size_stats(record, sizes) if header_sizes else record)
                        + "\n"
                    )
                    counts["records_out"] += 1
                else:
                    line = drop_line(record, stage, _reason_kind(reason), reason)
                    bad.write(dumps_record(line) + "\n")
                    reasons[line["drop_reason"]] += 1
            bar.update(len(chunk))
    return {
        "records_in": counts["records_in"],
        "records_out": counts["records_out"],
        "dropped": dict(sorted(reasons.items())),
    }


def _reason_kind(reason: str) -> str:
    """The kind of a drop reason ("truncated", "not_an_image", ...) for counting."""
    return reason.split(":", 1)[0]


# --- data-juicer recipe -------------------------------------------------------------------


def aesthetics_divisor(model: str) -> float:
    """What data-juicer divides the aesthetics score by for this model string (10 or 1)."""
    return 10.0 if "aesthetics-predictor" in model else 1.0


def filter_values(filter_cfg: dict, models: dict[str, str]) -> dict[str, dict]:
    """Per data-juicer op, the values groundset fills into the template from the config."""
    aesthetics = filter_cfg["aesthetics"]
    divisor = aesthetics_divisor(models["aesthetics"])
    return {
        "image_shape_filter": dict(filter_cfg["image_shape"]),
        "image_aspect_ratio_filter": dict(filter_cfg["aspect_ratio"]),
        "image_nsfw_filter": {
            "hf_nsfw_model": models["nsfw"],
            "max_score": filter_cfg["nsfw"]["max_score"],
            "mem_required": filter_cfg["nsfw"].get("mem_required"),
        },
        "image_watermark_filter": {
            "hf_watermark_model": models["watermark"],
            "prob_threshold": filter_cfg["watermark"]["max_prob"],
            "mem_required": filter_cfg["watermark"].get("mem_required"),
        },
        "image_aesthetics_filter": {
            "hf_scorer_model": models["aesthetics"],
            "min_score": aesthetics["min_score"] / divisor,
            "max_score": aesthetics["max_score"] / divisor,
            "mem_required": aesthetics.get("mem_required"),
        },
    }


def fill_template(template: dict, top: dict, ops: dict[str, dict]) -> dict:
    """Replace the template's nulls with `top` (global keys) and `ops` (per-op values)."""
    recipe = copy.deepcopy(template)
    for key, value in recipe.items():
        if key != "process" and value is None:
            if key not in top:
                raise ValueError(f"template key {key!r} is null and groundset has no value for it")
            recipe[key] = top[key]
    for entry in recipe.get("process", []):
        ((name, params),) = entry.items()
        params = params if params is not None else {}
        entry[name] = params
        for key, value in params.items():
            if value is None:
                if key not in ops.get(name, {}):
                    raise ValueError(
                        f"template op {name}: {key!r} is null and groundset has no value for it"
                    )
                params[key] = ops[name][key]
    return recipe


def make_dj_config(
    template_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dataset_path: str,
    export_path: str,
    project_name: str,
    work_dir: str,
    filter_cfg: dict,
    models: dict[str, str],
) -> dict:
    """Write one shard's data-juicer recipe (template + paths + config values) as YAML."""
    with open(template_path, encoding="utf-8") as handle:
        template = yaml.safe_load(handle)
    top = {
        "project_name": project_name,
        "dataset_path": str(Path(dataset_path).resolve()),
        "export_path": str(Path(export_path).resolve()),
        "work_dir": str(Path(work_dir).resolve()),
        "np": filter_cfg["np"],
    }
    recipe = fill_template(template, top, filter_values(filter_cfg, models))
    with atomic_write(output) as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    return recipe


def resolve_models(filter_cfg: dict, stand_in: dict[str, str] | None = None) -> dict[str, str]:
    """Model id/path per filter: the configured ones, or the stand-ins when asked for."""
    if filter_cfg["stand_in_models"]:
        if not stand_in:
            raise ValueError("filter.stand_in_models is true but no stand-in models were built")
        return dict(stand_in)
    return {name: filter_cfg[name]["model"] for name in ("nsfw", "watermark", "aesthetics")}


# --- running data-juicer ------------------------------------------------------------------

_LEFT = re.compile(
    r"OP \[(?P<op>[^\]]+)\] Done in (?P<seconds>[\d.]+)s\. Left (?P<left>\d+) samples"
)


def run_data_juicer(
    recipe_path: str | os.PathLike, np_override: int | None = None, models_home: str | None = None
) -> list[tuple[str, int, float]]:
    """Run data-juicer's default executor on a recipe; return (op, samples left, seconds) per op."""
    if models_home:
        os.environ["DATA_JUICER_EXTERNAL_MODELS_HOME"] = str(models_home)
    from data_juicer.config import init_configs
    from data_juicer.core import DefaultExecutor
    from loguru import logger

    left: list[tuple[str, int, float]] = []

    def sink(message) -> None:
        match = _LEFT.search(message.record["message"])
        if match:
            left.append((match["op"], int(match["left"]), float(match["seconds"])))

    args = ["--config", str(recipe_path)]
    if np_override:
        args += ["--np", str(np_override)]
    # data-juicer's first set-up in a process redirects stdout and stderr to its logger; later
    # ones print the config table to stdout: stdout stays the caller's (e.g. the CLI's JSON)
    streams = sys.stdout, sys.stderr
    sys.stdout = sys.stderr
    handler = None
    try:
        cfg = init_configs(args=args)  # resets loguru's handlers: add ours afterwards
        handler = logger.add(sink, level="INFO")
        DefaultExecutor(cfg).run()
    finally:
        if handler is not None:
            with contextlib.suppress(ValueError):
                logger.remove(handler)
        logger.remove()  # data-juicer's file sinks live in the work dir, which is removed next
        sys.stdout, sys.stderr = streams
    return left


def per_filter_removed(records_in: int, left: list[tuple]) -> dict[str, int]:
    """How many records each op removed, from data-juicer's own 'Left N samples' counts."""
    removed = {}
    before = records_in
    for op, after, *_ in left:
        removed[op] = before - after
        before = after
    return removed


def normalise_record(record: dict, divisor: float) -> dict:
    """A data-juicer output record in the DESIGN.md shape: aesthetic scores back on 0-10."""
    stats = record.get(STATS) or {}
    if AESTHETICS_KEY in stats and divisor != 1.0:
        stats[AESTHETICS_KEY] = [float(s) * divisor for s in stats[AESTHETICS_KEY]]
    record[STATS] = {key: stats[key] for key in sorted(stats)}
    return record


def filter_shard(
    recipe_path: str | os.PathLike,
    output: str | os.PathLike,
    stats_path: str | os.PathLike,
    *,
    np_override: int | None = None,
    models_home: str | None = None,
    probe_stats: dict | None = None,
    keep_work_dir: bool = False,
) -> dict:
    """Run data-juicer on one probed shard; write kept records (DESIGN shape) and the shard's stats.

    Data-juicer's work folder is cleared first (a killed run's leftovers) and removed at the end,
    or, with `keep_work_dir`, left empty (a declared output that Snakemake removes itself).
    """
    with open(recipe_path, encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    export = Path(recipe["export_path"])
    work = Path(recipe["work_dir"])
    if work.exists():
        shutil.rmtree(work)  # a killed run's leftovers: start this shard afresh
    export.parent.mkdir(parents=True, exist_ok=True)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
    records_in = sum(1 for _ in iter_jsonl(recipe["dataset_path"]))
    left = run_data_juicer(recipe_path, np_override, models_home) if records_in else []
    aesthetics = next(
        (e["image_aesthetics_filter"] for e in recipe["process"] if "image_aesthetics_filter" in e),
        {},
    )
    divisor = aesthetics_divisor(aesthetics.get("hf_scorer_model", ""))
    kept = 0
    with atomic_write(output) as handle:
        if records_in:
            for record in iter_jsonl(export):
                handle.write(dumps_record(normalise_record(record, divisor)) + "\n")
                kept += 1
    if left and left[-1][1] != kept:
        raise RuntimeError(f"data-juicer reported {left[-1][1]} records left but exported {kept}")
    probe = probe_stats or {"records_in": records_in, "dropped": {}}
    stats = envelope(
        "filter",
        probe["records_in"],
        kept,
        {**probe["dropped"], **per_filter_removed(records_in, left)},
        seconds_by_filter={op: seconds for op, _, seconds in left},
        aesthetics_score_divisor=divisor,
    )
    write_stats(stats_path, stats)
    shutil.rmtree(work, ignore_errors=True)
    if keep_work_dir:
        work.mkdir(parents=True)
    return stats
