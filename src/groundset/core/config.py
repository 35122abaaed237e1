"""Load and validate `config/config.yaml` against the workflow's JSON schema, filling defaults."""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import re
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from groundset.core.prompts import template_problem

# The schemas ship inside the package (package data; in the repository `schemas` is a link to
# workflow/schemas, the one copy), so an installed groundset validates configs too.
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
REPO_ROOT = Path(__file__).resolve().parents[3]  # src/groundset/core/config.py -> the repository
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"
# The checkpoint file of each SAM2 model config (sam2.1_hiera_l.yaml -> sam2.1_hiera_large.pt).
SAM2_SIZES = {"t": "tiny", "s": "small", "b+": "base_plus", "l": "large"}


# The models whose weights a run loads (SAM2 for masks, the Emu3 vision tokenizer).
MODELS = ("mask", "emu3")


class ConfigError(ValueError):
    """A configuration file that does not match the schema."""


def _with_defaults(validator_class: type) -> type:
    """Extend a validator so that validating also fills `default` values (deep-copied)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


@functools.cache
def _read_schema(name: str) -> dict:
    """The parsed `schemas/<name>.schema.yaml`, read once per process (callers get copies)."""
    path = SCHEMA_DIR / f"{name}.schema.yaml"
    if not path.exists():
        raise FileNotFoundError(f"schema {path} not found (groundset installed without its data?)")
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def load_schema(name: str = "config") -> dict:
    """Read the package's `schemas/<name>.schema.yaml` (workflow/schemas in the repository)."""
    return copy.deepcopy(_read_schema(name))


def section_schema(path: str) -> dict:
    """The part of the config schema under a dotted key path (`caption`, `export.emu3`)."""
    node = _read_schema("config")
    for part in path.split("."):
        node = node.get("properties", {}).get(part)
        if not isinstance(node, dict):
            raise KeyError(f"the config schema has no section {path!r}")
    return copy.deepcopy(node)


def fill_section(path: str, values: dict | None = None, source: str = "config") -> dict:
    """A copy of one config section (e.g. `caption`) validated against its part of the schema,
    defaults filled; ConfigError naming each bad key by its full path (`caption.backend: ...`)."""
    section = copy.deepcopy(values) if values is not None else {}
    validator = _with_defaults(Draft202012Validator)(section_schema(path))
    errors = sorted(validator.iter_errors(section), key=lambda e: [str(p) for p in e.absolute_path])
    prefix = path.split(".")
    _raise(source, [line for e in errors for line in _schema_problems(e, prefix)])
    return section


def section_defaults(path: str) -> dict:
    """The schema's defaults of one config section (nested sections filled too), a fresh copy."""
    return fill_section(path, {})


def key_path(parts: Iterable[str | int]) -> str:
    """A config key path as users write it: `filter.aesthetics.min_score`, `sources[0].name`."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text or "<top level>"


def _raise(source: str, problems: list[str]) -> None:
    """Raise one ConfigError listing every problem, one line each, if there are any."""
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise ConfigError(f"{source}: invalid configuration ({count}):\n" + "\n".join(problems))


def validate_config(
    config: dict, source: str = "config", weights: Collection[str] = MODELS
) -> dict:
    """Validate a config dict in place, filling defaults; raise ConfigError naming each bad key.

    `weights`: the models (of MODELS) whose weights must be set, as the run will load them."""
    validator = _with_defaults(Draft202012Validator)(load_schema("config"))
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    _raise(source, [line for e in errors for line in _schema_problems(e, [])])
    return sort_keys(check_config(config, source, weights))


def sort_keys(value: Any) -> Any:
    """`value` with every mapping's keys in sorted order, in place: the jobs' params (parts of
    the config) then do not depend on the order the keys were written in. Snakemake compares
    params as text, so a reordered or rewritten config file would otherwise rerun every job."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: str(item[0]))
        value.clear()
        value.update((key, sort_keys(item)) for key, item in items)
    elif isinstance(value, list):
        value[:] = [sort_keys(item) for item in value]
    return value


def _schema_problems(error, prefix: list) -> list[str]:
    """One line per problem of a schema error (its key path under `prefix` first); an unknown
    key is named by its own path, with the known key it most resembles (a typo)."""
    where = [*prefix, *error.absolute_path]
    known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
    if error.validator != "additionalProperties" or not isinstance(error.instance, dict):
        return [f"{key_path(where)}: {error.message}"]
    lines = []
    for key in sorted(set(error.instance) - set(known)):
        line = f"{key_path([*where, key])}: unknown key"
        close = difflib.get_close_matches(key, list(known), n=1)
        if close:
            line += f" (did you mean {key_path([*where, close[0]])}?)"
        lines.append(line)
    return lines


def check_config(config: dict, source: str = "config", weights: Collection[str] = MODELS) -> dict:
    """What the schema cannot express: one line per problem, each leading with its key path."""
    problems = (
        _source_problems(config)
        + _threshold_problems(config)
        + _caption_problems(config)
        + _weight_problems(config, weights)
        + _prompt_problems(config)
    )
    _raise(source, problems)
    return config


def _source_problems(config: dict) -> list[str]:
    """Unique source names; per-source download overrides valid and able to pass the filter."""
    names = [s["name"] for s in config["sources"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    problems = [f"sources: duplicate source names: {', '.join(dupes)}"] if dupes else []
    download_schema = load_schema("config")["properties"]["download"]
    for i, src in enumerate(config["sources"]):
        merged = download_options(config, src)
        errors = list(Draft202012Validator(download_schema).iter_errors(merged))
        problems += [
            f"{key_path(['sources', i, 'download', *e.absolute_path])}: {e.message}" for e in errors
        ]
        if errors:
            continue
        overridden = {"image_size", "resize_mode"} & set(src.get("download") or {})
        where = ["sources", i, "download"] if overridden else ["download"]
        problem = _resize_problem(merged, config["filter"]["image_shape"], where)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def _resize_problem(options: dict, shape: dict, where: list) -> str | None:
    """img2dataset resizing every image below filter.image_shape (the filter would drop all)."""
    size, mode = options["image_size"], options["resize_mode"]
    low, high = sorted((shape["min_width"], shape["min_height"]))
    # keep_ratio: the short side becomes image_size; the others: no side exceeds image_size
    limit = low if mode == "keep_ratio" else high
    if mode == "no" or size >= limit:
        return None
    return (
        f"{key_path([*where, 'image_size'])}: {size} with resize_mode {mode} leaves every image "
        f"smaller than filter.image_shape ({shape['min_width']} x {shape['min_height']}), so the "
        "filter drops them all; raise image_size or lower filter.image_shape"
    )


def _threshold_problems(config: dict) -> list[str]:
    """Ranges that select nothing: min above max, aesthetic tiers out of order or out of range."""
    filt = config["filter"]
    ratio, aes, tiers = filt["aspect_ratio"], filt["aesthetics"], filt["aesthetics_tiers"]
    problems = []
    if ratio["min_ratio"] > ratio["max_ratio"]:
        problems.append(
            f"filter.aspect_ratio.min_ratio: {ratio['min_ratio']} is greater than "
            f"filter.aspect_ratio.max_ratio {ratio['max_ratio']}, so no image passes"
        )
    if aes["min_score"] > aes["max_score"]:
        problems.append(
            f"filter.aesthetics.min_score: {aes['min_score']} is greater than "
            f"filter.aesthetics.max_score {aes['max_score']}, so no image passes"
        )
    if list(tiers) != sorted(tiers):
        problems.append(
            f"filter.aesthetics_tiers: {tiers} must be non-decreasing "
            "(merged_output.jsonl keeps >= the first, aes_6.jsonl >= the second)"
        )
    outside = [t for t in tiers if not aes["min_score"] <= t <= aes["max_score"]]
    if outside:
        problems.append(
            f"filter.aesthetics_tiers: {outside} outside [filter.aesthetics.min_score, "
            f"filter.aesthetics.max_score] = [{aes['min_score']}, {aes['max_score']}]: the filter "
            "keeps only that range (a tier below it keeps what min_score keeps, one above nothing)"
        )
    return problems


def _caption_problems(config: dict) -> list[str]:
    """Back-off bounds in order; a server command that the jobs can start and talk to."""
    caption = config["caption"]
    problems = []
    if caption["backoff_base_s"] > caption["backoff_cap_s"]:
        problems.append(
            f"caption.backoff_base_s: {caption['backoff_base_s']} is greater than "
            f"caption.backoff_cap_s {caption['backoff_cap_s']}"
        )
    command = caption["serve"]["command"]
    if command is None:
        return problems
    if "{port}" not in command:
        problems.append(
            "caption.serve.command: must contain {port} (each caption job starts its server on "
            f"a free port): {command!r}"
        )
    if caption["backend"] != "openai":
        problems.append(
            f"caption.backend: {caption['backend']!r}, but the servers caption.serve.command "
            "starts speak the OpenAI protocol: set caption.backend: openai"
        )
    if caption["base_url"]:
        problems.append(
            f"caption.base_url: {caption['base_url']!r} must be null with caption.serve.command "
            "(the jobs talk to the servers they start)"
        )
    if caption["stand_in"] is True:
        problems.append(
            "caption.stand_in: true starts the in-process stand-in; with caption.serve.command "
            "set it to false (serve the stand-in with python -m groundset.testing.vlm)"
        )
    return problems


def _prompt_problems(config: dict) -> list[str]:
    """An Emu3 prompt template that cannot be written and read back (checked before any job)."""
    if "emu3" not in config["export"].get("formats", ["emu3"]):
        return []
    prompt = config["export"]["emu3"]["prompt"]
    problem = template_problem(prompt["header"], prompt["entity"])
    return [f"export.emu3.prompt: {problem}"] if problem else []


def _sam2_checkpoint_name(model_config: str) -> str:
    """The checkpoint file name that matches a SAM2 model config, e.g. sam2.1_hiera_large.pt."""
    found = re.fullmatch(r"(sam2(?:\.1)?)_hiera_(t|s|b\+|l)\.yaml", Path(model_config).name)
    if not found:
        return "the SAM2 checkpoint (.pt)"
    return f"a {found[1]}_hiera_{SAM2_SIZES[found[2]]}.pt file"


def _weight_problems(config: dict, weights: Collection[str] = MODELS) -> list[str]:
    """No model weights (null checkpoint / tokenizer) without the random_weights opt-in."""
    problems = []
    mask = config["mask"]
    if "mask" in weights and mask["checkpoint"] is None and not mask["random_weights"]:
        problems.append(
            "mask.checkpoint: null means no SAM2 weights; set it to "
            f"{_sam2_checkpoint_name(mask['model_config'])} matching mask.model_config "
            f"({mask['model_config']}), or set mask.random_weights: true for tests "
            "(masks are noise)"
        )
    emu3 = config["export"]["emu3"]
    exported = "emu3" in weights and "emu3" in config["export"].get("formats", ["emu3"])
    if exported and emu3["tokenize"] and emu3["tokenizer"] is None and not emu3["random_weights"]:
        problems.append(
            "export.emu3.tokenizer: null means no Emu3 vision tokenizer; set it to a folder of "
            "BAAI/Emu3-VisionTokenizer or an Emu3 -hf checkpoint, set export.emu3.tokenize: false "
            "for prompts and lists only, or set export.emu3.random_weights: true for tests "
            "(tokens are noise)"
        )
    return problems


def missing_weights(config: dict, weights: Collection[str] = MODELS) -> list[str]:
    """Weights the config names that are not there (paths already absolute): one line each,
    leading with the key, so a run stops before any job instead of at its first mask job."""
    problems = []
    checkpoint = config["mask"]["checkpoint"]
    if "mask" in weights and checkpoint is not None and not Path(checkpoint).is_file():
        problems.append(
            f"mask.checkpoint: {checkpoint} is not a file (relative paths are relative to where "
            "snakemake was started)"
        )
    emu3 = config["export"]["emu3"]
    tokenizer = emu3["tokenizer"]
    exported = "emu3" in weights and "emu3" in config["export"].get("formats", ["emu3"])
    needed = exported and emu3["tokenize"] and tokenizer is not None
    if needed and not (Path(tokenizer) / "config.json").is_file():
        problems.append(
            f"export.emu3.tokenizer: {tokenizer} is not a model folder with a config.json "
            "(relative paths are relative to where snakemake was started)"
        )
    return problems


def _deep_update(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, nested mappings merged key by key (in place)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def load_config(
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: dict | None = None,
    weights: Collection[str] = MODELS,
) -> dict:
    """Read a YAML config (default `config/config.yaml`; several files are merged in order, as
    snakemake's --configfile merges them: mappings key by key, lists replaced), apply
    `overrides` (command-line options) and validate it; `weights` as in validate_config."""
    paths = [Path(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path or [])]
    config: dict = {}
    for one in paths or [DEFAULT_CONFIG]:
        _deep_update(config, read_yaml(one))
    _deep_update(config, overrides or {})
    source = " + ".join(str(p) for p in paths or [DEFAULT_CONFIG])
    return validate_config(config, source=source, weights=weights)


def read_yaml(path: Path) -> dict:
    """One config file as a mapping (ConfigError naming the file if it is not one)."""
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return config


def download_options(config: dict, source: dict) -> dict[str, Any]:
    """The effective `download` settings of one source: the global ones with its overrides."""
    merged = copy.deepcopy(config["download"])
    for key, value in (source.get("download") or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def find_source(config: dict, name: str) -> dict:
    """The `sources` entry called `name`."""
    for source in config["sources"]:
        if source["name"] == name:
            return source
    raise KeyError(
        f"no source named {name!r} in config (have: {[s['name'] for s in config['sources']]})"
    )


# Roles: which keys change a run's outputs and which only its speed (the schema's `x-role`).
# `output`: a rule's params or inputs (a change reruns what depends on it, so the outputs are a
# clean run's with the new config); `tuning`: read by the jobs at run time or by a tool only.
OUTPUT, TUNING = "output", "tuning"


def _nodes(node: dict, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """Every named node of a schema (object properties, recursively) by dotted config path."""
    for key, sub in node.get("properties", {}).items():
        path = f"{prefix}{key}"
        yield path, sub
        yield from _nodes(sub, path + ".")


def declared_roles() -> dict[str, set[str]]:
    """Every config key (or section) the schema gives a role (`x-role`), with that role."""
    return {path: {sub["x-role"]} for path, sub in _nodes(load_schema("config")) if "x-role" in sub}


def role_of(leaf: str, roles: dict[str, set[str]] | None = None) -> set[str]:
    """The roles of a config leaf: its own, or those of the nearest section named (a section's
    role covers its keys, e.g. filter.image_shape)."""
    roles = declared_roles() if roles is None else roles
    parts = leaf.split(".")
    for end in range(len(parts), 0, -1):
        found = roles.get(".".join(parts[:end]))
        if found:
            return found
    return set()


def keys_with_role(section: str, role: str) -> tuple[str, ...]:
    """The keys of a config section (dotted, relative to it) that the schema gives `role`."""
    start = f"{section}."
    return tuple(
        path.removeprefix(start)
        for path, roles in declared_roles().items()
        if path.startswith(start) and role in roles
    )


def keys_for(section: str, group: str, role: str = OUTPUT) -> tuple[str, ...]:
    """The keys of a config section (dotted, relative to it, in schema order) that the schema
    puts in the params of `group` (`x-params`: the job that reads them) with `role`."""
    start = f"{section}."
    return tuple(
        path.removeprefix(start)
        for path, sub in _nodes(load_schema("config"))
        if path.startswith(start) and group in _groups(sub) and sub.get("x-role") == role
    )


def _groups(node: dict) -> list[str]:
    """The params groups a schema node names (`x-params`: one name or a list)."""
    groups = node.get("x-params", [])
    return [groups] if isinstance(groups, str) else groups


def _type_name(schema: dict) -> str:
    """A short type label for the config table (allowed values and range included)."""
    kind = schema.get("type", "")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    if "enum" in schema:
        kind += " (" + ", ".join(str(v) for v in schema["enum"]) + ")"
    low = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    high = ("]", schema["maximum"]) if "maximum" in schema else (")", None)
    if low[1] is not None and high[1] is not None:
        kind += f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    elif low[1] is not None:
        kind += f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    elif high[1] is not None:
        kind += f" <= {high[1]}"
    items = schema.get("items")
    if kind == "array" and isinstance(items, dict) and "type" in items:
        kind += " of " + _type_name(items)
    return kind


def config_table(schema: dict | None = None) -> str:
    """Markdown table of every config key (path, type, default, role, description) from the
    schema; a key's role is its own `x-role` or its section's."""
    schema = schema or load_schema("config")
    rows = [
        "| key | type | default | a change | description |",
        "| --- | --- | --- | --- | --- |",
    ]
    effect = {OUTPUT: "reruns", TUNING: "speed only", None: ""}

    def walk(node: dict, prefix: str, role: str | None) -> None:
        for name, sub in node.get("properties", {}).items():
            path, own = f"{prefix}{name}", sub.get("x-role", role)
            default = "" if "default" not in sub else f"`{json.dumps(sub['default'])}`"
            if "default" not in sub and name in node.get("required", []):
                default = "required"
            description = sub.get("description", "").replace("|", "\\|")
            rows.append(
                f"| `{path}` | {_type_name(sub)} | {default} | {effect[own]} | {description} |"
            )
            walk(sub, path + ".", own)
            if isinstance(sub.get("items"), dict):
                walk(sub["items"], path + "[].", own)

    walk(schema, "", None)
    return "\n".join(rows)


def pick_keys(section: dict, keys: tuple[str, ...], into: dict | None = None) -> dict:
    """The `keys` ("a" or "a.b") of a config section, nested as there, added to a copy of `into`
    (a job's params: the keys that change its outputs)."""
    picked = copy.deepcopy(into or {})
    for key in keys:
        head, _, sub = key.partition(".")
        if head not in section:
            continue
        if sub:
            if sub in (section[head] or {}):
                picked.setdefault(head, {})[sub] = copy.deepcopy(section[head][sub])
        else:
            picked[head] = copy.deepcopy(section[head])
    return picked


if __name__ == "__main__":
    print(config_table())
