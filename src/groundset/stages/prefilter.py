"""Pre-download filter: drop URL-list rows whose parquet metadata already fails a later filter."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from groundset.core.config import fill_section, section_defaults
from groundset.core.io import atomic_write, write_json

log = logging.getLogger(__name__)

# Exclusive drop reasons, in the order they are tested: a row counts under its first failure.
REASONS = ("missing_url", "too_small", "aspect_ratio", "punsafe", "pwatermark")


# The config key each rule mirrors (the filter stage's thresholds, the download's columns).
RULE_KEYS = {
    "url_col": "download.url_col",
    "caption_col": "download.caption_col",
    "size_filter": "download.prefilter.enabled",
    "min_width": "filter.image_shape.min_width",
    "min_height": "filter.image_shape.min_height",
    "min_ratio": "filter.aspect_ratio.min_ratio",
    "max_ratio": "filter.aspect_ratio.max_ratio",
    "max_punsafe": "download.prefilter.max_punsafe",
    "max_pwatermark": "download.prefilter.max_pwatermark",
}


@dataclass(frozen=True)
class PrefilterRules:
    """Thresholds of the pre-download filter (the config keys of RULE_KEYS; built by from_config,
    the schema holds the defaults)."""

    url_col: str
    caption_col: str | None
    size_filter: bool
    min_width: int
    min_height: int
    min_ratio: float
    max_ratio: float
    max_punsafe: float | None
    max_pwatermark: float | None

    @classmethod
    def from_config(cls, config: dict, download: dict | None = None) -> PrefilterRules:
        """The rules of a (partial) config and one source's download options (default: the
        config's `download`), checked and filled from the schema."""
        sections = {
            "filter": fill_section("filter", config.get("filter")),
            "download": fill_section(
                "download", config.get("download") if download is None else download
            ),
        }
        values = {}
        for name, path in RULE_KEYS.items():
            node = sections
            for part in path.split("."):
                node = node[part]
            values[name] = node
        return cls(**values)


def list_parquet_files(url_list: str | os.PathLike) -> list[Path]:
    """The parquet files of a URL list given as one file or a folder of files (sorted)."""
    path = Path(url_list)
    if not path.exists():
        raise FileNotFoundError(f"URL list {path} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
    if not files:
        raise FileNotFoundError(f"URL list folder {path} holds no *.parquet files")
    return files


def _column(table: pa.Table, *names: str) -> pa.ChunkedArray | None:
    """The first column of `table` among `names` (case variants of LAION's headers), or None."""
    for name in names:
        if name in table.column_names:
            return table[name]
    return None


def drop_masks(table: pa.Table, rules: PrefilterRules) -> dict[str, pa.Array]:
    """Boolean mask per reason (True = fails), nulls already mapped to False (unknown = keep)."""
    masks: dict[str, pa.Array] = {}
    url = table[rules.url_col]
    url_str = pc.cast(url, pa.string())
    masks["missing_url"] = pc.fill_null(
        pc.or_kleene(pc.is_null(url_str), pc.equal(pc.utf8_trim_whitespace(url_str), "")), True
    )
    width = _column(table, "WIDTH", "width")
    height = _column(table, "HEIGHT", "height")
    if rules.size_filter and width is not None and height is not None:
        w = pc.cast(width, pa.float64())
        h = pc.cast(height, pa.float64())
        known = pc.and_(pc.greater(w, 0), pc.greater(h, 0))
        small = pc.or_(pc.less(w, rules.min_width), pc.less(h, rules.min_height))
        ratio = pc.divide(w, pc.if_else(known, h, 1.0))
        bad_ratio = pc.or_(pc.less(ratio, rules.min_ratio), pc.greater(ratio, rules.max_ratio))
        masks["too_small"] = pc.fill_null(pc.and_(known, small), False)
        masks["aspect_ratio"] = pc.fill_null(pc.and_(known, bad_ratio), False)
    for reason, ceiling in (("punsafe", rules.max_punsafe), ("pwatermark", rules.max_pwatermark)):
        column = _column(table, reason)
        if ceiling is not None and column is not None:
            masks[reason] = pc.fill_null(pc.greater(pc.cast(column, pa.float64()), ceiling), False)
    return masks


def filter_table(table: pa.Table, rules: PrefilterRules) -> tuple[pa.Table, Counter]:
    """Keep the rows of one batch that pass; count drops by their first failing reason."""
    counts: Counter = Counter()
    remaining = pa.array(np.ones(table.num_rows, dtype=bool))
    masks = drop_masks(table, rules)
    for reason in REASONS:
        if reason not in masks:
            continue
        hit = pc.and_(remaining, masks[reason])
        counts[reason] += pc.sum(hit).as_py() or 0
        remaining = pc.and_(remaining, pc.invert(hit))
    return table.filter(remaining), counts


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    """A parquet file opened for reading (its footer read); a clear error if it is not one."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file: {err}") from err


def check_columns(
    path: str | os.PathLike,
    names: list[str],
    url_col: str,
    caption_col: str | None,
    required: list[str],
) -> None:
    """Raise a clear error if a column img2dataset reads (URL, caption, saved ones) is missing.

    img2dataset itself would die deep inside pyarrow (`No match for FieldRef.Name(TEXT)`).
    """
    problems = []
    if url_col not in names:
        problems.append(f"no URL column {url_col!r} (download.url_col)")
    if caption_col is not None and caption_col not in names:
        problems.append(f"no caption column {caption_col!r} (download.caption_col)")
    absent = [c for c in dict.fromkeys(required) if c not in names]
    if absent:
        listed = ", ".join(repr(c) for c in absent)
        problems.append(
            f"no column{'s' if len(absent) > 1 else ''} {listed} (sources[].save_additional_columns)"
        )
    if problems:
        missing = [c for c in (url_col, caption_col) if c is not None and c not in names] + absent
        raise ValueError(
            f"{path}: missing column(s) {missing}: it has {' and '.join(problems)}; "
            f"its columns: {', '.join(names)}"
        )


def prefilter_url_list(
    url_list: str | os.PathLike,
    outdir: str | os.PathLike,
    rules: PrefilterRules,
    required_columns: list[str] | None = None,
    batch_rows: int | None = None,
) -> dict:
    """Stream every parquet file of a URL list into `outdir`, dropping failing rows; return stats.

    `batch_rows` None: the schema's default of download.prefilter.batch_rows."""
    if batch_rows is None:
        batch_rows = section_defaults("download.prefilter")["batch_rows"]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = list_parquet_files(url_list)
    for path in files:  # every file's columns first: a bad file fails before any is written
        with open_parquet(path) as parquet:
            names = parquet.schema_arrow.names
        check_columns(path, names, rules.url_col, rules.caption_col, required_columns or [])
    totals: Counter = Counter()
    per_file = {}
    for path in files:
        counts: Counter = Counter()
        rows_in = rows_out = 0
        with open_parquet(path) as parquet, atomic_write(outdir / path.name, "wb") as handle:
            writer = pq.ParquetWriter(handle, parquet.schema_arrow)
            for batch in parquet.iter_batches(batch_size=batch_rows):
                table = pa.Table.from_batches([batch], schema=parquet.schema_arrow)
                kept, dropped = filter_table(table, rules)
                rows_in += table.num_rows
                rows_out += kept.num_rows
                counts.update(dropped)
                if kept.num_rows:
                    writer.write_table(kept)
            writer.close()
        per_file[path.name] = {"rows_in": rows_in, "rows_out": rows_out, "dropped": dict(counts)}
        totals.update(counts)
        totals["rows_in"] += rows_in
        totals["rows_out"] += rows_out
        log.info("%s: %d rows in, %d kept, dropped %s", path, rows_in, rows_out, dict(counts))
    return {
        "rows_in": totals.pop("rows_in", 0),
        "rows_out": totals.pop("rows_out", 0),
        "dropped": {reason: totals.get(reason, 0) for reason in REASONS},
        "rules": rules.__dict__,
        "files": per_file,
    }


def run_prefilter(
    url_list: str | os.PathLike,
    outdir: str | os.PathLike,
    stats_path: str | os.PathLike,
    rules: PrefilterRules,
    required_columns: list[str] | None = None,
    batch_rows: int | None = None,
) -> dict:
    """Prefilter a URL list and write its stats JSON; the stats are returned too."""
    stats = prefilter_url_list(url_list, outdir, rules, required_columns, batch_rows)
    write_json(stats_path, stats)
    return stats
