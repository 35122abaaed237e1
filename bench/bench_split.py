"""Split a 1,000,000-record manifest: records/s and peak memory per shard size, next to `cat`.

Run: `python bench/bench_split.py [--records N]`. Target: split <= 2x cat, peak memory flat in
the shard size.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

from common import best_of, in_child, timed_shell


def make_manifest(path: Path, records: int) -> None:
    """A manifest of realistic records (absolute path, alt text, LAION metadata)."""
    rng = random.Random(0)
    words = [
        "a",
        "photo",
        "of",
        "the",
        "sunset",
        "over",
        "city",
        "mountains",
        "with",
        "river",
        "and",
        "people",
        "in",
        "red",
        "dress",
    ]
    with open(path, "w") as handle:
        for i in range(records):
            record = {
                "image": [f"/data/laion/laion-high-resolution/{i // 10000:05d}/{i:09d}.jpg"],
                "text": " ".join(rng.choices(words, k=rng.randint(3, 20))),
                "image_id": f"{i:09d}",
                "source": "laion-high-resolution",
                "url": f"https://example.com/img/{rng.getrandbits(64):x}.jpg",
                "meta": {
                    "similarity": round(rng.random(), 4),
                    "hash": rng.getrandbits(62),
                    "punsafe": round(rng.random() / 100, 6),
                    "pwatermark": round(rng.random(), 4),
                    "LANGUAGE": "en",
                },
                "width": 1024 + i % 2000,
                "height": 1024 + i % 1000,
            }
            handle.write(json.dumps(record) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        manifest = tmp / "manifest.jsonl"
        make_manifest(manifest, args.records)
        size_mb = manifest.stat().st_size / 2**20
        timed_shell(f"cat {manifest} > /dev/null")  # warm the page cache

        def fresh(target: Path) -> None:
            """Untimed: remove the previous run's output and flush dirty pages, so runs start equal."""
            subprocess.run(f"rm -rf {target} && sync", shell=True, check=True)

        def cat_run(sync: bool) -> float:
            fresh(tmp / "copy")
            return timed_shell(
                f"cat {manifest} > {tmp}/copy" + (f" && sync {tmp}/copy" if sync else "")
            )

        def split_run(shard_size: int, fsync: bool) -> dict:
            out = tmp / f"shards_{shard_size}"
            fresh(out)
            return in_child(
                f"from groundset.stages.split import split_manifest; "
                f"split_manifest({str(manifest)!r}, {str(out)!r}, {shard_size}, fsync={fsync})"
            )

        cat = best_of(5, lambda: cat_run(False))
        synced = best_of(5, lambda: cat_run(True))

        def row(name: str, seconds: float, peak: float | None = None) -> None:
            peak_text = f"{peak:10.0f}" if peak is not None else f"{'':>10}"
            print(
                f"{name:<34}{seconds:9.3f}{args.records / seconds:14,.0f}{seconds / cat:8.2f}"
                f"{seconds / synced:12.2f}{peak_text}"
            )

        print(
            f"manifest: {args.records:,} records, {size_mb:.0f} MiB (warm page cache; best of 3-5 runs)"
        )
        print("groundset times include starting Python and importing it (see the last line)")
        print(
            f"{'step':<34}{'seconds':>9}{'records/s':>14}{'x cat':>8}{'x cat+sync':>12}{'peak MiB':>10}"
        )
        row("cat > copy", cat)
        row("cat > copy && sync copy", synced)
        for shard_size in (10_000, 100_000, 500_000):
            for fsync in (True, False):
                result = best_of(3, lambda s=shard_size, f=fsync: split_run(s, f))
                label = f"split {shard_size:,}/shard" + ("" if fsync else " (no fsync)")
                row(label, result["seconds"], result["peak_rss_mb"])
        code = f"from groundset.stages.split import index_manifest; index_manifest({str(manifest)!r}, 500000)"
        result = best_of(3, lambda: in_child(code))
        row("index only (the checkpoint)", result["seconds"], result["peak_rss_mb"])
        baseline = in_child("import groundset.stages.split")
        print(
            f"python start + import groundset.stages.split: {baseline['seconds']:.3f} s, "
            f"{baseline['peak_rss_mb']:.0f} MiB peak"
        )


if __name__ == "__main__":
    main()
