"""The workflow's whole check of a config before any job, in one place (common.smk calls it).

Schema and cross-key checks, user paths made absolute against the launch directory, the model
weights they name, and the recipe template's filters: every problem a job would meet later,
found while Snakemake plans, each a line leading with its key.
"""

from __future__ import annotations

import os

from groundset.core.config import ConfigError, download_options, missing_weights, validate_config
from groundset.stages.filter.select import config_rules
from groundset.stages.prefilter import (
    check_columns,
    check_no_provenance,
    list_parquet_files,
    open_parquet,
)

# Config paths (relative to where snakemake was started) a job opens: made absolute first.
LAUNCH_PATHS = (
    ("filter", "template"),
    ("filter", "models_home"),
    ("mask", "checkpoint"),
    ("export", "emu3", "tokenizer"),
)


def launch_path(path: str | None, launch_dir: str | os.PathLike) -> str | None:
    """`path` made absolute against the launch directory (None and "" stay None)."""
    return os.path.join(os.fspath(launch_dir), path) if path else None


def absolute_paths(config: dict, launch_dir: str | os.PathLike) -> None:
    """Make the config's user paths absolute against `launch_dir` (in place)."""
    for source in config["sources"]:
        source["url_list"] = launch_path(source["url_list"], launch_dir)
        source["serve_dir"] = launch_path(source["serve_dir"], launch_dir)
    for *section, key in LAUNCH_PATHS:
        node = config
        for part in section:
            node = node[part]
        node[key] = launch_path(node[key], launch_dir)


def url_list_problems(config: dict) -> list[str]:
    """What the URL lists that exist lack or hold that a job would stop on (their footers read:
    the URL and caption columns, the saved ones, no column named as groundset's provenance);
    one line each, naming the source. A list that is not there is one too: its download parts
    are planned from its footers."""
    problems = []
    for index, source in enumerate(config["sources"]):
        try:
            files = list_parquet_files(source["url_list"])
        except FileNotFoundError as err:
            problems.append(f"sources[{index}].url_list ({source['name']}): {err}")
            continue
        opts = download_options(config, source)
        for path in files:
            try:
                with open_parquet(path) as parquet:
                    names = parquet.schema_arrow.names
                check_columns(path, names, opts["url_col"], opts["caption_col"],
                              source["save_additional_columns"])  # fmt: skip
                check_no_provenance(path, names)
            except ValueError as err:
                problems.append(f"sources[{index}].url_list ({source['name']}): {err}")
    return problems


def run_wide_overrides(config: dict) -> list[str]:
    """Per-source `download` keys that only hold for the whole run (they would be ignored)."""
    return [
        f"sources[{index}].download.max_parallel: a cap over the whole run; set "
        "download.max_parallel instead"
        for index, source in enumerate(config["sources"])
        if "max_parallel" in (source.get("download") or {})
    ]


def workflow_config(
    config: dict, launch_dir: str | os.PathLike, read_url_lists: bool = True
) -> dict:
    """The config a run uses (defaults filled, paths absolute), or ConfigError naming every
    problem a job would meet (schema, weights, URL-list columns, the recipe's filters).
    `read_url_lists` False: the URL lists' footers are not read (a job of a run whose main
    process checked them)."""
    validate_config(config)
    absolute_paths(config, launch_dir)
    problems = missing_weights(config) + run_wide_overrides(config)
    problems += url_list_problems(config) if read_url_lists else []
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(problems))
    try:
        config_rules(config["filter"])  # the filters select applies: before any score job
    except ConfigError as error:
        raise ConfigError(f"invalid configuration:\n{error}") from None
    return config
