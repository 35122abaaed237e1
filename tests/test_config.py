import re

import pytest
import yaml

from conftest import ROOT
from groundset.config import (
    ConfigError,
    download_options,
    load_config,
    load_schema,
    validate_config,
)


def test_default_config_validates_with_seed_values():
    config = load_config(ROOT / "config" / "config.yaml")
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
    config = validate_config({"sources": [{"name": "s", "url_list": "x.parquet"}]})
    assert config["download"]["url_col"] == "URL"
    assert config["filter"]["image_shape"] == {"min_width": 1024, "min_height": 1024}
    assert config["sources"][0]["serve_dir"] is None


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"shard_size": "big"}, r"shard_size: 'big' is not of type 'integer'"),
        ({"shard_size": 0}, r"shard_size: 0 is less than the minimum"),
        ({"download": {"processes_count": 2.5}}, r"download/processes_count"),
        ({"download": {"resize_mode": False}}, r"download/resize_mode"),
        ({"filter": {"aspect_ratio": {"min_ratio": "a"}}}, r"filter/aspect_ratio/min_ratio"),
        ({"typo_key": 1}, r"Additional properties are not allowed \('typo_key'"),
        ({"sources": []}, r"sources: \[\] should be non-empty"),
    ],
)
def test_wrong_values_name_the_key(patch, message):
    config = {"sources": [{"name": "s", "url_list": "x.parquet"}], **patch}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_duplicate_sources_and_bad_overrides_are_rejected():
    with pytest.raises(ConfigError, match="duplicate source names: s"):
        validate_config(
            {"sources": [{"name": "s", "url_list": "a"}, {"name": "s", "url_list": "b"}]}
        )
    bad = {"sources": [{"name": "s", "url_list": "a", "download": {"thread_cnt": 3}}]}
    with pytest.raises(ConfigError, match=r"sources/s/download.*thread_cnt"):
        validate_config(bad)
    bad = {"sources": [{"name": "s", "url_list": "a", "download": {"thread_count": "many"}}]}
    with pytest.raises(ConfigError, match=r"sources/s/download: thread_count"):
        validate_config(bad)


def test_per_source_override_merges_nested_prefilter():
    config = validate_config(
        {
            "sources": [
                {"name": "s", "url_list": "a", "download": {"prefilter": {"max_punsafe": 0.1}}}
            ],
        }
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
    from groundset.config import config_table

    assert config_table() in (ROOT / "config" / "README.md").read_text()
