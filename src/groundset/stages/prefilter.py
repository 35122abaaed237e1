"""Pre-download filter: drop URL-list rows whose parquet metadata already fails a later filter."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from groundset.core.config import fill_section, section_defaults
from groundset.core.io import atomic_write
from groundset.core.layout import beside
from groundset.core.records import PROVENANCE  # the columns it adds (img2dataset saves them)
from groundset.core.stats import envelope, write_stats

log = logging.getLogger(__name__)

STAGE = "prefilter"
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


def first_reasons(table: pa.Table, rules: PrefilterRules) -> pa.Array:
    """Each row's first failing reason (REASONS order), null for a row that passes."""
    masks = drop_masks(table, rules)
    reason = pa.nulls(table.num_rows, pa.string())
    for name in reversed(REASONS):  # the first reason tested is applied last and wins
        if name in masks:
            reason = pc.if_else(masks[name], pa.scalar(name, pa.string()), reason)
    return reason


def filter_table(table: pa.Table, rules: PrefilterRules) -> tuple[pa.Table, pa.Table, Counter]:
    """The rows of one batch that pass, those that fail (with `drop_reason`), and their counts
    by first failing reason."""
    reason = first_reasons(table, rules)
    failed = pc.is_valid(reason)
    dropped = table.filter(failed).append_column("drop_reason", reason.filter(failed))
    counts = Counter(
        {r["values"]: r["counts"] for r in pc.value_counts(dropped["drop_reason"]).to_pylist()}
    )
    return table.filter(pc.invert(failed)), dropped, counts


def with_provenance(table: pa.Table, name: str, first_row: int) -> pa.Table:
    """A batch with its provenance columns: the URL-list file `name` and each row's number."""
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    files = pa.array([name] * table.num_rows, pa.string())
    return table.append_column(PROVENANCE[0], files).append_column(PROVENANCE[1], rows)


def reason_details(rules: PrefilterRules) -> dict[str, str]:
    """What each drop reason means under `rules` (a drop line's `detail`; its row's values are
    on the line beside it)."""
    return {
        "missing_url": f"no URL in {rules.url_col}",
        "too_small": f"width or height below {rules.min_width} x {rules.min_height}",
        "aspect_ratio": f"width / height outside [{rules.min_ratio}, {rules.max_ratio}]",
        "punsafe": f"punsafe above {rules.max_punsafe}",
        "pwatermark": f"pwatermark above {rules.max_pwatermark}",
    }


def _column_or_null(table: pa.Table, kind: pa.DataType, *names: str) -> pa.Array:
    """The first of `names` that `table` has, cast to `kind`; nulls when it has none."""
    column = _column(table, *names)
    return pa.nulls(table.num_rows, kind) if column is None else pc.cast(column, kind, safe=False)


def drop_lines(dropped: pa.Table, rules: PrefilterRules, source: str) -> pa.Table:
    """The drop lines of a batch's failing rows (DROP_SCHEMA): the drop fields (no key or image
    id yet: img2dataset gives them), the provenance, and the row's values the rules read."""
    n = dropped.num_rows
    reasons = list(REASONS)
    texts = reason_details(rules)
    detail = pc.take(
        pa.array([texts[r] for r in reasons]),
        pc.index_in(dropped["drop_reason"], pa.array(reasons)),
    )
    text = [rules.caption_col] if rules.caption_col else []
    return pa.table({
        "key": pa.nulls(n, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "image_id": pa.nulls(n, pa.string()),
        "drop_stage": pa.array([STAGE] * n, pa.string()),
        "drop_reason": dropped["drop_reason"],
        "detail": detail,
        **{name: dropped[name] for name in PROVENANCE},
        "url": pc.cast(dropped[rules.url_col], pa.string()),
        "text": _column_or_null(dropped, pa.string(), *text),
        "width": _column_or_null(dropped, pa.float64(), "WIDTH", "width"),
        "height": _column_or_null(dropped, pa.float64(), "HEIGHT", "height"),
        "punsafe": _column_or_null(dropped, pa.float64(), "punsafe"),
        "pwatermark": _column_or_null(dropped, pa.float64(), "pwatermark"),
    }, schema=DROP_SCHEMA)  # fmt: skip


DROP_SCHEMA = pa.schema(
    [("key", pa.string()), ("source", pa.string()), ("image_id", pa.string()),
     ("drop_stage", pa.string()), ("drop_reason", pa.string()), ("detail", pa.string()),
     (PROVENANCE[0], pa.string()), (PROVENANCE[1], pa.int64()), ("url", pa.string()),
     ("text", pa.string()), ("width", pa.float64()), ("height", pa.float64()),
     ("punsafe", pa.float64()), ("pwatermark", pa.float64())]
)  # fmt: skip


def open_parquet(path: str | os.PathLike) -> pq.ParquetFile:
    """A parquet file opened for reading (its footer read); a clear error if it is not one."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file: {err}") from err


def check_no_provenance(path: str | os.PathLike, names: list[str]) -> None:
    """Raise a clear error if a URL list already has the columns the prefilter adds."""
    taken = [c for c in PROVENANCE if c in names]
    if taken:
        raise ValueError(
            f"{path}: has column(s) {taken}, which groundset adds itself (the provenance of each "
            "row); rename them in the URL list"
        )


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


def row_batches(parquet: pq.ParquetFile, start: int, stop: int, batch_rows: int
                ) -> Iterator[tuple[int, pa.Table]]:  # fmt: skip
    """Batches of the rows [start, stop) of an open parquet file, each with its first row's
    number (only the row groups that hold them are read)."""
    offset = 0
    for group in range(parquet.num_row_groups):
        count = parquet.metadata.row_group(group).num_rows
        if offset < stop and offset + count > start:
            row = offset
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group]):
                low, high = max(start - row, 0), min(stop - row, batch.num_rows)
                if low < high:
                    yield row + low, pa.Table.from_batches([batch]).slice(low, high - low)
                row += batch.num_rows
        offset += count


def prefilter_file(
    path: Path,
    name: str,
    out: Path,
    drops: pq.ParquetWriter,
    rules: PrefilterRules,
    batch_rows: int,
    rows: tuple[int, int] | None = None,
) -> tuple[int, int, Counter]:
    """Stream one parquet file (its `rows` [start, stop); None: all) into `out` with provenance,
    its failing rows into `drops`; return its rows in, rows kept and drop counts (the source:
    the name of `out`'s folder)."""
    source = out.parent.name
    counts: Counter = Counter()
    rows_in = rows_out = 0
    with open_parquet(path) as parquet, atomic_write(out, "wb") as handle:
        schema = with_provenance(parquet.schema_arrow.empty_table(), name, 0).schema
        writer = pq.ParquetWriter(handle, schema)
        start, stop = rows or (0, parquet.metadata.num_rows)
        for first, batch in row_batches(parquet, start, stop, batch_rows):
            table = with_provenance(batch, name, first)
            kept, dropped, reasons = filter_table(table, rules)
            rows_in += table.num_rows
            rows_out += kept.num_rows
            counts.update(reasons)
            if kept.num_rows:
                writer.write_table(kept.cast(schema))
            if dropped.num_rows:
                drops.write_table(drop_lines(dropped, rules, source))
        writer.close()
    return rows_in, rows_out, counts


def check_file(path: Path, rules: PrefilterRules, required_columns: list[str]) -> None:
    """Raise a clear error if a URL-list file lacks a column img2dataset reads or already has
    a provenance column."""
    with open_parquet(path) as parquet:
        names = parquet.schema_arrow.names
    check_columns(path, names, rules.url_col, rules.caption_col, required_columns)
    check_no_provenance(path, names)


def prefilter_part(
    path: str | os.PathLike,
    part: dict,
    out: str | os.PathLike,
    stats_path: str | os.PathLike,
    dropped: str | os.PathLike,
    rules: PrefilterRules,
    required_columns: list[str] | None = None,
    batch_rows: int | None = None,
) -> dict:
    """Prefilter one download part (`part`: name, file, start, stop; `path`: its URL-list
    file) into the parquet file `out` with provenance, its drop lines into `dropped`; write and
    return the stats envelope."""
    path = Path(path)
    check_file(path, rules, required_columns or [])
    if batch_rows is None:
        batch_rows = section_defaults("download.prefilter")["batch_rows"]
    with atomic_write(dropped, "wb") as handle:
        drops = pq.ParquetWriter(handle, DROP_SCHEMA)
        rows_in, rows_out, counts = prefilter_file(
            path, part["file"], Path(out), drops, rules, batch_rows, (part["start"], part["stop"])
        )
        drops.close()
    reasons = {reason: counts.get(reason, 0) for reason in REASONS}
    stats = envelope(STAGE, rows_in, rows_out, reasons, rules=rules.__dict__, part=part)
    write_stats(stats_path, stats)
    log.info("%s rows %d-%d: %d kept, dropped %s", path, part["start"], part["stop"], rows_out,
             dict(counts))  # fmt: skip
    return stats


def prefilter_url_list(
    url_list: str | os.PathLike,
    outdir: str | os.PathLike,
    rules: PrefilterRules,
    required_columns: list[str] | None = None,
    batch_rows: int | None = None,
    dropped: str | os.PathLike | None = None,
) -> dict:
    """Stream every parquet file of a URL list into `outdir` with provenance columns, its failing
    rows as drop lines into the parquet file `dropped` (default `<outdir>_dropped.parquet`);
    return the stats envelope.

    `batch_rows` None: the schema's default of download.prefilter.batch_rows."""
    dropped = dropped or beside(outdir, "_dropped.parquet", folder=True)
    if batch_rows is None:
        batch_rows = section_defaults("download.prefilter")["batch_rows"]
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    files = list_parquet_files(url_list)
    root = Path(url_list) if Path(url_list).is_dir() else Path(url_list).parent
    for path in files:  # every file's columns first: a bad file fails before any is written
        check_file(path, rules, required_columns or [])
    totals: Counter = Counter()
    rows = [0, 0]
    per_file = {}
    with atomic_write(dropped, "wb") as handle:
        drops = pq.ParquetWriter(handle, DROP_SCHEMA)
        for path in files:
            name = path.relative_to(root).as_posix()
            rows_in, rows_out, counts = prefilter_file(
                path, name, outdir / path.name, drops, rules, batch_rows
            )
            per_file[name] = envelope(STAGE, rows_in, rows_out, counts)
            totals.update(counts)
            rows = [rows[0] + rows_in, rows[1] + rows_out]
            log.info("%s: %d rows in, %d kept, dropped %s", path, rows_in, rows_out, dict(counts))
        drops.close()
    reasons = {reason: totals.get(reason, 0) for reason in REASONS}
    return envelope(STAGE, rows[0], rows[1], reasons, rules=rules.__dict__, files=per_file)


def run_prefilter(
    url_list: str | os.PathLike,
    outdir: str | os.PathLike,
    stats_path: str | os.PathLike,
    rules: PrefilterRules,
    required_columns: list[str] | None = None,
    batch_rows: int | None = None,
    dropped: str | os.PathLike | None = None,
) -> dict:
    """Prefilter a URL list, write its drop lines and its stats envelope; return the stats."""
    stats = prefilter_url_list(url_list, outdir, rules, required_columns, batch_rows, dropped)
    write_stats(stats_path, stats)
    return stats
