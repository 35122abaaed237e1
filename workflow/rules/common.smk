import functools
import os
import re

from snakemake.exceptions import WorkflowError

from groundset.stages.caption import Settings, uses_stand_in
from groundset.checks import workflow_config
from groundset.core.config import ConfigError, download_options, find_source
from groundset.stages.prefilter import PROVENANCE, PrefilterRules
from groundset.stages.split import read_index
from groundset.stages.parts import NAME_PATTERN as PART_NAME
from groundset.stages.parts import find_part, plan_parts, url_list_root
from groundset.core import layout
import groundset.stages.caption
import groundset.stages.download
import groundset.exports.emu3
import groundset.stages.filter.shard
import groundset.stages.filter.score
import groundset.stages.filter.select
import groundset.stages.mask

# The whole config check before any job (groundset.checks): schema and cross-key checks, user
# paths made absolute against where snakemake was started (LAUNCH_DIR, see the Snakefile), the
# weights they name, the recipe's filters. One line per problem, each leading with its key path
# (a WorkflowError: Snakemake prints it without a traceback).
try:
    # the URL lists' footers once, where the run is planned, not again in every job
    workflow_config(config, LAUNCH_DIR, read_url_lists=workflow.is_main_process)
except ConfigError as error:
    raise WorkflowError(str(error)) from None

SOURCES = [source["name"] for source in config["sources"]]

# The captioning quota holds across the run: at most `vlm_api` captioning jobs at once (from
# --resources, else caption.api_jobs), each pacing itself at rate_per_second / vlm_api.
API_JOBS = workflow.global_resources.setdefault("vlm_api", config["caption"]["api_jobs"]).value
# With caption.serve.command each caption job starts its own server on its own GPUs: at most
# `vlm_server` of them at once (from --resources, else caption.serve.instances), no quota.
SERVE = config["caption"]["serve"]
SERVING = bool(SERVE["command"])
workflow.global_resources.setdefault("vlm_server", SERVE["instances"])
if not SERVING and not uses_stand_in(Settings.from_config(config["caption"])):

    envvars:
        config["caption"]["api_key_env"],


# Small bookkeeping rules run inside the snakemake process, not as cluster jobs.
localrules:
    all,
    plan_parts,
    index_chunks,
    select_shard,
    gather_captions,
    gather_masks,
    gather_emu3,
    stage_counts,


# At most download.max_parallel download parts at once (from --resources, else the config;
# none: no limit).
if config["download"]["max_parallel"] is not None:
    workflow.global_resources.setdefault("download_parts", config["download"]["max_parallel"])


wildcard_constraints:
    source="|".join(re.escape(name) for name in SOURCES),
    download_part=PART_NAME,
    shard=r"\d+",
    chunk=r"\d+",
    part=r"\d+",


def source_config(wildcards):
    """The config entry of the source named by the `source` wildcard."""
    return find_source(config, wildcards.source)


def source_download(wildcards):
    """Effective img2dataset settings of a source (global `download` plus its overrides)."""
    return download_options(config, source_config(wildcards))


def img2dataset_options(wildcards):
    """The img2dataset keys of a source that change its downloads (groundset.stages.download's
    OUTPUT_KEYS; the job reads the tuning knobs, processes and threads, from the config)."""
    return groundset.stages.download.output_options(source_download(wildcards))


def prefilter_rules(wildcards):
    """Thresholds of the pre-download filter of a source, from the filter stage's keys."""
    return vars(PrefilterRules.from_config(config, source_download(wildcards)))


@functools.cache
def source_parts(source):
    """The download parts of a source (groundset.stages.parts), from its URL list's footers."""
    opts = download_options(config, find_source(config, source))
    return plan_parts(find_source(config, source)["url_list"], opts["part_rows"])


def download_part(wildcards):
    """The download part named by the wildcards."""
    return find_part(source_parts(wildcards.source), wildcards.download_part)


def part_file(wildcards):
    """The URL-list file of the part named by the wildcards."""
    root = url_list_root(source_config(wildcards)["url_list"])
    return str(root / download_part(wildcards).file)


def source_manifests(source):
    """The manifests of every download part of a source."""
    names = [part.name for part in source_parts(source)]
    return expand(layout.MANIFEST.records, source=source, download_part=names)


def download_threads(wildcards):
    """img2dataset processes for a source (Snakemake caps it at the available cores)."""
    return source_download(wildcards)["processes_count"]


def shard_ids(source, part):
    """Shard indices of a download part, known once its manifest is indexed (checkpoint)."""
    index = checkpoints.index_shards.get(source=source, download_part=part).output.index
    return [entry["shard"] for entry in read_index(index)["shards"]]


def part_filtered(source, part):
    """Filtered shards of a download part (one data-juicer job each)."""
    return expand(layout.SELECT.records, source=source, download_part=part,
                  shard=shard_ids(source, part))  # fmt: skip


def filtered_shards(wildcards):
    """Input function of the merge: every filtered shard of every part of every source."""
    return [path for source in SOURCES for part in source_parts(source)
            for path in part_filtered(source, part.name)]  # fmt: skip


# Plain values, not input functions: per-shard jobs are many, and each function call costs
# Snakemake time while it plans.
# The stand-in models' marker when `filter.stand_in_models` is on (sample and tests).
STAND_IN_MODELS = [layout.STAND_IN_MODELS] if config["filter"]["stand_in_models"] else []
# What a shard's scores depend on (groundset.stages.filter.score.SCORE_KEYS: models, precision, decode): the
# score job's params; the tuning knobs (threads, batch size, device) are read by the job from
# the config, so changing one marks no shard stale. The thresholds are the select job's params.
SCORE_SETTINGS = groundset.stages.filter.score.score_settings(config["filter"])
SELECT_SETTINGS = groundset.stages.filter.shard.select_settings(config["filter"])


def part_targets(source, part):
    """Input function of `all` for one download part: its filtered shards.

    One function per part, so that each part's checkpoint is awaited on its own and all parts
    run in parallel; listing per-shard outputs remakes a deleted one.
    """

    def targets(wildcards):
        return part_filtered(source, part)

    targets.__name__ = f"targets_of_{source}_{part}"
    return targets


# Planned where the run is planned (a job's own process needs no targets of `all`).
ALL_TARGETS = [
    part_targets(source, part.name)
    for source in (SOURCES if workflow.is_main_process else [])
    for part in source_parts(source)
]
# The plans of the parts: a file added or removed rewrites its source's (and reruns the merge)
PLANS = expand(layout.PARTS, source=SOURCES)
MERGED = [layout.MERGED, layout.AES_6]


def caption_settings(wildcards):
    """The captioning keys that change a chunk's outputs (groundset.stages.caption.OUTPUT_KEYS).

    The job reads the tuning knobs (pacing, retries, timeouts, concurrency: TUNING_KEYS) out of
    the config, so changing one marks no chunk stale; the key is in neither.
    """
    return groundset.stages.caption.output_settings(config["caption"])


CHUNK_INDEX = layout.CHUNK_INDEX
# What the caption chunks read: caption.input with its duplicates removed (or, with
# caption.dedup.enabled false, passed on whole).
DEDUPED = layout.DEDUP.records
# All three are targets of `all`, so a killed or deleted dedup output is made again (stats too)
DEDUP = [DEDUPED, layout.DEDUP.dropped, layout.DEDUP.stats]


def chunk_outputs(pattern):
    """`pattern` for every caption chunk of the chunk index (none until the index exists).

    The gathers also take the index itself as a plain input, so whenever index_chunks runs,
    Snakemake re-evaluates them with the index it wrote. That is what keeps the plan right
    when the caption input changes: the index_shards checkpoint upstream makes Snakemake's
    first planning pass take a stale index as up to date (merge_tiers's rerun is only seen
    in the second pass), and a gather planned from it alone would never be revisited. The
    gathers check the chunks they get against the index (groundset.core.io.check_chunk_plan).
    Before the index exists, no checkpoint is asked: a pending `checkpoints.get()` marks the
    job incomplete and Snakemake post-processes the whole DAG twice after every update (a
    sixth of planning 10,000 shards, bench/bench_dryrun.py).
    """
    if not os.path.exists(CHUNK_INDEX):
        return []
    index = checkpoints.index_chunks.get().output.index
    return expand(pattern, chunk=range(len(read_index(index)["shards"])))


def caption_chunks(wildcards):
    """Input function of the caption gather (unpack): every chunk's records, errors and stats."""
    return {
        "chunks": chunk_outputs(layout.CAPTION_CHUNK.records),
        "errors": chunk_outputs(layout.CAPTION_CHUNK.dropped),
        "stats": chunk_outputs(layout.CAPTION_CHUNK.stats),
    }


def mask_chunks(wildcards):
    """Input function of the mask gather (unpack): every chunk's records, drops and stats."""
    return {
        "chunks": chunk_outputs(layout.MASK_CHUNK.records),
        "dropped": chunk_outputs(layout.MASK_CHUNK.dropped),
        "stats": chunk_outputs(layout.MASK_CHUNK.stats),
    }


CAPTIONED = [layout.CAPTION.records]
MASKED = [layout.MASK.records]
VALIDATED = [layout.VALIDATED]
# The mask and Emu3 keys their jobs' outputs depend on (OUTPUT_KEYS of groundset.stages.mask and
# groundset.exports.emu3): the params. The tuning knobs (batch sizes, devices, decode workers) are read
# by the jobs from the config, so changing one marks nothing stale.
MASK_SETTINGS = groundset.stages.mask.output_settings(config["mask"])
# The quality floors: the mask gather's params (changing one reruns no mask job).
MASK_FLOORS = groundset.stages.mask.floor_settings(config["mask"])
EMU3_SETTINGS = groundset.exports.emu3.output_settings(config["export"]["emu3"])
# the parts are also the outputs' partitioning: each part holds its hash share of the records
EMU3_PARTS = EMU3_SETTINGS["parts"]
# tokenizing needs a GPU (resource gpu); prompts-only export does not
EMU3_GPUS = config["export"]["emu3"]["gpus"] if EMU3_SETTINGS["tokenize"] else 0
# The training formats of export.formats: each one's files (rule all's, the validator's inputs).
FORMATS = config["export"]["formats"]
EMU3 = [layout.EMU3_TRAIN] if "emu3" in FORMATS else []
EMU3_DATALIST = {"emu3": layout.EMU3.records} if "emu3" in FORMATS else {}
COCO = {"coco": layout.COCO.records} if "coco" in FORMATS else {}
ODVG = {"odvg": layout.ODVG.records} if "odvg" in FORMATS else {}
WDS = {"wds": layout.WEBDATASET.records} if "webdataset" in FORMATS else {}
EXPORTS = [*COCO.values(), *ODVG.values(), *WDS.values()]
COUNTS = [layout.STAGE_COUNTS]
EXPORTED = [layout.ENTITY_STATS, layout.DRAWINGS, layout.MASK_DRAWINGS]
