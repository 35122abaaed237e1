"""Every file of a run, named once, relative to the workdir: the rules, the CLI and the tools read
these patterns (Snakemake wildcards `{source}`, `{download_part}`, `{shard}`, `{chunk}`, `{part}`) and nothing else.

`STAGES` is the table the inspection tools loop over: for each stage, the rule whose jobs write
it, what it passes on, its side file of drops (one drop line each, `groundset.core.stats`) and
its stats envelope. A stage split into jobs has a per-job entry (`JOB_STAGES`) and a gathered one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    """Where one stage writes: records passed on, drops, stats (patterns under the workdir)."""

    name: str  # the `stage` of its stats envelope and the `drop_stage` of its drop lines
    rule: str  # the rule whose jobs write these files
    records: str | None  # what it passes on (a file or folder pattern)
    dropped: str | None  # its side file of drops (None: it drops nothing, or counts only)
    stats: str  # its stats envelope
    per: str | None = None  # the wildcard its jobs are split over (None: one job)

    def path(self, what: str, **wildcards) -> str:
        """One of this stage's files (`records`, `dropped`, `stats`) with its wildcards filled."""
        return getattr(self, what).format(**wildcards)


def log(rule: str, pattern: str = "") -> str:
    """The log of a rule's job (`pattern`: its wildcards, e.g. "{source}/{shard}")."""
    return f"logs/{rule}/{pattern}.log" if pattern else f"logs/{rule}.log"


def benchmark(rule: str, pattern: str = "") -> str:
    """The benchmark table of a rule's job (as `log`)."""
    return f"benchmarks/{rule}/{pattern}.tsv" if pattern else f"benchmarks/{rule}.tsv"


# download: per download part (groundset.stages.parts), a source's URL list cut by rows
PARTS = "url_lists/{source}_parts.json"  # the source's plan of parts (which are current)
URL_LISTS = "url_lists/{source}"
PREFILTER = Stage(
    "prefilter",
    "prefilter_urls",
    "url_lists/{source}/{download_part}.parquet",
    "url_lists/{source}/{download_part}_dropped.parquet",  # drop lines as parquet: lists are big
    "url_lists/{source}/{download_part}_stats.json",
    "download_part",
)
DOWNLOADS = "downloads/{source}"
DOWNLOAD = Stage(
    "download",
    "download_part",
    "downloads/{source}/{download_part}",  # img2dataset's output folder of the part
    "downloads/{source}/{download_part}_dropped.jsonl",  # the rows img2dataset gave no image
    "downloads/{source}/{download_part}_stats.json",
    "download_part",
)

# filter: per download part, so that a part added later leaves the shards already scored as
# they are and a part's shards are scored while later parts still download
MANIFEST = Stage(
    "manifest",
    "build_manifest",
    "manifest/{source}/{download_part}.jsonl",
    "manifest/{source}/{download_part}_dropped.jsonl",
    "manifest/{source}/{download_part}_stats.json",
    "download_part",
)
SHARD_INDEX = "shards/{source}/{download_part}/index.json"
SHARD = "shards/{source}/{download_part}/shard_{shard}.jsonl"
DJ_CONFIG = "dj_configs/{source}/{download_part}/shard_{shard}.yaml"
STAND_IN_MODELS = "models/stand_in/models.json"
PROBED = "probed/{source}/{download_part}/shard_{shard}.jsonl"
SCORE = Stage(
    "score",
    "score_shard",
    "scored/{source}/{download_part}/shard_{shard}.jsonl",
    "probed/{source}/{download_part}/shard_{shard}_dropped.jsonl",
    "scored/{source}/{download_part}/shard_{shard}_stats.json",
    "shard",
)
SELECT = Stage(
    "select",
    "select_shard",
    "filtered/{source}/{download_part}/shard_{shard}.jsonl",
    "rejected/{source}/{download_part}/shard_{shard}.jsonl",
    "filtered/{source}/{download_part}/shard_{shard}_stats.json",
    "shard",
)
MERGED = "merged/merged_output.jsonl"
AES_6 = "merged/aes_6.jsonl"
MERGE = Stage("merge", "merge_tiers", MERGED, None, "merged/merge_stats.json")

# caption
DEDUP = Stage(
    "dedup", "dedup_records", "dedup/deduped.jsonl", "dedup/dropped.jsonl", "dedup/dedup_stats.json"
)
HASH_CACHE = "dedup/hash_cache.sqlite"
CHUNK_INDEX = "captioned/chunks.json"
PREFLIGHT = "captioned/preflight.json"
CAPTION_JOURNALS = "captioned/journal"
CAPTION_JOURNAL = "captioned/journal/chunk_{chunk}.jsonl"
CAPTION_CHUNK = Stage(
    "caption",
    "caption_chunk",
    "captioned/chunk_{chunk}.jsonl",
    "captioned/chunk_{chunk}_errors.jsonl",
    "captioned/chunk_{chunk}_stats.json",
    "chunk",
)
CAPTION = Stage(
    "caption",
    "gather_captions",
    "captioned/captioned.jsonl",
    "captioned/errors.jsonl",
    "captioned/caption_stats.json",
)

# mask
MASK_JOURNALS = "masked/journal"
MASK_JOURNAL = "masked/journal/chunk_{chunk}.jsonl"
MASK_STORE = "masked/store"
CHUNK_MASKS = "masks/chunk_{chunk}"
FLOORED_MASKS = "masks/floored"
MASK_CHUNK = Stage(
    "mask",
    "mask_chunk",
    "masked/chunk_{chunk}.jsonl",
    "masked/chunk_{chunk}_dropped.jsonl",
    "masked/chunk_{chunk}_stats.json",
    "chunk",
)
MASK = Stage(
    "mask", "gather_masks", "masked/masked.jsonl", "masked/dropped.jsonl", "masked/mask_stats.json"
)

# exports
EMU3_PART = Stage(
    "emu3",
    "emu3_part",
    "export/emu3/list/parts/part_{part}.jsonl",
    "export/emu3/list/parts/error_{part}.jsonl",
    "export/emu3/list/parts/stats_{part}.json",
    "part",
)
EMU3 = Stage(
    "emu3",
    "gather_emu3",
    "export/emu3/list/datalist.jsonl",
    "export/emu3/list/error.jsonl",
    "export/emu3/emu3_stats.json",
)
EMU3_FEATURES = "export/emu3/feature"
EMU3_PART_FEATURES = "export/emu3/feature/part_{part}"
EMU3_JOURNAL = "export/emu3/journal/part_{part}.jsonl"
EMU3_STORE = "export/emu3/journal/part_{part}"
EMU3_TRAIN = "export/emu3/list/train.json"
EMU3_PROMPTS = "export/emu3/list/prompts.json"
COCO = Stage(
    "coco",
    "export_coco",
    "export/coco/coco.json",
    "export/coco/coco_skipped.jsonl",
    "export/coco/coco_stats.json",
)
COCO_CATEGORIES = "export/coco/coco_categories.json"
ODVG = Stage(
    "odvg",
    "export_odvg",
    "export/odvg/odvg.jsonl",
    "export/odvg/odvg_skipped.jsonl",
    "export/odvg/odvg_stats.json",
)
WEBDATASET = Stage(
    "webdataset", "export_wds", "export/wds", "export/wds_skipped.jsonl", "export/wds_stats.json"
)
ENTITY_STATS = "export/stats/stats.json"
ENTITY_PLOTS = "export/stats/plots"
DRAWINGS = "export/draw"
MASK_DRAWINGS = "export/draw_sam2_mask"
STAGE_COUNTS = "export/stage_counts.json"
STAGE_COUNTS_HTML = "export/stage_counts.html"
VALIDATED = "validated/report.txt"

# The stages in pipeline order, gathered (what summary, estimate and trace loop over) ...
STAGES = (PREFILTER, DOWNLOAD, MANIFEST, SCORE, SELECT, MERGE, DEDUP, CAPTION, MASK)
EXPORTS = {"emu3": EMU3, "coco": COCO, "odvg": ODVG, "webdataset": WEBDATASET}
# ... and, for the stages split over chunks or parts, their per-job files.
JOB_STAGES = {"caption": CAPTION_CHUNK, "mask": MASK_CHUNK, "emu3": EMU3_PART}


def beside(path: str | os.PathLike, tail: str, folder: bool = False) -> Path:
    """The default side file of an output (its drops, its stats): `<stem><tail>` beside a file,
    `<name><tail>` beside a folder (a source name such as `aes_v2_4.75` has a dot)."""
    path = Path(path)
    return path.with_name(f"{path.name if folder else path.stem}{tail}")


def under(workdir: str | os.PathLike, pattern: str, **wildcards) -> str:
    """A layout pattern with its wildcards filled, under `workdir`."""
    return os.path.join(os.fspath(workdir), pattern.format(**wildcards))
