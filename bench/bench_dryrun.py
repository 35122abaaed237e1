"""Wall time of `snakemake -n` once the split checkpoint knows N shards (118, 1,000, 10,000).

Each case lays down a finished upstream (URL list, download and manifest stats, a manifest of
N × 10 records) and its shard index (groundset's own index_manifest, shard_size 10), so the
dry-run plans every per-shard job (a score_shard and a select_shard job per shard) and what follows. Targets:
< 5 s for 118 shards, < 60 s for 10,000. On a shared machine the time varies by ±15 % from run
to run: `--repeat N` prints the fastest and the median of N runs.

    python bench/bench_dryrun.py [--shards 118 1000 10000] [--profile profiles/slurm] [--repeat 3]
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

import pandas as pd
import yaml

from groundset.stages.split import index_manifest, write_index

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {118: 5, 10_000: 60}  # seconds, every run
UPSTREAM = [
    "url_lists/big/urls.parquet",
    "url_lists/big_stats.json",
    "downloads/big_stats.json",
    "manifest/big_stats.json",
    "manifest/big.jsonl",
    "shards/big/index.json",
]


def lay_down(tmp: Path, shards: int) -> Path:
    """A config whose outputs up to the shard index exist (oldest first); returns the config."""
    url_list = tmp / "urls.parquet"
    pd.DataFrame([{"URL": "http://x/a.jpg", "TEXT": "t"}]).to_parquet(url_list)
    work = tmp / "results"
    # newer than every script, or a fresh checkout's scripts make the upstream rerun ("code changed")
    base = max(path.stat().st_mtime for path in (ROOT / "workflow").rglob("*")) + 10
    for i, rel in enumerate(UPSTREAM):
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel == "manifest/big.jsonl":
            with open(path, "w") as out:
                out.writelines(
                    json.dumps({"image_id": f"{j:09d}"}) + "\n" for j in range(shards * 10)
                )
        elif rel == "shards/big/index.json":
            write_index(index_manifest(work / "manifest/big.jsonl", 10), path)
        else:
            path.write_text("{}")
        stamp = base + i
        os.utime(path, (stamp, stamp))
        if rel.startswith("url_lists/big/"):
            os.utime(path.parent, (stamp, stamp))
    os.utime(url_list, (base - 1, base - 1))
    config = {
        "workdir": str(work),
        "sources": [{"name": "big", "url_list": str(url_list), "save_additional_columns": []}],
        "shard_size": 10,
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
    parser.add_argument("--shards", type=int, nargs="+", default=[118, 1000, 10000])
    parser.add_argument("--profile", default="profiles/local")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case (fastest, median)")
    args = parser.parse_args()
    print(f"{'shards':>8} {'jobs planned':>13} {'fastest s':>10} {'median s':>9}  target")
    for shards in args.shards:
        with tempfile.TemporaryDirectory() as tmp:
            config = lay_down(Path(tmp), shards)
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
            print(f"{shards:>8,} {jobs.group(1) if jobs else '?':>13} {min(times):>10.1f} "
                  f"{statistics.median(times):>9.1f}  {verdict}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
