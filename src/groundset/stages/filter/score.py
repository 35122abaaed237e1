"""Score stage: every decodable record of a shard gets all five filters' stats, none removed.

`score_shard` takes one shard through its steps, each leaving its file: the slice of the
manifest (`split.write_shard`), the probe (`filter.probe_shard`: undecodable records leave with a
reason; their header sizes become the shape and aspect stats), the scoring recipe (the
template's global keys, the groundset op `groundset_image_scores_filter` with the models and
how to run them) and data-juicer's run of it. The output holds every probed record with its
complete `__dj__stats__` (aesthetics on LAION's 0-10 scale). No threshold is involved: the
select step applies them, so re-tuning one costs seconds, not a re-score.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from groundset.core.config import TUNING, keys_for, pick_keys
from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.stats import envelope, write_stats
from groundset.stages.filter import scoring
from groundset.stages.filter.shard import STATS, probe_shard, run_data_juicer
from groundset.stages.split import write_shard

# `filter:` keys that change the scores (the score job's params): which models, how they see
# the image and in which precision. Thresholds are select's business.
SCORE_KEYS = keys_for("filter", "score")
# How fast and where a shard is scored, never what: read from the config at run time.
SCORE_TUNING_KEYS = keys_for("filter", "score", TUNING)


def score_settings(section: dict) -> dict:
    """The keys of a `filter:` section that change a shard's scores (the score job's params)."""
    return pick_keys(section, SCORE_KEYS)


def with_tuning(settings: dict, section: dict) -> dict:
    """A score job's settings: its params plus the config's tuning knobs."""
    return pick_keys(section, SCORE_TUNING_KEYS, settings)


def score_recipe(
    template: dict,
    *,
    dataset_path: str,
    export_path: str,
    project_name: str,
    work_dir: str,
    models: dict[str, str],
    settings: dict,
    threads: int,
) -> dict:
    """The scoring recipe of one shard: the template's global keys, the groundset op only."""
    recipe = {k: copy.deepcopy(v) for k, v in template.items() if k != "process"}
    recipe.update(
        project_name=project_name,
        dataset_path=str(Path(dataset_path).resolve()),
        export_path=str(Path(export_path).resolve()),
        work_dir=str(Path(work_dir).resolve()),
        np=1,  # one process; the op decodes with `threads` threads and batches the models
        keep_stats_in_res_ds=True,
        open_tracer=False,  # nothing is removed: nothing to trace
        custom_operator_paths=[scoring.dj_ops_path()],
    )
    recipe["process"] = [
        {
            "groundset_image_scores_filter": {
                "hf_nsfw_model": models["nsfw"],
                "hf_watermark_model": models["watermark"],
                "hf_scorer_model": models["aesthetics"],
                "precision": settings["precision"],
                "decode": settings["decode"],
                "device": settings["device"],
                "batch_size": settings["batch_size"],
                "threads": threads,
            }
        }
    ]
    return recipe


def normalise_scores(record: dict) -> dict:
    """A data-juicer output record in the DESIGN.md shape: stats sorted, no empty error list."""
    stats = dict(record.get(STATS) or {})
    if not any(stats.get(scoring.SCORE_ERRORS) or []):
        stats.pop(scoring.SCORE_ERRORS, None)
    record[STATS] = {key: stats[key] for key in sorted(stats) if stats[key] is not None}
    return record


@dataclass(frozen=True)
class ScoreFiles:
    """What one shard's score job writes (the rule's outputs have the same names)."""

    shard: str  # the slice of the manifest (split)
    probed: str  # its decodable records, with header sizes: data-juicer's input
    dropped: str  # the undecodable ones, each with its drop_reason
    recipe: str  # the scoring recipe
    scored: str  # every probed record with all five stats
    stats: str  # counts and timings of the probe and the scoring
    work: str = ""  # data-juicer's work folder, removed at the end; default <scored stem>_work

    def __post_init__(self) -> None:
        """Default the work folder to one beside the scores (never the current directory)."""
        if not self.work:
            object.__setattr__(self, "work", self.scored.removesuffix(".jsonl") + "_work")


def run_scoring(recipe: dict, files: ScoreFiles, models_home: str | None) -> tuple[int, float]:
    """Run data-juicer on the scoring recipe; write the scored records; return (count, seconds)."""
    work = Path(files.work)
    if work.exists():
        shutil.rmtree(work)  # a killed run's leftovers: start this shard afresh
    work.mkdir(parents=True)
    with atomic_write(files.recipe) as handle:
        yaml.safe_dump(recipe, handle, sort_keys=False)
    records_in = sum(1 for _ in iter_jsonl(files.probed))
    start = time.perf_counter()
    if records_in:
        os.environ["HF_DATASETS_CACHE"] = str(work / "hf_cache")
        # data-juicer refuses to load a custom op file twice in one process (a second shard
        # scored in-process): forget the module, the op registers itself once
        for name, module in list(sys.modules.items()):
            if getattr(module, "__file__", None) == scoring.dj_ops_path():
                del sys.modules[name]
        run_data_juicer(files.recipe, models_home=models_home)
    seconds = time.perf_counter() - start
    count = 0
    with atomic_write(files.scored) as out:
        if records_in:
            for record in iter_jsonl(recipe["export_path"]):
                out.write(dumps_record(normalise_scores(record)) + "\n")
                count += 1
    if count != records_in:
        raise RuntimeError(
            f"data-juicer scored {count} of {records_in} records of {files.probed}: a batch was "
            f"lost (see the log above); nothing was written as complete"
        )
    shutil.rmtree(work, ignore_errors=True)
    return count, seconds


def score_probed(
    files: ScoreFiles,
    *,
    template: str | os.PathLike,
    name: str,
    settings: dict,
    models: dict[str, str],
    threads: int = 1,
    probe: dict | None = None,
    stand_in: bool = False,
) -> dict:
    """Score an already probed shard (`files.probed`): recipe, data-juicer, scored file, stats
    (`stand_in`: the models are groundset's random stand-ins, as the stats say)."""
    with open(template, encoding="utf-8") as handle:
        template_cfg = yaml.safe_load(handle) or {}
    recipe = score_recipe(
        template_cfg,
        dataset_path=files.probed,
        export_path=os.path.join(files.work, "export", f"{name}.jsonl"),
        project_name=f"groundset_score_{name}",
        work_dir=files.work,
        models=models,
        settings=settings,
        threads=threads,
    )
    count, seconds = run_scoring(recipe, files, settings.get("models_home"))
    device = scoring.resolve_device(settings["device"])
    probe = probe or {"records_in": count, "dropped": {}}
    stats = envelope(
        "score",
        probe["records_in"],
        count,
        probe["dropped"],
        seconds=round(seconds, 3),
        images_per_second=round(count / seconds, 3) if seconds > 0 and count else None,
        device=device,
        precision=scoring.resolve_precision(settings["precision"], device),
        decode=settings["decode"],
        stand_in=stand_in,
    )
    write_stats(files.stats, stats)
    return stats


def score_shard(index: dict, shard: int, files: ScoreFiles, **scoring_args) -> dict:
    """Slice shard `shard` from the indexed manifest, probe it, score it (`scoring_args`: those
    of `score_probed` but `probe`; `settings` with the tuning knobs, see `with_tuning`)."""
    write_shard(index, shard, files.shard)
    threads = scoring_args.get("threads", 1)
    header_sizes = scoring_args["settings"]["header_sizes"]
    probe = probe_shard(files.shard, files.probed, files.dropped, threads, header_sizes)
    return score_probed(files, probe=probe, **scoring_args)
