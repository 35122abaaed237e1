import copy
import json
import re
from dataclasses import MISSING, fields

import pytest
import yaml

from conftest import RANDOM_WEIGHTS, ROOT, run_snakemake, write_config, write_parquet
from groundset.checks import workflow_config
from groundset.core.config import (
    OUTPUT,
    SCHEMA_DIR,
    TUNING,
    ConfigError,
    declared_roles,
    download_options,
    fill_section,
    keys_for,
    load_config,
    load_schema,
    role_of,
    section_defaults,
    validate_config,
)

SOURCES = {"sources": [{"name": "s", "url_list": "x.parquet"}]}


def deep_merge(base: dict, patch: dict) -> dict:
    """`base` with `patch` merged in, nested mappings key by key (as Snakemake merges configs)."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def minimal(**patch) -> dict:
    """The smallest valid config (one source, random weights allowed) with `patch` merged in."""
    return deep_merge({**SOURCES, **RANDOM_WEIGHTS}, patch)


def test_default_config_validates_with_seed_values(tmp_path):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["mask"]["checkpoint"] = "checkpoints/sam2.1_hiera_large.pt"
    config["export"]["emu3"]["tokenizer"] = "models/Emu3-VisionTokenizer"
    config = load_config(write_config(tmp_path / "config.yaml", config))
    assert config["workdir"] == "results"
    assert config["shard_size"] == 500000
    assert config["filter"]["aesthetics_tiers"] == [5, 6]
    names = [s["name"] for s in config["sources"]]
    assert names == ["laion-high-resolution", "laion-aesthetics_v2_4.75"]
    hr, aes = config["sources"]
    assert hr["save_additional_columns"] == [
        "similarity",
        "hash",
        "punsafe",
        "pwatermark",
        "LANGUAGE",
    ]
    assert aes["save_additional_columns"][-1] == "AESTHETIC_SCORE"
    opts = download_options(config, hr)
    assert opts["processes_count"] == 30 and download_options(config, aes)["processes_count"] == 16
    assert opts["image_size"] == 1024 and opts["resize_mode"] == "no"
    assert opts["resize_only_if_bigger"] is True and opts["skip_reencode"] is True
    assert opts["enable_wandb"] is False and opts["prefilter"]["enabled"] is True


def test_defaults_fill_a_minimal_config():
    config = validate_config(minimal())
    assert config["download"]["url_col"] == "URL"
    assert config["filter"]["image_shape"] == {"min_width": 1024, "min_height": 1024}
    assert config["sources"][0]["serve_dir"] is None


def test_defaults_fill_nested_sections_given_empty():
    config = validate_config(minimal(filter={}, caption={}, download={"prefilter": {}}))
    assert config["filter"]["nsfw"]["max_score"] == 0.0006
    assert config["filter"]["aesthetics"] == {
        "model": "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
        "min_score": 5,
        "max_score": 10,
        "mem_required": "1500MB",
    }
    assert config["download"]["prefilter"]["batch_rows"] == 65536
    assert config["export"]["emu3"]["prompt"]["header"] == "\nPrecise location control:\n\n"
    defaults = validate_config(
        {**SOURCES, "mask": {"checkpoint": "m.pt"}, "export": {"emu3": {"tokenizer": "t"}}}
    )
    assert defaults["mask"]["random_weights"] is False
    assert defaults["export"]["emu3"]["random_weights"] is False


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"shard_size": "big"}, r"^shard_size: 'big' is not of type 'integer'$"),
        ({"shard_size": 0}, r"^shard_size: 0 is less than the minimum"),
        ({"download": {"processes_count": 2.5}}, r"^download\.processes_count: 2\.5 is not"),
        ({"download": {"resize_mode": False}}, r"^download\.resize_mode: False is not one of"),
        ({"filter": {"aspect_ratio": {"min_ratio": "a"}}}, r"^filter\.aspect_ratio\.min_ratio: "),
        ({"typo_key": 1}, r"^typo_key: unknown key$"),
        (
            {"caption": {"chunk_sise": 3}},
            r"^caption\.chunk_sise: unknown key \(did you mean caption\.chunk_size\?\)$",
        ),
        ({"sources": []}, r"^sources: \[\] should be non-empty$"),
        ({"sources": [{"name": "a b", "url_list": "x"}]}, r"^sources\[0\]\.name: 'a b' does not"),
    ],
)
def test_wrong_values_name_the_key(patch, message):
    with pytest.raises(ConfigError) as error:
        validate_config({**minimal(), **patch})
    assert re.search(message, str(error.value), flags=re.M), str(error.value)


# Thresholds that pass the type check but select nothing, or swap what the outputs mean.
NONSENSE = [
    ({"filter": {"aesthetics": {"min_score": 50}}},
     "filter.aesthetics.min_score: 50 is greater than the maximum of 10"),
    ({"filter": {"aesthetics": {"max_score": -1}}},
     "filter.aesthetics.max_score: -1 is less than the minimum of 0"),
    ({"filter": {"aesthetics": {"min_score": 8, "max_score": 6}, "aesthetics_tiers": [6, 6]}},
     "filter.aesthetics.min_score: 8 is greater than filter.aesthetics.max_score 6"),
    ({"filter": {"aspect_ratio": {"min_ratio": 3, "max_ratio": 2}}},
     "filter.aspect_ratio.min_ratio: 3 is greater than filter.aspect_ratio.max_ratio 2"),
    ({"filter": {"aesthetics_tiers": [7, 5]}},
     "filter.aesthetics_tiers: [7, 5] must be non-decreasing"),
    ({"filter": {"aesthetics_tiers": [5, 11]}},
     "filter.aesthetics_tiers[1]: 11 is greater than the maximum of 10"),
    ({"filter": {"aesthetics_tiers": [4, 6]}},
     "filter.aesthetics_tiers: [4] outside [filter.aesthetics.min_score, "
     "filter.aesthetics.max_score] = [5, 10]"),
    ({"filter": {"aesthetics": {"max_score": 8}, "aesthetics_tiers": [5, 9]}},
     "filter.aesthetics_tiers: [9] outside"),
    ({"mask": {"min_score": 1.5}}, "mask.min_score: 1.5 is greater than the maximum of 1"),
    ({"mask": {"min_score": -0.1}}, "mask.min_score: -0.1 is less than the minimum of 0"),
    ({"caption": {"backoff_base_s": 100, "backoff_cap_s": 60}},
     "caption.backoff_base_s: 100 is greater than caption.backoff_cap_s 60"),
    ({"download": {"prefilter": {"max_punsafe": 5}}},
     "download.prefilter.max_punsafe: 5 is greater than the maximum of 1"),
    ({"download": {"prefilter": {"max_pwatermark": -1}}},
     "download.prefilter.max_pwatermark: -1 is less than the minimum of 0"),
    ({"sources": [{"name": "s", "url_list": "x", "download": {"prefilter": {"max_punsafe": 2}}}]},
     "sources[0].download.prefilter.max_punsafe: 2 is greater than the maximum of 1"),
    ({"download": {"image_size": 512, "resize_mode": "keep_ratio_largest"}},
     "download.image_size: 512 with resize_mode keep_ratio_largest leaves every image smaller "
     "than filter.image_shape (1024 x 1024)"),
    ({"sources": [{"name": "s", "url_list": "x", "download": {"image_size": 256, "resize_mode": "border"}}]},
     "sources[0].download.image_size: 256 with resize_mode border"),
    ({"caption": {"backend": "openai", "serve": {"command": "vllm serve m --port 8000"}}},
     "caption.serve.command: must contain {port}"),
    ({"caption": {"serve": {"command": "vllm serve m --port {port}"}}},
     "caption.backend: 'dashscope', but the servers caption.serve.command starts speak the OpenAI"),
    ({"caption": {"backend": "openai", "base_url": "http://h:1/v1",
                  "serve": {"command": "vllm serve m --port {port}"}}},
     "caption.base_url: 'http://h:1/v1' must be null with caption.serve.command"),
    ({"caption": {"backend": "openai", "stand_in": True,
                  "serve": {"command": "vllm serve m --port {port}"}}},
     "caption.stand_in: true starts the in-process stand-in"),
    ({"caption": {"max_pixels": 100}}, "caption.max_pixels: 100 is less than the minimum of 3136"),
]  # fmt: skip


@pytest.mark.parametrize("patch, message", NONSENSE, ids=[m.split(":")[0] for _, m in NONSENSE])
def test_nonsense_thresholds_are_rejected_with_their_key(patch, message):
    with pytest.raises(ConfigError) as error:
        validate_config(minimal(**patch))
    lines = str(error.value).splitlines()
    assert any(line.startswith(message) for line in lines[1:]), str(error.value)


def test_plausible_edge_thresholds_are_accepted():
    config = minimal(
        filter={
            "aesthetics": {"min_score": 5, "max_score": 5},
            "aesthetics_tiers": [5, 5],
            "aspect_ratio": {"min_ratio": 1, "max_ratio": 1},
            "image_shape": {"min_width": 1024, "min_height": 512},
        },
        caption={"backoff_base_s": 60, "backoff_cap_s": 60},
        mask={"min_score": 1},
        download={"image_size": 768, "resize_mode": "keep_ratio", "prefilter": {"max_punsafe": 1}},
    )
    validate_config(config)
    validate_config(minimal(download={"image_size": 256, "resize_mode": "no"}))


def test_every_problem_is_one_line_leading_with_its_key_path():
    config = minimal(
        shard_size=0,
        filter={"aesthetics": {"min_score": 50}, "aspect_ratio": {"max_ratio": "wide"}},
        mask={"mask_format": "png"},
    )
    with pytest.raises(ConfigError) as error:
        validate_config(config, source="my.yaml")
    head, *lines = str(error.value).splitlines()
    assert head == "my.yaml: invalid configuration (4 problems):"
    assert [line.split(": ")[0] for line in lines] == [
        "filter.aesthetics.min_score",
        "filter.aspect_ratio.max_ratio",
        "mask.mask_format",
        "shard_size",
    ]
    assert "$schema" not in str(error.value) and "properties" not in str(error.value)
    config = minimal(
        filter={"aesthetics_tiers": [7, 6]}, caption={"backoff_base_s": 9, "backoff_cap_s": 1}
    )
    with pytest.raises(ConfigError) as error:
        validate_config(config)
    assert [line.split(": ")[0] for line in str(error.value).splitlines()[1:]] == [
        "filter.aesthetics_tiers",
        "caption.backoff_base_s",
    ]


def test_null_checkpoint_and_tokenizer_are_errors_naming_the_fix():
    with pytest.raises(ConfigError) as error:
        load_config(ROOT / "config" / "config.yaml")  # as shipped: weights to be filled in
    lines = str(error.value).splitlines()[1:]
    assert len(lines) == 2
    assert lines[0].startswith("mask.checkpoint: null means no SAM2 weights; set it to a ")
    assert "sam2.1_hiera_large.pt" in lines[0] and "mask.model_config" in lines[0]
    assert "mask.random_weights: true" in lines[0]
    assert lines[1].startswith("export.emu3.tokenizer: null means no Emu3 vision tokenizer")
    assert "export.emu3.random_weights: true" in lines[1]
    assert "export.emu3.tokenize: false" in lines[1]
    tiny = {**SOURCES, "mask": {"model_config": "configs/sam2.1/sam2.1_hiera_t.yaml"}}
    with pytest.raises(ConfigError, match=r"mask\.checkpoint: null .* sam2\.1_hiera_tiny\.pt"):
        validate_config(deep_merge(tiny, {"export": RANDOM_WEIGHTS["export"]}))
    with pytest.raises(ConfigError, match=r"(?m)^export\.emu3\.tokenizer: null") as error:
        validate_config({**SOURCES, "mask": {"random_weights": True}})
    assert "mask." not in str(error.value)


def test_random_weights_opt_in_and_real_weights_are_accepted():
    config = validate_config(minimal())
    assert config["mask"]["checkpoint"] is None and config["mask"]["random_weights"] is True
    assert config["export"]["emu3"]["tokenizer"] is None
    real = {**SOURCES, "mask": {"checkpoint": "sam2.1_hiera_large.pt"}}
    validate_config(deep_merge(real, {"export": {"emu3": {"tokenizer": "Emu3-VisionTokenizer"}}}))


def test_prompts_only_export_needs_no_tokenizer():
    config = {**SOURCES, "mask": {"checkpoint": "m.pt"}, "export": {"emu3": {"tokenize": False}}}
    config = validate_config(config)
    assert config["export"]["emu3"]["tokenizer"] is None
    assert config["export"]["emu3"]["random_weights"] is False


def test_cli_entry_points_check_the_weights(tmp_path, capsys):
    from groundset.cli import main

    bad = write_config(tmp_path / "c.yaml", {**SOURCES, "export": RANDOM_WEIGHTS["export"]})
    args = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    assert main(["mask", "--config", str(bad), *args, "--mask-dir", str(tmp_path / "m")]) == 2
    assert "mask.checkpoint: null means no SAM2 weights" in capsys.readouterr().err
    bad = write_config(tmp_path / "e.yaml", {**SOURCES, "mask": RANDOM_WEIGHTS["mask"]})
    emu3 = ["--input", str(tmp_path / "in.jsonl"), "--outdir", str(tmp_path / "emu3")]
    assert main(["export-emu3", "--config", str(bad), *emu3]) == 2
    assert "export.emu3.tokenizer: null means no Emu3 vision tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "emu3").exists()


def test_cli_options_name_the_weights_and_commands_without_models_need_none(tmp_path, capsys):
    from groundset.cli import main

    bare = write_config(tmp_path / "bare.yaml", SOURCES)  # checkpoint and tokenizer null
    records = tmp_path / "in.jsonl"
    records.write_text("")
    # --tokenizer / --no-tokenize are applied before validation: they satisfy the check
    emu3 = ["--input", str(records), "--outdir", str(tmp_path / "emu3")]
    assert main(["export-emu3", "--config", str(bare), *emu3, "--no-tokenize"]) == 0
    assert json.loads((tmp_path / "emu3" / "list" / "train.json").read_text())["path_list"] == []
    # a command that loads no model does not ask for its weights
    out = tmp_path / "shards"
    assert main(["split", "--config", str(bare), "--input", str(records), "--outdir", str(out),
                 "--shard-size", "2"]) == 0  # fmt: skip
    capsys.readouterr()
    # the workflow loads both models: the same config stops before any job
    with pytest.raises(ConfigError, match="mask.checkpoint: null"):
        validate_config(yaml.safe_load(bare.read_text()))


def test_duplicate_sources_and_bad_overrides_are_rejected():
    with pytest.raises(ConfigError, match="sources: duplicate source names: s"):
        validate_config(
            minimal(sources=[{"name": "s", "url_list": "a"}, {"name": "s", "url_list": "b"}])
        )
    bad = minimal(sources=[{"name": "s", "url_list": "a", "download": {"thread_cnt": 3}}])
    with pytest.raises(ConfigError, match=r"sources\[0\]\.download: .*thread_cnt"):
        validate_config(bad)
    bad = minimal(sources=[{"name": "s", "url_list": "a", "download": {"thread_count": "many"}}])
    with pytest.raises(ConfigError, match=r"sources\[0\]\.download\.thread_count: 'many'"):
        validate_config(bad)


def test_per_source_override_merges_nested_prefilter():
    config = validate_config(
        minimal(
            sources=[
                {"name": "s", "url_list": "a", "download": {"prefilter": {"max_punsafe": 0.1}}}
            ],
        )
    )
    opts = download_options(config, config["sources"][0])
    assert opts["prefilter"]["max_punsafe"] == 0.1 and opts["prefilter"]["enabled"] is True


def _schema_keys(schema: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        path = f"{prefix}{name}"
        keys.add(path)
        keys |= _schema_keys(sub, path + ".")
        if sub.get("type") == "array" and isinstance(sub.get("items"), dict):
            keys |= _schema_keys(sub["items"], path + "[].")
    return keys


def _leaves() -> list[str]:
    keys = _schema_keys(load_schema("config"))
    return sorted(k for k in keys if not any(other.startswith(k + ".") for other in keys))


@pytest.mark.parametrize("leaf", _leaves())
def test_every_config_leaf_has_one_role_in_the_schema(leaf):
    """One role per key, from the schema's `x-role` (on the key or a section above it): a rule's
    params (output) or read at run time (tuning), never neither, never both."""
    assert len(role_of(leaf.replace("[]", ""))) == 1


def test_roles_name_schema_keys_and_params_groups_name_roles():
    keys = _schema_keys(load_schema("config"))
    assert sorted(k for k in declared_roles() if k not in keys) == []
    # the download stage has its knobs too (they were img2dataset params of download_images)
    for knob in ("processes_count", "thread_count", "enable_wandb", "prefilter.batch_rows"):
        assert role_of(f"download.{knob}") == {TUNING}, knob
    assert role_of("download.image_size") == {OUTPUT}
    assert keys_for("mask", "mask_floors") == ("min_score", "min_inside_fraction", "low_quality")
    assert "aesthetics.model" in keys_for("filter", "score")
    assert "aesthetics.model" in keys_for("filter", "select")
    assert "image_size" not in keys_for("download", "download", TUNING)


def test_config_readme_documents_every_schema_key():
    table = (ROOT / "config" / "README.md").read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.M))
    assert documented == _schema_keys(load_schema("config"))


def test_schema_gives_every_key_a_description():
    def walk(schema, path="config"):
        for name, sub in schema.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{name} has no description"
            walk(sub, f"{path}.{name}")
            if isinstance(sub.get("items"), dict):
                walk(sub["items"], f"{path}.{name}[]")

    walk(load_schema("config"))


def test_sample_config_is_valid_over_the_default():
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    sample = yaml.safe_load((ROOT / "config" / "sample.yaml").read_text())
    merged = {**base, **sample, "download": {**base["download"], **sample["download"]}}
    config = validate_config(merged)
    assert all(s["serve_dir"] for s in config["sources"])


def test_config_readme_table_is_generated_from_the_schema():
    from groundset.core.config import config_table

    assert config_table() in (ROOT / "config" / "README.md").read_text()


def test_schemas_are_package_data_with_one_copy():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    import groundset

    assert SCHEMA_DIR.parent == ROOT / "src" / "groundset" and SCHEMA_DIR.is_symlink()
    assert SCHEMA_DIR.resolve() == ROOT / "workflow" / "schemas"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = project["tool"]["setuptools"]["package-data"]["groundset"]
    package = ROOT / "src" / "groundset"
    shipped = {p.name for pattern in patterns for p in package.glob(pattern)}
    schemas = {p.name for p in (ROOT / "workflow" / "schemas").glob("*.schema.yaml")}
    assert shipped == schemas | {"assumed.yaml"}  # and estimate's assumed figures
    assert groundset.__file__ and load_schema("records")


def sample_with(tmp_path, patch: dict) -> list[str]:
    """Snakemake arguments: config/sample.yaml with `patch` merged over it (a file in tmp_path)."""
    sample = yaml.safe_load((ROOT / "config" / "sample.yaml").read_text())
    config = write_config(tmp_path / "bad.yaml", deep_merge(sample, patch))
    return ["--configfile", str(config), "--config", f"workdir={tmp_path / 'results'}", "-n"]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"filter": {"aesthetics": {"min_score": 50}}},
         "filter.aesthetics.min_score: 50 is greater than the maximum of 10"),
        ({"mask": {"random_weights": False}}, "mask.checkpoint: null means no SAM2 weights"),
        ({"mask": {"checkpoint": "nowhere/sam2.1_hiera_tiny.pt"}},
         f"mask.checkpoint: {ROOT}/nowhere/sam2.1_hiera_tiny.pt is not a file"),
        ({"export": {"emu3": {"tokenizer": "nowhere"}}},
         f"export.emu3.tokenizer: {ROOT}/nowhere is not a model folder with a config.json"),
        ({"caption": {"chunk_sise": 4}},
         "caption.chunk_sise: unknown key (did you mean caption.chunk_size?)"),
        ({"filter": {"template": "nowhere/recipe.yaml"}},
         "filter.template: [Errno 2] No such file or directory"),
    ],
    ids=["min_score", "checkpoint", "missing_checkpoint", "missing_tokenizer", "typo", "template"],
)  # fmt: skip
def test_the_workflow_config_check_names_the_key(patch, message):
    """What the workflow checks before any job (groundset.checks.workflow_config), paths taken
    from the launch directory (here the repository, as `make sample` runs)."""
    sample = yaml.safe_load((ROOT / "config" / "sample.yaml").read_text())
    with pytest.raises(ConfigError) as error:
        workflow_config(deep_merge(sample, patch), ROOT)
    assert re.search(f"^{re.escape(message)}", str(error.value), flags=re.M), str(error.value)
    for dump in ("$schema", "properties", "Failed validating", "Traceback"):
        assert dump not in str(error.value)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"URL": "u", "TEXT": "t", "url_list_row": 3},
         r"sources\[0\].url_list \(s\): .*bad.parquet: has column\(s\) \['url_list_row'\], "
         r"which groundset adds itself"),
        ({"URL": "u"}, r"sources\[0\].url_list \(s\): .*bad.parquet: missing column\(s\) \['TEXT'\]"),
    ],
    ids=["provenance_column", "no_caption"],
)  # fmt: skip
def test_the_config_check_reads_the_url_lists_columns(tmp_path, row, message):
    """A URL list a job would stop on stops the run before any job, naming the source."""
    write_parquet(tmp_path / "bad.parquet", [row])
    source = {"name": "s", "url_list": str(tmp_path / "bad.parquet"), "save_additional_columns": []}
    config = {"sources": [source], **RANDOM_WEIGHTS}
    with pytest.raises(ConfigError, match=message):
        workflow_config(config, ROOT)
    # a job of a run whose main process checked them does not read the footers again
    assert workflow_config(copy.deepcopy(config), ROOT, read_url_lists=False)["sources"]
    # a URL list that is not there: its download parts cannot be planned, so the check says so
    config = {"sources": [{"name": "s", "url_list": str(tmp_path / "later")}], **RANDOM_WEIGHTS}
    with pytest.raises(
        ConfigError, match=r"sources\[0\].url_list \(s\): URL list .*later does not"
    ):
        workflow_config(config, ROOT)


def test_a_run_wide_download_key_in_a_source_is_refused(tmp_path):
    """download.max_parallel caps parts over the whole run: a source's own would be ignored."""
    write_parquet(tmp_path / "u.parquet", [{"URL": "u", "TEXT": "t"}])
    source = {"name": "s", "url_list": str(tmp_path / "u.parquet"), "save_additional_columns": [],
              "download": {"max_parallel": 2}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"sources\[0\].download.max_parallel: a cap over"):
        workflow_config({"sources": [source], **RANDOM_WEIGHTS}, ROOT)


@pytest.mark.workflow
def test_snakemake_stops_on_a_bad_config_before_any_job(tmp_path):
    """The plumbing: the check's message reaches the user as one line, before any job."""
    done = run_snakemake(sample_with(tmp_path, {"caption": {"chunk_sise": 4}}), check=False)
    assert done.returncode != 0
    out = done.stdout + done.stderr  # snakemake logs its errors to either
    message = "caption.chunk_sise: unknown key (did you mean caption.chunk_size?)"
    assert re.search(f"^{re.escape(message)}", out, flags=re.M), out
    for dump in ("$schema", "properties", "Failed validating", "Traceback"):
        assert dump not in out, out
    assert "Job stats" not in out
    assert not (tmp_path / "results").exists()


def _named_as_keys(cls: type, section: str, runtime: set[str]) -> dict[str, str]:
    """Field -> config key path for a class whose fields are named as its section's keys."""
    return {f.name: f"{section}.{f.name}" for f in fields(cls) if f.name not in runtime}


def _settings_classes() -> list[tuple]:
    """Every class built from config sections: (class, build from an empty config, the config
    key of each field, its runtime-only fields: not config keys, so free to have defaults)."""
    from groundset.exports.emu3 import Emu3Settings
    from groundset.stages.caption import Settings
    from groundset.stages.mask import MaskSettings
    from groundset.stages.prefilter import RULE_KEYS, PrefilterRules

    emu3_keys = {
        **_named_as_keys(Emu3Settings, "export.emu3", {"header", "entity"}),
        "header": "export.emu3.prompt.header",
        "entity": "export.emu3.prompt.entity",
    }
    return [
        (Settings, lambda: Settings.from_config({}),
         _named_as_keys(Settings, "caption", {"api_key", "server_gone"}), {"api_key", "server_gone"}),
        (PrefilterRules, lambda: PrefilterRules.from_config({}), RULE_KEYS, set()),
        (MaskSettings, lambda: MaskSettings.from_config({}),
         _named_as_keys(MaskSettings, "mask", set()), set()),
        (Emu3Settings, lambda: Emu3Settings.from_config({}), emu3_keys, set()),
    ]  # fmt: skip


SETTINGS_CLASSES = _settings_classes()


def _schema_default(path: str):
    """The schema's default of one config key (KeyError if the schema has no such key)."""
    section, key = path.rsplit(".", 1)
    return section_defaults(section)[key]


@pytest.mark.parametrize(
    "cls, build, keys, runtime", SETTINGS_CLASSES, ids=[row[0].__name__ for row in SETTINGS_CLASSES]
)
def test_settings_classes_take_every_default_from_the_schema(cls, build, keys, runtime):
    # every field is a config key or declared runtime-only; no config key has a default here
    assert set(keys) | runtime == {f.name for f in fields(cls)} and not set(keys) & runtime
    repeated = [f.name for f in fields(cls) if f.name in keys
                and (f.default is not MISSING or f.default_factory is not MISSING)]  # fmt: skip
    assert repeated == [], f"{cls.__name__} repeats the schema's defaults of {repeated}"
    # built from an empty config, each field is its key's schema default (the key must exist)
    built = build()
    for name, path in keys.items():
        assert getattr(built, name) == _schema_default(path), f"{cls.__name__}.{name} ({path})"


def test_a_default_changed_in_the_schema_reaches_the_settings(monkeypatch):
    from groundset.core import config as config_module
    from groundset.stages.caption import Settings
    from groundset.stages.prefilter import PrefilterRules

    schema = load_schema("config")
    props = schema["properties"]
    props["caption"]["properties"]["model"]["default"] = "another-model"
    props["caption"]["properties"]["rate_per_second"]["default"] = 7
    props["filter"]["properties"]["image_shape"]["properties"]["min_width"]["default"] = 12
    props["download"]["properties"]["prefilter"]["properties"]["enabled"]["default"] = False
    monkeypatch.setattr(config_module, "_read_schema", lambda name: schema)
    settings = Settings.from_config({})
    assert (settings.model, settings.rate_per_second) == ("another-model", 7)
    rules = PrefilterRules.from_config({})
    assert (rules.min_width, rules.size_filter) == (12, False)


def test_sections_fill_nested_defaults_and_name_bad_keys_by_their_path():
    emu3 = section_defaults("export.emu3")
    assert emu3["prompt"]["header"] == "\nPrecise location control:\n\n"
    assert emu3["tokenizer"] is None and emu3["image_area"] == 518400
    assert section_defaults("download.prefilter") == {
        "enabled": True, "max_punsafe": None, "max_pwatermark": None, "batch_rows": 65536,
    }  # fmt: skip
    # a fresh copy every time: a caller's change reaches neither the schema nor the next caller
    section_defaults("caption")["backend"] = "changed"
    assert section_defaults("caption")["backend"] == "dashscope"
    given = {"model": "m", "api_jobs": 2}
    filled = fill_section("caption", given)
    assert given == {"model": "m", "api_jobs": 2} and filled["model"] == "m"
    assert filled == {**section_defaults("caption"), "model": "m", "api_jobs": 2}
    with pytest.raises(ConfigError) as error:
        fill_section("caption", {"backend": "x", "prompt_preset": "y"})
    assert str(error.value).splitlines()[1:] == [
        "caption.backend: 'x' is not one of ['dashscope', 'openai']",
        "caption.prompt_preset: 'y' is not one of ['seed', 'qwen2_tokens']",
    ]
    with pytest.raises(ConfigError, match=r"(?m)^export\.emu3\.prompt\.header: 3 is not of type"):
        fill_section("export.emu3", {"prompt": {"header": 3}})
    with pytest.raises(
        ConfigError,
        match=r"(?m)^mask\.maks_format: unknown key \(did you mean mask\.mask_format\?\)$",
    ):
        fill_section("mask", {"maks_format": "rle"})
    with pytest.raises(KeyError, match="no section 'captions'"):
        section_defaults("captions")


def test_key_order_of_the_config_file_changes_no_params():
    """The same settings written in another order validate to the same text (Snakemake compares
    params as text: a reordered file would rerun every job, downloads included)."""

    def reversed_keys(value):
        if isinstance(value, dict):
            return {key: reversed_keys(value[key]) for key in reversed(list(value))}
        if isinstance(value, list):
            return [reversed_keys(item) for item in value]
        return value

    user = yaml.safe_load((ROOT / "config" / "sample.yaml").read_text())
    user["download"] = {"number_sample_per_shard": 8, "processes_count": 2, "extra_args": {}}
    written = validate_config(copy.deepcopy(user))
    rewritten = validate_config(reversed_keys(copy.deepcopy(user)))
    assert json.dumps(rewritten) == json.dumps(written)
    assert list(written["download"]) == sorted(written["download"])
