"""Load and validate `config/config.yaml` against the workflow's JSON schema, filling defaults."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"
DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


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


def load_schema(name: str = "config") -> dict:
    """Read `workflow/schemas/<name>.schema.yaml`."""
    path = SCHEMA_DIR / f"{name}.schema.yaml"
    if not path.exists():
        raise FileNotFoundError(
            f"schema {path} not found (is groundset installed from its repository?)"
        )
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate a config dict in place, filling defaults; raise ConfigError naming the bad key."""
    validator = _with_defaults(Draft202012Validator)(load_schema("config"))
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid configuration"]
        for err in errors:
            where = "/".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  {where}: {err.message}")
        raise ConfigError("\n".join(lines))
    return check_config(config, source)


def check_config(config: dict, source: str = "config") -> dict:
    """Checks the schema cannot express: unique source names, known per-source download keys."""
    names = [s["name"] for s in config["sources"]]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{source}: duplicate source names: {', '.join(dupes)}")
    download_schema = load_schema("config")["properties"]["download"]
    for src in config["sources"]:
        merged = download_options(config, src)
        errors = list(Draft202012Validator(download_schema).iter_errors(merged))
        if errors:
            raise ConfigError(
                f"{source}: sources/{src['name']}/download: "
                + "; ".join(
                    f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors
                )
            )
    return config


def load_config(path: str | os.PathLike | None = None) -> dict:
    """Read a YAML config (default `config/config.yaml`) and validate it."""
    path = Path(path) if path else DEFAULT_CONFIG
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return validate_config(config, source=str(path))


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


def _type_name(schema: dict) -> str:
    """A short type label for the config table."""
    kind = schema.get("type", "")
    kind = " or ".join(kind) if isinstance(kind, list) else kind
    if "enum" in schema:
        kind += " (" + ", ".join(str(v) for v in schema["enum"]) + ")"
    return kind


def config_table(schema: dict | None = None) -> str:
    """Markdown table of every config key (path, type, default, description) from the schema."""
    schema = schema or load_schema("config")
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(node: dict, prefix: str) -> None:
        for name, sub in node.get("properties", {}).items():
            path = f"{prefix}{name}"
            default = "" if "default" not in sub else f"`{json.dumps(sub['default'])}`"
            if "default" not in sub and name in node.get("required", []):
                default = "required"
            description = sub.get("description", "").replace("|", "\\|")
            rows.append(f"| `{path}` | {_type_name(sub)} | {default} | {description} |")
            walk(sub, path + ".")
            if isinstance(sub.get("items"), dict):
                walk(sub["items"], path + "[].")

    walk(schema, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(config_table())
