"""Download stage: run the real img2dataset on a (prefiltered) parquet URL list, resumably."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import IO

from groundset.core.config import TUNING, keys_for
from groundset.core.io import atomic_write, clean_json_value, dumps_record, read_json
from groundset.core.layout import beside
from groundset.core.stats import drop_line, envelope, write_stats

log = logging.getLogger(__name__)

STAGE = "download"
# img2dataset's outcomes of a row that gave no image: the download's drop reasons.
FAILURES = ("failed_to_download", "failed_to_resize")

FINGERPRINT_FILE = "groundset_url_list.sha256"
# Keys of the `download` config that are groundset's own, not img2dataset arguments.
NOT_IMG2DATASET = {"prefilter", "extra_args", "part_rows", "max_parallel"}
# `download:` keys that change what img2dataset writes (which URLs succeed, the bytes, the
# layout and ids): the params of download_part.
OUTPUT_KEYS = keys_for("download", "download")
# Tuning knobs: how fast img2dataset downloads (and where it reports), never what: the job
# reads them from the config at run time, so changing one marks nothing stale.
TUNING_KEYS = keys_for("download", "download", TUNING)
# The pre-download filter's: its thresholds are the prefilter_urls job's params, batch_rows
# (rows per parquet batch, a memory bound) a knob.
PREFILTER_OUTPUT_KEYS = keys_for("download", "prefilter")
PREFILTER_TUNING_KEYS = keys_for("download", "prefilter", TUNING)


def output_options(options: dict) -> dict:
    """The img2dataset keys of a source's effective `download` settings that change its files."""
    return {k: v for k, v in options.items() if k in OUTPUT_KEYS}


def tuning_options(options: dict) -> dict:
    """The img2dataset tuning knobs of a source's effective `download` settings."""
    return {k: v for k, v in options.items() if k in TUNING_KEYS}


def img2dataset_kwargs(
    opts: dict, url_list: str, output_folder: str, save_columns: list[str]
) -> dict:
    """Keyword arguments of `img2dataset.download` for one source."""
    kwargs = {k: v for k, v in opts.items() if k not in NOT_IMG2DATASET}
    kwargs.update(opts.get("extra_args", {}))
    kwargs.update(
        url_list=str(url_list),
        output_folder=str(output_folder),
        save_additional_columns=list(save_columns),
        incremental_mode="incremental",
    )
    return kwargs


def img2dataset_command(kwargs: dict) -> list[str]:
    """The img2dataset command line (fire syntax) for `kwargs`, run with this interpreter."""
    args = [sys.executable, "-m", "img2dataset.main"]
    for key, value in kwargs.items():
        if isinstance(value, list | dict):
            value = json.dumps(value)
        args.append(f"--{key}={value}")
    return args


def url_list_rows(
    files: list[Path], opts: dict | None = None, save_columns: list[str] | None = None
) -> int:
    """Total rows of parquet files, read from their footers; with `opts` (a filled `download`
    section), check their columns.

    The check names the file and its columns where img2dataset would die inside pyarrow (the
    prefilter checks too, but `groundset download` may be given a URL list of its own).
    """
    from groundset.stages.prefilter import (  # lazily: the manifest imports this module
        check_columns,
        open_parquet,
    )

    rows = 0
    for path in files:
        with open_parquet(path) as parquet:
            if opts is not None:
                check_columns(path, parquet.schema_arrow.names, opts["url_col"],
                              opts["caption_col"], save_columns or [])  # fmt: skip
            rows += parquet.metadata.num_rows
    return rows


def url_list_fingerprint(files: list[Path]) -> str:
    """Cheap identity of a URL list: names, sizes and the parquet footers (last 64 KiB)."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as handle:
            handle.seek(max(0, size - 65536))
            digest.update(handle.read())
    return digest.hexdigest()


def options_digest(opts: dict, save_columns: list[str]) -> str:
    """Identity of what img2dataset is asked to write (OUTPUT_KEYS and the saved columns; the
    tuning knobs left out): a folder made under other options is downloaded again."""
    wanted = {"options": output_options(opts), "columns": list(save_columns)}
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()


def prepare_output(output_folder: Path, fingerprint: str, options: str | None = None) -> bool:
    """Keep a resumable download folder if it was made from the same URL list and the same
    output options (a folder marked before options were recorded counts as made with these),
    else clear it."""
    marker = output_folder / FINGERPRINT_FILE
    if output_folder.exists():
        lines = marker.read_text().split() if marker.exists() else []
        same_list = lines[:1] == [fingerprint]
        if same_list and (len(lines) < 2 or options is None or lines[1] == options):
            log.info("resuming download in %s (img2dataset skips finished shards)", output_folder)
            return True
        why = "another URL list" if not same_list else "other img2dataset options"
        log.warning("%s was made from %s: removing it", output_folder, why)
        shutil.rmtree(output_folder)
    output_folder.mkdir(parents=True)
    with atomic_write(marker) as handle:
        handle.write(fingerprint + "\n" + (options + "\n" if options else ""))
    return False


def collect_stats(output_folder: str | os.PathLike) -> dict:
    """img2dataset's per-shard `*_stats.json` files summed into the download's stats envelope
    (rows in, images out, failures by kind; extras: shards, img2dataset's status counts)."""
    totals: Counter = Counter()
    status: Counter = Counter()
    shards = 0
    for path in sorted(Path(output_folder).glob("*_stats.json")):
        shard = read_json(path)
        shards += 1
        for key in ("count", "successes", *FAILURES):
            totals[key] += int(shard.get(key, 0))
        status.update({k: int(v) for k, v in shard.get("status_dict", {}).items()})
    return envelope(
        STAGE,
        totals["count"],
        totals["successes"],
        {reason: totals[reason] for reason in FAILURES},
        shards=shards,
        status=dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def provenance_columns(files: list[Path], save_columns: list[str]) -> list[str]:
    """`save_columns` and the prefilter's provenance columns where every file has them (a URL
    list given to `groundset download` directly has none)."""
    from groundset.stages.prefilter import PROVENANCE, open_parquet  # lazily, as below

    present = set(PROVENANCE)
    for path in files:
        with open_parquet(path) as parquet:
            present &= set(parquet.schema_arrow.names)
    return [*save_columns, *(c for c in PROVENANCE if c in present and c not in save_columns)]


def write_drop_lines(
    output_folder: str | os.PathLike,
    dropped: str | os.PathLike,
    source: str | None = None,
    part: str | None = None,
) -> int:
    """The drop lines of the rows img2dataset gave no image (its shard tables' rows whose status
    is not success: drop_reason the status, detail its error); return how many. `source`
    (default: the folder's name) and `part` (a download part: image ids `<part>_<key>`)."""
    import pyarrow.parquet as pq  # lazily: the manifest imports this module

    from groundset.stages.parts import image_id  # lazily, as above

    folder = Path(output_folder)
    source = source or folder.name
    count = 0
    with atomic_write(dropped) as out:
        for table in sorted(folder.glob("*.parquet")):
            try:
                rows = pq.read_table(table, filters=[("status", "!=", "success")]).to_pylist()
            except (OSError, ValueError) as err:  # pyarrow's errors are both
                raise RuntimeError(
                    f"{table}: img2dataset's shard table is unreadable ({err}); delete it and its "
                    "_stats.json, then rerun: img2dataset downloads that shard again"
                ) from err
            for row in rows:
                key = row.get("key")
                record = {
                    "image_id": image_id(part, key) if part and key is not None else key,
                    "source": source,
                    **clean_json_value(row),
                }
                line = drop_line(record, STAGE, str(row.get("status")), row.get("error_message"))
                out.write(dumps_record(line) + "\n")
            count += len(rows)
    return count


def run_img2dataset(kwargs: dict, env: dict, stdout: IO | None = None) -> None:
    """Run img2dataset in a child process; raise if it fails."""
    cmd = img2dataset_command(kwargs)
    log.info("running: %s", " ".join(cmd[1:]))
    done = subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT if stdout else None)
    if done.returncode != 0:
        raise RuntimeError(f"img2dataset exited with status {done.returncode}")


def fetch(kwargs: dict, serve_dir: str | os.PathLike | None, stdout: IO | None) -> None:
    """Run img2dataset with `kwargs` (wandb off unless asked; with a `serve_dir`, through the
    sample's loopback server)."""
    from groundset.stand_ins import sample_proxy  # only with a serve_dir

    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    if not kwargs.get("enable_wandb"):
        env["WANDB_MODE"] = "disabled"
    with contextlib.ExitStack() as stack:
        if serve_dir:
            env = stack.enter_context(sample_proxy(serve_dir, env))  # the sample's
        run_img2dataset(kwargs, env, stdout)


def download_source(
    url_list: str | os.PathLike,
    output_folder: str | os.PathLike,
    stats_path: str | os.PathLike,
    opts: dict,
    save_columns: list[str],
    serve_dir: str | os.PathLike | None = None,
    stdout: IO | None = None,
    dropped: str | os.PathLike | None = None,
    part: dict | None = None,
    source: str | None = None,
) -> dict:
    """Download every row of `url_list` into `output_folder` (img2dataset `files`), write the
    rows that gave no image as drop lines (`dropped`, default `<output_folder>_dropped.jsonl`)
    and the stats; `opts`: the source's `download` options (what they leave out, the schema
    fills); `part`: the download part it is (its name prefixes the drop lines' image ids)."""
    from groundset.core.config import (
        fill_section,  # lazily, as below: the manifest imports this module
    )
    from groundset.stages.prefilter import list_parquet_files

    # what the options leave out is the schema's default, never img2dataset's own (url, 256 px)
    opts = fill_section("download", opts)
    output_folder = Path(output_folder).resolve()
    files = list_parquet_files(url_list)
    expected = url_list_rows(files, opts, save_columns)
    save_columns = provenance_columns(files, save_columns)
    prepare_output(output_folder, url_list_fingerprint(files), options_digest(opts, save_columns))
    if expected:
        kwargs = img2dataset_kwargs(
            opts, str(Path(url_list).resolve()), str(output_folder), save_columns
        )
        fetch(kwargs, serve_dir, stdout)
    stats = collect_stats(output_folder)
    stats["stand_in"] = bool(serve_dir)  # the sample's loopback server, not the internet
    if part is not None:
        stats["part"] = part
    if stats["records_in"] != expected:
        raise RuntimeError(
            f"img2dataset processed {stats['records_in']} of {expected} rows of {url_list}; "
            "rerun to resume the missing shards"
        )
    dropped = dropped or beside(output_folder, "_dropped.jsonl", folder=True)
    lines = write_drop_lines(output_folder, dropped, source, part and part["name"])
    if lines != sum(stats["dropped"].values()):
        log.warning("%s: img2dataset's tables name %d failed rows, its stats %s", output_folder,
                    lines, stats["dropped"])  # fmt: skip
    write_stats(stats_path, stats)
    log.info(
        "%s: %d of %d downloaded, failed: %s",
        output_folder,
        stats["records_out"],
        expected,
        stats["dropped"],
    )
    return stats
