"""Select stage: the config's thresholds over a scored shard — kept, rejected (with why), counts.

Scores are computed once per shard (`groundset.stages.filter.score`); this cheap step applies the bounds of the
recipe template's filters in its order, exactly as data-juicer applies them (closed intervals by
default, `min_closed_interval` / `max_closed_interval` / `reversed_range` / `any_or_all` from the
template, data-juicer's defaults for bounds the template leaves out; tests compare it with
data-juicer's own ops). A record leaves at the first filter it fails; `removed_by_filter` counts
what each filter removed of what reached it, as data-juicer's sequential run reports it (the
`dropped` of its stats envelope; each rejected record a drop line with the filter as its
`drop_reason` and the failing value as its `detail`).
Changing a threshold reruns only this step and what follows.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from groundset.core.config import ConfigError
from groundset.core.io import atomic_write, dumps_record, iter_jsonl
from groundset.core.stats import drop_line, envelope, write_stats
from groundset.stages.filter import scoring
from groundset.stages.filter.shard import (
    AESTHETICS_KEY,
    OPS,
    STATS,
    aesthetics_divisor,
    fill_template,
    filter_values,
)

# What a select job's log says (its stats file has the rest).
SUMMARY_KEYS = ("records_in", "records_out", "dropped")
STAGE = "select"

# data-juicer 1.6's defaults for the bounds a template leaves out (the ops' __init__ signatures).
DJ_DEFAULTS = {
    "image_shape_filter": {
        "min_width": 1,
        "max_width": sys.maxsize,
        "min_height": 1,
        "max_height": sys.maxsize,
    },
    "image_aspect_ratio_filter": {"min_ratio": 0.333, "max_ratio": 3.0},
    "image_nsfw_filter": {"min_score": 0.0, "max_score": 0.5},
    "image_watermark_filter": {"prob_threshold": 0.8},
    "image_aesthetics_filter": {"min_score": 0.5, "max_score": 1.0},
}
# Per op: (stats key, label in drop reasons, min param, max param).
CHECKS = {
    "image_shape_filter": (
        ("image_width", "width", "min_width", "max_width"),
        ("image_height", "height", "min_height", "max_height"),
    ),
    "image_aspect_ratio_filter": (("aspect_ratios", "aspect ratio", "min_ratio", "max_ratio"),),
    "image_nsfw_filter": (("image_nsfw_score", "", "min_score", "max_score"),),
    "image_watermark_filter": (("image_watermark_prob", "", None, "prob_threshold"),),
    "image_aesthetics_filter": ((AESTHETICS_KEY, "", "min_score", "max_score"),),
}
SCORE_ERROR = "score_error"  # the removed_by_filter key of records whose image failed scoring


def _number(value: float) -> str:
    """A stat or bound as drop reasons show it (6 significant digits)."""
    return f"{value:.6g}"


@dataclass(frozen=True)
class Rule:
    """One data-juicer image filter with its bounds, as the recipe gives them."""

    op: str
    bounds: dict  # param -> value (data-juicer's scale: aesthetics divided by `divisor`)
    any_or_all: str = "any"
    min_closed: bool = True
    max_closed: bool = True
    reversed_range: bool = False
    divisor: float = 1.0  # stored aesthetics are on 0-10; data-juicer compares score / divisor

    def shown_bounds(self) -> dict:
        """The bounds on the stored scale (aesthetics on 0-10, as the config gives them)."""
        if self.op != "image_aesthetics_filter":
            return dict(self.bounds)
        return {key: value * self.divisor for key, value in self.bounds.items()}

    def keep_value(self, value: float, low: float | None, high: float | None) -> bool:
        """data-juicer's Filter.get_keep_boolean for one value."""
        keep = True
        if low is not None:
            keep = keep and (value >= low if self.min_closed else value > low)
        if high is not None:
            keep = keep and (value <= high if self.max_closed else value < high)
        return not keep if self.reversed_range else keep

    def _image_fails(self, stats: dict, index: int) -> str | None:
        """Why image `index` fails this filter ("width 900 < 1024"), or None when it passes."""
        for key, label, low_param, high_param in CHECKS[self.op]:
            value = float(stats[key][index])
            scaled = value / self.divisor if key == AESTHETICS_KEY else value
            low = self.bounds.get(low_param) if low_param else None
            high = self.bounds.get(high_param)
            if self.keep_value(scaled, low, high):
                continue
            scale = self.divisor if key == AESTHETICS_KEY else 1.0
            prefix = f"{label} " if label else ""
            if self.reversed_range:
                return f"{prefix}{_number(value)} within the reversed range"
            if low is not None and not self.keep_value(scaled, low, None):
                return f"{prefix}{_number(value)} < {_number(low * scale)}"
            return f"{prefix}{_number(value)} > {_number(high * scale)}"
        return None

    def failure(self, stats: dict) -> str | None:
        """Why a record fails this filter (`op: value > bound`), or None when data-juicer keeps it."""
        count = len(stats.get(CHECKS[self.op][0][0]) or [])
        if count == 0:
            return None  # data-juicer keeps a record without images
        reasons = [self._image_fails(stats, i) for i in range(count)]
        failed = [r for r in reasons if r]
        keep = len(failed) < count if self.any_or_all == "any" else not failed
        return None if keep else f"{self.op}: {failed[0]}"


def rules_from_recipe(recipe: dict) -> list[Rule]:
    """The image filters of a filled recipe (template + config thresholds), in its order."""
    rules = []
    for entry in recipe.get("process", []):
        ((op, params),) = entry.items()
        params = dict(params or {})
        if op not in OPS:
            raise ValueError(
                f"recipe template op {op!r}: groundset scores the five image filters "
                f"{', '.join(OPS)} and selects by them; remove the others from the template"
            )
        bounds = {**DJ_DEFAULTS[op], **{k: v for k, v in params.items() if k in DJ_DEFAULTS[op]}}
        divisor = (
            aesthetics_divisor(params.get("hf_scorer_model", ""))
            if op == "image_aesthetics_filter"
            else 1.0
        )
        rules.append(
            Rule(
                op=op,
                bounds=bounds,
                any_or_all=params.get("any_or_all", "any"),
                min_closed=params.get("min_closed_interval", True),
                max_closed=params.get("max_closed_interval", True),
                reversed_range=params.get("reversed_range", False),
                divisor=divisor,
            )
        )
        if rules[-1].reversed_range:  # as data-juicer's Filter.__init__ flips them
            rule = rules[-1]
            rules[-1] = Rule(
                **{
                    **vars(rule),
                    "min_closed": not rule.min_closed,
                    "max_closed": not rule.max_closed,
                }
            )
    return rules


def config_rules(filter_cfg: dict) -> list[Rule]:
    """`selection_rules` of a validated `filter:` section; a template it cannot apply is a
    ConfigError naming `filter.template` (raised before any job or image is touched)."""
    try:
        return selection_rules(filter_cfg["template"], filter_cfg)
    except (OSError, ValueError) as error:
        raise ConfigError(f"filter.template: {error}") from None


def selection_rules(template_path: str | os.PathLike, filter_cfg: dict) -> list[Rule]:
    """The template's filters with the config's thresholds (what the seed's recipe would apply).

    `filter_cfg` needs the threshold keys only (`filter.select_settings`)."""
    models = {
        name: (filter_cfg.get(name) or {}).get("model", "")
        for name in ("nsfw", "watermark", "aesthetics")
    }
    with open(template_path, encoding="utf-8") as handle:
        template = yaml.safe_load(handle) or {}
    top = {key: "" for key, value in template.items() if key != "process" and value is None}
    return rules_from_recipe(fill_template(template, top, filter_values(filter_cfg, models)))


def verdict(record: dict, rules: list[Rule]) -> tuple[str | None, str | None]:
    """(the filter that removes a scored record, its reason) or (None, None) when it is kept."""
    stats = record.get(STATS) or {}
    errors = [e for e in stats.get(scoring.SCORE_ERRORS) or [] if e]
    if errors:
        return SCORE_ERROR, f"{SCORE_ERROR}: {errors[0]}"
    images = record.get("image") or []
    count = 1 if isinstance(images, str) else len(images)
    for rule in rules:  # every image scored by every filter, or the record was never scored
        for key, *_ in CHECKS[rule.op]:
            if len(stats.get(key) or []) != count:
                return SCORE_ERROR, f"{SCORE_ERROR}: no {key} for its {count} image(s): not scored"
    for rule in rules:
        reason = rule.failure(stats)
        if reason:
            return rule.op, reason
    return None, None


@dataclass(frozen=True)
class SelectFiles:
    """What one shard's select job reads and writes (the rule's names)."""

    scored: str  # every scored record (score_shard)
    kept: str  # filtered/<source>/shard_{i}.jsonl
    rejected: str  # rejected/<source>/shard_{i}.jsonl
    stats: str  # filtered/<source>/shard_{i}_stats.json


def select_shard(files: SelectFiles, rules: list[Rule], progress: bool = True) -> dict:
    """Split a scored shard into kept and rejected records; write its counts; return them."""
    removed = Counter({rule.op: 0 for rule in rules})
    records_in = kept_count = 0
    desc = f"select {Path(files.scored).name}"
    with (
        atomic_write(files.kept) as kept,
        atomic_write(files.rejected) as rejected,
        tqdm(unit="rec", desc=desc, mininterval=5, disable=not progress) as bar,
    ):
        for record in iter_jsonl(files.scored):
            records_in += 1
            op, reason = verdict(record, rules)
            if op is None:
                kept.write(dumps_record(record) + "\n")
                kept_count += 1
            else:
                removed[op] += 1
                rejected.write(dumps_record(drop_line(record, STAGE, op, reason)) + "\n")
            bar.update()
    stats = envelope(
        STAGE,
        records_in,
        kept_count,
        {op: removed[op] for op in removed if op != SCORE_ERROR or removed[op]},
        bounds={rule.op: rule.shown_bounds() for rule in rules},
    )
    write_stats(files.stats, stats)
    return stats


def select_job(scored: str, output: Any, log: str, template: str, thresholds: dict) -> dict:
    """Rule select_shard's job (run in the Snakemake process: no bar, its counts to `log`)."""
    files = SelectFiles(
        scored=scored,
        kept=output.kept,
        rejected=output.rejected,
        stats=output.stats,
    )
    stats = select_shard(files, selection_rules(template, thresholds), progress=False)
    with atomic_write(log) as handle:
        handle.write(json.dumps({k: stats[k] for k in SUMMARY_KEYS}) + "\n")
    return stats
