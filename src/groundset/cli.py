"""`groundset` command line: each pipeline stage outside Snakemake, calling the same functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from groundset import __version__
from groundset.core import layout
from groundset.core.config import (
    ConfigError,
    download_options,
    find_source,
    load_config,
    section_defaults,
)


def _source(config: dict, name: str | None) -> dict:
    """The named source, or the only one when the config has a single source."""
    if name is None:
        if len(config["sources"]) != 1:
            raise ConfigError("--source is required when the config has several sources")
        return config["sources"][0]
    return find_source(config, name)


def positive(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def resource(text: str) -> tuple[str, int | None]:
    """An argparse type: NAME=N, a global resource and its amount ('none': unlimited)."""
    name, _, amount = text.partition("=")
    if not name or not amount:
        raise argparse.ArgumentTypeError(f"expected NAME=N, not {text!r}")
    if amount.lower() == "none":
        return name, None
    return name, positive(amount)


def existing_dir(path: str | None, what: str) -> str | None:
    """`path` if it is a folder (or None); else a ValueError naming the option."""
    if path is not None and not Path(path).is_dir():
        raise ValueError(f"{what} {path}: no such folder")
    return path


def cmd_prefilter(args: argparse.Namespace, config: dict) -> dict:
    """Drop URL-list rows whose metadata fails a later filter."""
    from groundset.stages.prefilter import PrefilterRules, run_prefilter

    source = _source(config, args.source)
    opts = download_options(config, source)
    return run_prefilter(
        args.input or source["url_list"],
        args.outdir,
        args.stats or Path(args.outdir).with_name(Path(args.outdir).name + "_stats.json"),
        PrefilterRules.from_config(config, opts),
        source["save_additional_columns"],
        opts["prefilter"]["batch_rows"],
    )


def cmd_download(args: argparse.Namespace, config: dict) -> dict:
    """Download a (prefiltered) URL list with img2dataset."""
    from groundset.stages.download import download_source

    source = _source(config, args.source)
    return download_source(
        args.input or source["url_list"],
        args.outdir,
        args.stats or Path(args.outdir).with_name(Path(args.outdir).name + "_stats.json"),
        download_options(config, source),
        source["save_additional_columns"],
        serve_dir=source.get("serve_dir"),
    )


def cmd_manifest(args: argparse.Namespace, config: dict) -> dict:
    """Walk img2dataset output into a manifest JSONL."""
    from groundset.stages.manifest import build_manifest

    columns = None
    name = args.source
    if config is not None:
        source = _source(config, args.source)
        name, columns = source["name"], source["save_additional_columns"]
    if name is None:
        raise ConfigError("--source is required without a config")
    return build_manifest(args.input, args.output, name, columns, args.stats)


def cmd_split(args: argparse.Namespace, config: dict) -> dict:
    """Split a manifest into shards."""
    from groundset.stages.split import split_manifest

    shard_size = args.shard_size or config["shard_size"]
    index = split_manifest(args.input, args.outdir, shard_size)
    return {"records": index["records"], "shards": len(index["shards"]), "shard_size": shard_size}


def _models(config: dict, models_dir: str) -> dict[str, str]:
    """The filter models of a config (the stand-ins, built under `models_dir`, when configured)."""
    from groundset.stages.filter.shard import resolve_models
    from groundset.stand_ins import stand_in_models

    filter_cfg = config["filter"]
    stand_in = stand_in_models(models_dir) if filter_cfg["stand_in_models"] else None
    return resolve_models(filter_cfg, stand_in)


def cmd_score(args: argparse.Namespace, config: dict) -> dict:
    """Probe one shard and score every decodable record (all five filters' stats, none removed)."""
    from groundset.stages.filter.score import ScoreFiles, score_probed
    from groundset.stages.filter.select import config_rules
    from groundset.stages.filter.shard import probe_shard

    stem = str(Path(args.output).with_suffix(""))
    files = ScoreFiles(
        shard=args.input,
        probed=stem + "_probed.jsonl",
        dropped=args.dropped or stem + "_dropped.jsonl",
        recipe=stem + "_recipe.yaml",
        scored=args.output,
        stats=args.stats or stem + "_stats.json",
    )
    settings = config["filter"]
    config_rules(settings)  # a template select cannot apply stops here, before any image is read
    threads = args.threads or settings["np"]
    probe = probe_shard(files.shard, files.probed, files.dropped, threads, settings["header_sizes"])
    stats = score_probed(
        files,
        template=settings["template"],
        name=Path(args.output).stem,
        settings=settings,
        models=_models(config, args.models_dir),
        threads=threads,
        probe=probe,
        stand_in=config["filter"]["stand_in_models"],
    )
    return stats


def cmd_select(args: argparse.Namespace, config: dict) -> dict:
    """Apply the config's thresholds to a scored shard: kept, rejected (with why) and counts."""
    from groundset.core.io import iter_jsonl
    from groundset.stages.filter import scoring
    from groundset.stages.filter.select import SelectFiles, config_rules, select_shard
    from groundset.stages.filter.shard import STATS

    stem = str(Path(args.output).with_suffix(""))
    files = SelectFiles(
        scored=args.input,
        kept=args.output,
        rejected=args.rejected or stem + "_rejected.jsonl",
        stats=args.stats or stem + "_stats.json",
    )
    rules = config_rules(config["filter"])
    first = next(iter_jsonl(args.input), None)
    if first is not None and not {scoring.NSFW, scoring.SCORE_ERRORS} & set(first.get(STATS) or {}):
        raise ValueError(
            f"{args.input} holds no scores (its first record has no {scoring.NSFW}): select "
            "reads what `groundset score` wrote"
        )
    return select_shard(files, rules)


def cmd_dj_config(args: argparse.Namespace, config: dict) -> dict:
    """The seed's way: write stock data-juicer's recipe (template + thresholds) for one shard."""
    from groundset.stages.filter.shard import make_dj_config

    filter_cfg = config["filter"]
    work_dir = args.work_dir or str(Path(args.output).with_suffix("")) + "_work"
    name = Path(args.input).stem
    return make_dj_config(
        filter_cfg["template"],
        args.output,
        dataset_path=args.input,
        export_path=str(Path(work_dir) / "export" / f"{name}.jsonl"),
        project_name=args.project_name or f"groundset_filter_{name}",
        work_dir=work_dir,
        filter_cfg=filter_cfg,
        models=_models(config, args.models_dir),
    )


def cmd_filter(args: argparse.Namespace, config: dict) -> dict:
    """The seed's way: run stock data-juicer on a `dj-config` recipe (kept records, counts)."""
    from groundset.stages.filter.shard import filter_shard

    stats = args.stats or str(Path(args.output).with_suffix("")) + "_stats.json"
    return filter_shard(
        args.recipe, args.output, stats, models_home=config["filter"]["models_home"]
    )


def cmd_merge(args: argparse.Namespace, config: dict) -> dict:
    """Merge filtered shards into the aesthetic tiers."""
    from groundset.stages.merge import TIER_FILES, merge_tiers

    outdir = Path(args.outdir)
    return merge_tiers(
        args.inputs,
        (outdir / TIER_FILES[0], outdir / TIER_FILES[1]),
        config["filter"]["aesthetics_tiers"],
        outdir / "merge_stats.json",
    )


def cmd_caption(args: argparse.Namespace, config: dict) -> dict:
    """Grounded captions (caption + entity boxes) for a JSONL file, resumable via its journal."""
    from groundset.stages.caption import Settings, caption_chunk, preflight, stop_on_sigterm

    output = Path(args.output)
    stem = str(output).removesuffix(".jsonl")
    settings = Settings.from_config(config["caption"])
    if not args.reparse:
        preflight(settings)  # key and endpoint, before anything is written
    with stop_on_sigterm():
        return caption_chunk(
            args.input,
            output,
            args.errors or stem + "_errors.jsonl",
            args.stats or stem + "_stats.json",
            args.journal or stem + ".journal.jsonl",
            settings,
            retry_errors=args.retry_errors or config["caption"]["retry_errors"],
            reparse=args.reparse,
        )


def cmd_mask(args: argparse.Namespace, config: dict) -> dict:
    """SAM2 masks for the entity boxes of a captioned JSONL (quality floors applied), resumable."""
    from groundset.stages.mask import (
        MaskChunkFiles,
        Masker,
        MaskGatherFiles,
        MaskSettings,
        gather_masks,
        load_model,
        mask_chunk,
    )

    stem = str(args.output).removesuffix(".jsonl")  # the defaults of the side files
    settings = MaskSettings.from_config(config["mask"])
    files = MaskChunkFiles(  # every entity's mask, as computed (resume state with the journal)
        records=stem + "_all_entities.jsonl",
        dropped=stem + "_all_entities_dropped.jsonl",
        stats=stem + "_all_entities_stats.json",
        masks=args.mask_dir,  # computed right there: DIR/<source>/<image_id>.npy
        journal=args.journal or stem + ".journal.jsonl",
    )
    Path(args.mask_dir).mkdir(parents=True, exist_ok=True)
    mask_chunk(args.input, files, settings, lambda: Masker(*load_model(settings)))
    floored = MaskGatherFiles(
        records=args.output,
        dropped=args.dropped or stem + "_dropped.jsonl",
        stats=args.stats or stem + "_stats.json",
        floored=str(Path(args.mask_dir) / "floored"),  # records that lost entities to a floor
    )
    return gather_masks([files.records], [files.dropped], [files.stats], floored, settings)


def cmd_export_emu3(args: argparse.Namespace, config: dict) -> dict:
    """Emu3 training data: prompts, visual tokens (feature/*.pth), list/datalist.jsonl and train.json."""
    from groundset.exports.emu3 import Emu3Settings, export_emu3

    return export_emu3(args.input, args.outdir, Emu3Settings.from_config(config["export"]["emu3"]))


def cmd_export_coco(args: argparse.Namespace, config: dict | None) -> dict:
    """COCO instances (boxes in pixels, RLE masks, SAM2 scores) with the category mapping beside."""
    from groundset.exports.coco import export_coco

    return export_coco(args.input, args.output, args.categories)


def cmd_export_odvg(args: argparse.Namespace, config: dict | None) -> dict:
    """ODVG grounding lines (caption, regions with pixel boxes and token spans) for Grounding DINO."""
    from groundset.exports.odvg import export_odvg

    return export_odvg(args.input, args.output)


def cmd_export_wds(args: argparse.Namespace, config: dict | None) -> dict:
    """WebDataset tar shards: each image's original bytes and its JSON (caption, boxes, masks)."""
    from groundset.exports.wds import export_wds

    shard_size = args.shard_size
    if shard_size is None and config:
        shard_size = config["export"]["webdataset"]["shard_size"]
    return export_wds(args.input, args.outdir, shard_size)  # None: the schema's default


def cmd_dedup(args: argparse.Namespace, config: dict) -> dict:
    """Keep one record per image: same bytes, same URL or perceptual hashes within max_distance."""
    from groundset.stages.dedup import dedup_records

    section = config["caption"]["dedup"]
    output = Path(args.output)
    stats = args.stats or output.with_name(output.stem + "_stats.json")
    return dedup_records(
        args.input,
        args.output,
        args.dropped,
        stats,
        max_distance=section["max_distance"] if args.max_distance is None else args.max_distance,
        enabled=section["enabled"],
        threads=args.threads or section["threads"],
        cache=args.cache,
    )


def cmd_estimate(args: argparse.Namespace, config: dict) -> dict | None:
    """Per-stage records, wall time, API requests and cost of a run, before it starts."""
    from groundset.tools.estimate import estimate, format_estimate

    result = estimate(
        config,
        existing_dir(args.from_run, "--from-run"),
        measured=not args.no_measured,
        jobs=args.jobs,
        gpus=args.gpus,
        cores=args.cores,
        resources=dict(args.resources or []),
    )
    errors = [f"{s['name']}: {s['error']}" for s in result["sources"] if s.get("error")]
    if errors:  # an estimate of zero rows would mislead: the table, then a failing exit
        args.exit_code = 2
    if args.json:
        return result
    print(format_estimate(result))
    for error in errors:
        print(f"groundset estimate: error: {error}", file=sys.stderr)
    return None


def _unknown(workdir: str, key: str, config: dict | None) -> str:
    """Why a trace found nothing: no stage has run there, no such source, or no such image."""
    from groundset.tools.summary import stats_files
    from groundset.tools.trace import known_sources, parse_key

    sources = known_sources(Path(workdir), config)
    if not any(stats_files(Path(workdir), stage) for stage in layout.STAGES):
        return f"no stage has run in {workdir} yet (is it the run's workdir?)"
    source = parse_key(key, sources)[0]
    if source is not None and source not in sources:
        return f"no source named {source!r} in this run (sources: {', '.join(sources)})"
    return f"{key} is unknown to every stage of this run"


def cmd_trace(args: argparse.Namespace, config: dict) -> dict | None:
    """Every stage's verdict on one image (SOURCE/IMAGE_ID); exit 1 when no stage knows it."""
    from groundset.tools.trace import format_trace, trace

    workdir = existing_dir(args.workdir or config["workdir"], "the run's workdir")
    result = trace(workdir, args.key, config)
    if result is None:
        print(f"groundset trace: {_unknown(workdir, args.key, config)}", file=sys.stderr)
        args.exit_code = 1
        return None
    if args.json:
        return result
    print(format_trace(result))
    return None


def cmd_validate(args: argparse.Namespace, config: dict | None) -> None:
    """Check JSONL files against the record schemas, geometry and files; exit 1 on violations."""
    from groundset.tools.validate import validate_file

    for path in args.files:
        report = validate_file(path, args.stage, check_files=not args.no_files)
        print(report.text())
        if not report.ok:
            args.exit_code = 1


def cmd_stats(args: argparse.Namespace, config: dict | None) -> dict:
    """Entity, box, mask and filter-score statistics of a grounded JSONL (JSON + PNG plots)."""
    from groundset.tools.stats import write_stats

    stats = write_stats(args.input, Path(args.outdir) / "stats.json", Path(args.outdir) / "plots")
    return {k: v for k, v in stats.items() if k != "histograms"}


def cmd_draw(args: argparse.Namespace, config: dict | None) -> dict:
    """Boxes (and masks) drawn over a deterministic sample of records."""
    from groundset.tools.draw import draw_sample

    export = config["export"] if config else section_defaults("export")
    n = export["draw_n"] if args.n is None else args.n
    seed = export["draw_seed"] if args.seed is None else args.seed
    outdir = Path(args.outdir)
    return draw_sample(args.input, outdir / "draw", outdir / "draw_sam2_mask", n, seed)


def cmd_summary(args: argparse.Namespace, config: dict) -> dict | None:
    """Print counts per stage of a run from its stats files."""
    from groundset.tools.summary import collect, format_summary

    summary = collect(args.workdir or config["workdir"], config and config["export"]["formats"])
    if args.json:
        return summary
    print(format_summary(summary))
    return None


def arg(*flags: str, **options) -> tuple[tuple[str, ...], dict]:
    """One option of a command, as `add_argument` takes it."""
    return flags, options


# Every command: its function (whose docstring is its help) and its options.
COMMANDS: dict[str, tuple] = {
    "prefilter": (
        cmd_prefilter,
        [
            arg("--source", help="source name in the config"),
            arg("--input", help="parquet file or folder (default: the source's url_list)"),
            arg("--outdir", required=True, help="folder for the filtered parquet files"),
            arg("--stats", help="stats JSON (default: <outdir>_stats.json)"),
        ],
    ),
    "download": (
        cmd_download,
        [
            arg("--source", help="source name in the config"),
            arg("--input", help="parquet file or folder (default: the source's url_list)"),
            arg("--outdir", required=True, help="img2dataset output folder"),
            arg("--stats", help="stats JSON (default: <outdir>_stats.json)"),
        ],
    ),
    "manifest": (
        cmd_manifest,
        [
            arg("--source", help="source name (recorded in each record)"),
            arg("--input", required=True, help="img2dataset output folder"),
            arg("--output", required=True, help="manifest JSONL to write"),
            arg("--stats", help="stats JSON to write"),
        ],
    ),
    "split": (
        cmd_split,
        [
            arg("--input", required=True, help="manifest JSONL"),
            arg("--outdir", required=True, help="folder for shard_{i}.jsonl and index.json"),
            arg("--shard-size", type=int, help="records per shard (default: config shard_size)"),
        ],
    ),
    "score": (
        cmd_score,
        [
            arg("--input", required=True, help="shard JSONL (e.g. from `groundset split`)"),
            arg("--output", required=True, help="scored JSONL to write"),
            arg("--dropped", help="undecodable records (default: <output>_dropped.jsonl)"),
            arg("--stats", help="counts JSON (default: <output>_stats.json)"),
            arg("--threads", type=int, help="decoding and model threads (default: filter.np)"),
            arg(
                "--models-dir",
                default=os.path.dirname(layout.STAND_IN_MODELS),
                help="where stand-in models go, if configured",
            ),
        ],
    ),
    "select": (
        cmd_select,
        [
            arg("--input", required=True, help="scored JSONL from `groundset score`"),
            arg("--output", required=True, help="kept records (filtered JSONL) to write"),
            arg("--rejected", help="dropped records, with why (default: <output>_rejected.jsonl)"),
            arg("--stats", help="counts JSON (default: <output>_stats.json)"),
        ],
    ),
    "dj-config": (
        cmd_dj_config,
        [
            arg("--input", required=True, help="the (probed) shard data-juicer reads"),
            arg("--output", required=True, help="recipe YAML to write"),
            arg("--work-dir", help="data-juicer work dir (default: <output>_work)"),
            arg("--project-name", help="data-juicer project_name"),
            arg(
                "--models-dir",
                default=os.path.dirname(layout.STAND_IN_MODELS),
                help="where stand-in models go, if configured",
            ),
        ],
    ),
    "filter": (
        cmd_filter,
        [
            arg("--recipe", required=True, help="recipe YAML from `groundset dj-config`"),
            arg("--output", required=True, help="filtered JSONL to write"),
            arg("--stats", help="stats JSON (default: <output>_stats.json)"),
        ],
    ),
    "merge": (
        cmd_merge,
        [
            arg("--inputs", nargs="+", required=True, help="filtered shard JSONL files"),
            arg("--outdir", required=True, help="folder for merged_output.jsonl and aes_6.jsonl"),
        ],
    ),
    "caption": (
        cmd_caption,
        [
            arg("--input", required=True, help="JSONL to caption (e.g. merged/aes_6.jsonl)"),
            arg("--output", required=True, help="captioned JSONL to write"),
            arg("--errors", help="error/drop records (default: <output>_errors.jsonl)"),
            arg("--stats", help="counts JSON (default: <output>_stats.json)"),
            arg(
                "--journal",
                help="answer journal, kept between runs (default: <output>.journal.jsonl)",
            ),
            arg(
                "--retry-errors",
                action="store_true",
                help="ask again for images whose answer was an error",
            ),
            arg(
                "--reparse",
                action="store_true",
                help="no requests: rebuild the outputs from the journal's raw answers (after a parser fix)",
            ),
        ],
    ),
    "mask": (
        cmd_mask,
        [
            arg("--input", required=True, help="captioned JSONL"),
            arg("--output", required=True, help="masked JSONL to write"),
            arg("--mask-dir", required=True, help="folder for <source>/<image_id>.npy"),
            arg("--format", choices=["npy", "rle"], help="override mask.mask_format"),
            arg("--dropped", help="dropped records (default: <output>_dropped.jsonl)"),
            arg("--stats", help="counts JSON (default: <output>_stats.json)"),
            arg("--journal", help="progress journal (default: <output>.journal.jsonl)"),
        ],
    ),
    "export-emu3": (
        cmd_export_emu3,
        [
            arg("--input", required=True, help="masked (or captioned) JSONL"),
            arg("--outdir", required=True, help="folder for feature/ and list/"),
            arg("--no-tokenize", action="store_true", help="prompts and lists only"),
            arg("--tokenizer", help="override export.emu3.tokenizer (a model folder)"),
            arg("--max-items", type=int, help="override export.emu3.max_items"),
        ],
    ),
    "export-coco": (
        cmd_export_coco,
        [
            arg("--input", required=True, help="masked JSONL"),
            arg("--output", required=True, help="COCO JSON to write"),
            arg(
                "--categories",
                help="entity name -> category mapping (default: <output>_categories.json)",
            ),
        ],
    ),
    "export-odvg": (
        cmd_export_odvg,
        [
            arg("--input", required=True, help="masked JSONL"),
            arg("--output", required=True, help="ODVG JSONL to write"),
        ],
    ),
    "export-wds": (
        cmd_export_wds,
        [
            arg("--input", required=True, help="masked JSONL"),
            arg("--outdir", required=True, help="folder for shard-NNNNNN.tar"),
            arg(
                "--shard-size",
                type=positive,
                help="samples per shard (default: export.webdataset.shard_size)",
            ),
        ],
    ),
    "dedup": (
        cmd_dedup,
        [
            arg("--input", required=True, help="records to dedup (e.g. merged/aes_6.jsonl)"),
            arg("--output", required=True, help="kept records (one per image) to write"),
            arg("--dropped", required=True, help="duplicates, each with duplicate_of"),
            arg("--stats", help="counts JSON (default: <output>_stats.json)"),
            arg(
                "--max-distance", type=int, help="phash bits (default: caption.dedup.max_distance)"
            ),
            arg(
                "--threads", type=positive, help="decoding threads (default: caption.dedup.threads)"
            ),
            arg("--cache", help="hash cache kept between runs (default: none)"),
        ],
    ),
    "estimate": (
        cmd_estimate,
        [
            arg(
                "--from-run",
                help="workdir of an earlier run whose benchmarks/ and stats give measured rates "
                "(default: the config's workdir, when it has them)",
            ),
            arg(
                "--no-measured",
                action="store_true",
                help="assumed rates only (ignore earlier runs)",
            ),
            arg(
                "--cores",
                type=positive,
                help="cores of the simulated run (snakemake --cores; default: this machine's, "
                "as the local profile gives)",
            ),
            arg("--jobs", type=positive, help="jobs at once (snakemake --jobs; default: no limit)"),
            arg("--gpus", type=positive, help="the gpu resource (default: the local profile's, 1)"),
            arg(
                "--resources",
                nargs="+",
                type=resource,
                metavar="NAME=N",
                help="global resources (snakemake --resources: mem_mb, gpu, vlm_api, vlm_server; "
                "N 'none' for unlimited; default: the local profile's and the config's)",
            ),
            arg("--json", action="store_true", help="print JSON instead of a table"),
        ],
    ),
    "trace": (
        cmd_trace,
        [
            arg("key", help="SOURCE/IMAGE_ID, as in the records' source and image_id"),
            arg("--workdir", help="the run's workdir (default: the config's workdir)"),
            arg("--json", action="store_true", help="print JSON instead of a table"),
        ],
    ),
    "validate": (
        cmd_validate,
        [
            arg("files", nargs="+", help="JSONL files of any stage"),
            arg(
                "--stage",
                choices=["manifest", "filtered", "captioned", "masked"],
                help="check every record as this stage's (default: detected per record)",
            ),
            arg("--no-files", action="store_true", help="skip image and mask file checks"),
        ],
    ),
    "stats": (
        cmd_stats,
        [
            arg("--input", required=True, help="captioned or masked JSONL"),
            arg("--outdir", required=True, help="folder for stats.json and the plots"),
        ],
    ),
    "draw": (
        cmd_draw,
        [
            arg("--input", required=True, help="captioned or masked JSONL"),
            arg("--outdir", required=True, help="folder for draw/ and draw_sam2_mask/"),
            arg("-n", type=int, help="records to draw (default: export.draw_n)"),
            arg("--seed", type=int, help="sampling seed (default: export.draw_seed)"),
        ],
    ),
    "summary": (
        cmd_summary,
        [
            arg("--workdir", help="the run's workdir (default: the config's workdir)"),
            arg("--json", action="store_true", help="print JSON instead of a table"),
        ],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `groundset` command (one subcommand per COMMANDS entry)."""
    parser = argparse.ArgumentParser(prog="groundset", description=__doc__)
    parser.add_argument("--version", action="version", version=f"groundset {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, options) in COMMANDS.items():
        command = sub.add_parser(name, help=func.__doc__, description=func.__doc__)
        command.add_argument(
            "--config",
            action="append",
            help="config YAML (default: config/config.yaml); give it again to merge another "
            "over it, as snakemake --configfile A B does",
        )
        command.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        command.set_defaults(func=func)
        for flags, kwargs in options:
            command.add_argument(*flags, **kwargs)
    return parser


# The commands that load model weights: their config must name them (or opt in to random ones).
WEIGHTS = {"mask": ("mask",), "export-emu3": ("emu3",)}


def config_overrides(args: argparse.Namespace) -> dict:
    """Config values a command's options set, applied before the config is validated."""
    if args.command == "mask" and args.format:
        return {"mask": {"mask_format": args.format}}
    if args.command == "export-emu3":
        emu3 = {"tokenize": False} if args.no_tokenize else {}
        if args.tokenizer:
            emu3["tokenizer"] = args.tokenizer
        if args.max_items is not None:
            emu3["max_items"] = args.max_items
        return {"export": {"emu3": emu3}}
    return {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `groundset` console command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        needs_config = not (
            (args.command == "manifest" and args.source and not args.config)
            or (args.command == "summary" and args.workdir and not args.config)
            or (
                args.command
                in ("validate", "stats", "draw", "export-coco", "export-odvg", "export-wds")
                and not args.config
            )
        )
        config = None
        if needs_config:
            config = load_config(args.config, config_overrides(args), WEIGHTS.get(args.command, ()))
        result = args.func(args, config)
        if result is not None:
            print(json.dumps(result, indent=2, default=str))
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return getattr(args, "exit_code", 0)
    except (ConfigError, OSError, ValueError, RuntimeError, KeyError, SystemExit) as err:
        print(f"groundset {args.command}: error: {err}", file=sys.stderr)
        return 2
    return getattr(args, "exit_code", 0)


if __name__ == "__main__":
    sys.exit(main())
