"""Wall time of `snakemake -n` once the split checkpoints know N shards over P download parts.

Each case lays down a finished upstream for every part (the URL list: P parquet files of
`--rows` rows each, one download part per file; the part's prefilter, download and manifest
outputs, a manifest of N / P × 10 records and its shard index, groundset's own index_manifest,
shard_size 10), so the dry-run plans every per-shard job (a score_shard and a select_shard job
per shard) and what follows. Targets: < 5 s for 118 shards, < 60 s for 10,000, also over the 85
parts of laion-high-resolution (170M rows at download.part_rows 2,000,000). On a shared machine
the time varies by ±15 % from run to run: `--repeat N` prints the fastest and the median.

    python bench/bench_dryrun.py [--cases 118x1 10000x1 170x85 10000x85] [--rows 2000000]
                                 [--profile profiles/slurm] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from groundset.stages.parts import Part, plan_parts, write_plan
from groundset.stages.split import index_manifest, write_index

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {118: 5, 10_000: 60}  # seconds, every run, by shards
# Per part, the outputs up to its shard index, upstream first ({p}: the part).
UPSTREAM = [
    "url_lists/big/{p}.parquet",
    "url_lists/big/{p}_stats.json",
    "url_lists/big/{p}_dropped.parquet",
    "downloads/big/{p}_stats.json",
    "downloads/big/{p}_dropped.jsonl",
    "manifest/big/{p}_stats.json",
    "manifest/big/{p}_dropped.jsonl",
    "manifest/big/{p}.jsonl",
    "shards/big/{p}/index.json",
]


def url_list(folder: Path, files: int, rows: int) -> list[Part]:
    """`files` parquet files of `rows` rows each (one value repeated: a few KB each); their
    parts, one per file."""
    folder.mkdir(parents=True)
    column = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int8()), pa.array(["u"]))
    table = pa.table({"URL": column, "TEXT": column})
    for i in range(files):
        pq.write_table(table, folder / f"part-{i:05d}.parquet")
    return plan_parts(folder, None)


def lay_down_part(work: Path, part: Part, records: int, stamp: float) -> None:
    """One part's outputs up to its shard index, each newer than the one before."""
    for i, pattern in enumerate(UPSTREAM):
        rel = pattern.format(p=part.name)
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(f"{part.name}.jsonl"):
            with open(path, "w") as out:
                out.writelines(json.dumps({"image_id": f"{part.name}_{j:09d}"}) + "\n"
                               for j in range(records))  # fmt: skip
        elif rel.endswith("index.json"):
            write_index(index_manifest(work / "manifest" / "big" / f"{part.name}.jsonl", 10), path)
        else:
            path.write_text("{}")
        os.utime(path, (stamp + i, stamp + i))


def lay_down(tmp: Path, shards: int, parts: int = 1, rows: int = 1) -> Path:
    """A config whose outputs up to the shard indexes exist (oldest first); returns the config."""
    folder = tmp / "urls"
    planned = url_list(folder, parts, rows)
    work = tmp / "results"
    # newer than every script, or a fresh checkout's scripts make the upstream rerun ("code changed")
    base = max(path.stat().st_mtime for path in (ROOT / "workflow").rglob("*")) + 10
    for path in folder.iterdir():
        os.utime(path, (base - 1, base - 1))
    write_plan(work / "url_lists" / "big_parts.json", "big", planned)
    os.utime(work / "url_lists" / "big_parts.json", (base, base))
    for i, part in enumerate(planned):
        share = shards // parts + (i < shards % parts)
        lay_down_part(work, part, share * 10, base + 1)
    config = {
        "workdir": str(work),
        "sources": [{"name": "big", "url_list": str(folder), "save_additional_columns": []}],
        "shard_size": 10,
        "download": {"part_rows": None},
        "caption": {"stand_in": True},
        # planning only: no model is loaded, so the stand-in weights are fine
        "mask": {"random_weights": True},
        "export": {"emu3": {"random_weights": True}},
    }
    path = tmp / "big.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["118x1", "1000x1", "10000x1", "170x85",
                                                       "10000x85"], help="SHARDSxPARTS")  # fmt: skip
    parser.add_argument("--rows", type=int, default=2_000_000, help="URL rows per part")
    parser.add_argument("--profile", default="profiles/local")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (fastest, median)")
    args = parser.parse_args()
    print(
        f"{'shards':>8} {'parts':>6} {'jobs planned':>13} {'fastest s':>10} {'median s':>9}  target"
    )
    for case in args.cases:
        shards, parts = map(int, case.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            config = lay_down(Path(tmp), shards, parts, args.rows)
            cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
                   "--profile", str(ROOT / args.profile), "--configfile", str(config), "-n", "--quiet", "rules"]  # fmt: skip
            times = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                times.append(time.perf_counter() - started)
                if done.returncode != 0:
                    print(done.stdout, done.stderr, file=sys.stderr)
                    return 1
            jobs = re.search(r"^total\s+(\d+)$", done.stdout, flags=re.M)
            target = TARGETS.get(shards)
            verdict = (
                ""
                if target is None
                else f"< {target} s " + ("ok" if max(times) < target else "MISSED")
            )
            print(f"{shards:>8,} {parts:>6} {jobs.group(1) if jobs else '?':>13} {min(times):>10.1f} "
                  f"{statistics.median(times):>9.1f}  {verdict}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
