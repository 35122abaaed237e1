"""Dedup stage: hashing images/s, grouping records/s, and peak memory at 10k vs N records.

Two parts, each a `dedup_records` job in a fresh process (start-up and imports included):
(a) hashing: `--hash-records` records over a few hundred generated photo-like 1024x768 JPEGs,
no cache, every image read, sha256'd and decoded (JPEG draft) for its phash, at 1 and
`--threads` threads; (b) grouping: 10k and `--records` records whose hashes come from a
prepared hash cache (each record its own file path, hard links to a few files), with ~6% byte
copies, ~4% repeated URLs and ~6% near duplicates (1-4 bits off), so the run is the cache
look-up, the grouping and the two JSON passes; its peak RSS is compared with 10k records'.

    python bench/bench_dedup.py [--records 100000] [--hash-records 2000] [--threads 2]

Target: peak memory near flat (a few hundred bytes per record over the interpreter's own).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
from common import in_child
from PIL import Image

DRAFT_NOTE = "JPEG draft decode"


def make_images(folder: Path, count: int) -> list[str]:
    """Photo-like 1024x768 JPEGs (smooth noise), distinct enough for their phashes to differ."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 255, (768 // 32 + 1, 1024 // 32 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((1024, 768), Image.BILINEAR))
        noise = rng.normal(0, 6, img.shape)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def record(i: int, path: str, url: str, rng: random.Random) -> dict:
    """A filtered record as the dedup stage reads it."""
    return {
        "image": [path],
        "text": f"a photo of the sunset over the city number {i}",
        "image_id": f"{i:09d}",
        "source": "laion-high-resolution",
        "url": url,
        "meta": {"similarity": round(rng.random(), 4), "punsafe": 0.001, "LANGUAGE": "en"},
        "width": 1024,
        "height": 768,
        "__dj__stats__": {
            "image_aesthetics_scores": [round(rng.uniform(5, 7), 4)],
            "image_nsfw_score": [0.0001],
            "image_watermark_prob": [0.2],
        },
    }


def make_cached_run(folder: Path, records: int) -> tuple[Path, Path]:
    """Records with distinct files (hard links) and a hash cache holding their hashes."""
    rng = random.Random(records)
    links = folder / "links"
    links.mkdir(parents=True)
    originals: dict[int, tuple[Path, os.stat_result]] = {}
    manifest, cache = folder / "in.jsonl", folder / "hash_cache.sqlite"
    seen: list[tuple[str, int, str]] = []  # (sha256, phash, url) of earlier records
    entries = []
    with open(manifest, "w") as out:
        for i in range(records):
            path = str(links / f"{i:09d}.jpg")
            if i // 50_000 not in originals:  # a file takes ~65,000 hard links at most
                original = folder / f"one_{i // 50_000}.jpg"
                original.write_bytes(b"x" * 1000)
                originals[i // 50_000] = original, original.stat()
            original, stat = originals[i // 50_000]
            os.link(original, path)
            sha, phash = f"{rng.getrandbits(256):064x}", rng.getrandbits(64)
            url = f"https://example.com/img/{i:x}.jpg"
            pick = rng.random()
            if seen and pick < 0.06:  # the same bytes again
                sha, phash, _ = rng.choice(seen)
            elif seen and pick < 0.10:  # the same URL again
                url = rng.choice(seen)[2]
            elif seen and pick < 0.16:  # a re-encode: a few bits off
                phash = rng.choice(seen)[1]
                for bit in rng.sample(range(64), rng.randint(1, 4)):
                    phash ^= 1 << bit
            seen.append((sha, phash, url))
            out.write(json.dumps(record(i, path, url, rng)) + "\n")
            entry = {
                "path": path,
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "url": url,
                "sha256": sha,
                "phash": f"{phash:016x}",
                "error": None,
                "v": 1,
            }
            entries.append(entry)
    from groundset.stages.dedup import HashCache

    with HashCache(cache) as db:
        db.append(entries)
    return manifest, cache


def peak_code(path: Path) -> str:
    """Code that writes the process's own RSS high-water mark (MiB) to `path`: ru_maxrss (what
    common.in_child reports) keeps the parent's across fork and exec, and this script's process
    is the larger one while it holds the generated images."""
    status = "open('/proc/self/status').read()"
    return (
        f"import re; open({str(path)!r}, 'w')"
        f".write(str(int(re.search(r'VmHWM:\\s+(\\d+)', {status})[1]) / 1024))"
    )


def dedup_in_child(folder: Path, manifest: Path, threads: int, cache: Path | None) -> dict:
    """One dedup job in a fresh interpreter: its stats, wall seconds and peak RSS (MiB)."""
    stats, peak = folder / "stats.json", folder / "peak.txt"
    code = (
        "from groundset.stages.dedup import dedup_records; "
        f"dedup_records({str(manifest)!r}, {str(folder / 'out.jsonl')!r}, "
        f"{str(folder / 'dropped.jsonl')!r}, {str(stats)!r}, max_distance=4, threads={threads}, "
        f"cache={str(cache) if cache else None!r}); " + peak_code(peak)
    )
    run = in_child(code)
    run["peak_rss_mb"] = float(peak.read_text())
    return {**run, "stats": json.loads(stats.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--hash-records", type=int, default=2000)
    parser.add_argument("--images", type=int, default=300, help="distinct images to hash")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--near", type=int, nargs="*", default=[100_000, 1_000_000], help="near search sizes"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        peak = tmp / "peak.txt"
        baseline = in_child("import groundset.stages.dedup; " + peak_code(peak))
        baseline["peak_rss_mb"] = float(peak.read_text())
        print(
            f"python start + import groundset.stages.dedup: {baseline['seconds']:.2f} s, "
            f"{baseline['peak_rss_mb']:.0f} MiB peak"
        )

        images = make_images(tmp / "img", args.images)
        rng = random.Random(0)
        manifest = tmp / "hash_in.jsonl"
        with open(manifest, "w") as out:
            for i in range(args.hash_records):
                rec = record(i, images[i % len(images)], f"https://example.com/{i}.jpg", rng)
                out.write(json.dumps(rec) + "\n")
        print(
            f"\nhashing: {args.hash_records:,} records over {len(images)} 1024x768 JPEGs "
            f"({DRAFT_NOTE}, no cache)"
        )
        print(f"{'threads':>8}{'hash s':>9}{'images/s':>10}{'job s':>8}{'peak MiB':>10}")
        for threads in sorted({1, args.threads}):
            run = dedup_in_child(tmp, manifest, threads, None)
            seconds = run["stats"]["seconds_by_step"]["hash"]
            print(
                f"{threads:>8}{seconds:9.2f}{args.hash_records / seconds:10.0f}"
                f"{run['seconds']:8.2f}{run['peak_rss_mb']:10.0f}"
            )

        print("\ngrouping: hashes from the cache, ~16% duplicates (bytes, URL, near)")
        print(
            f"{'records':>9}{'records/s':>11}{'load+stat s':>12}{'group s':>9}{'write s':>9}"
            f"{'kept':>9}{'sha':>6}{'url':>6}{'phash':>7}{'peak MiB':>10}"
        )
        peaks = {}
        for count in sorted({10_000, args.records}):
            folder = tmp / f"cached_{count}"
            manifest, cache = make_cached_run(folder, count)
            run = dedup_in_child(folder, manifest, args.threads, cache)
            stats = run["stats"]
            steps, kinds = stats["seconds_by_step"], stats["dropped"]
            assert stats["hashed"] == 0 and stats["hash_cache_hits"] == count, stats
            peaks[count] = run["peak_rss_mb"]
            print(
                f"{count:>9,}{count / stats['seconds']:11,.0f}{steps['hash']:12.2f}"
                f"{steps['group']:9.2f}{steps['write']:9.2f}{stats['records_out']:9,}"
                f"{kinds['sha256']:6,}{kinds['url']:6,}{kinds['phash']:7,}{run['peak_rss_mb']:10.0f}"
            )
        if len(peaks) == 2:
            (small, low), (large, high) = sorted(peaks.items())
            per_record = (high - low) * 2**20 / (large - small)
            print(
                f"peak memory: {low:.0f} MiB at {small:,}, {high:.0f} MiB at {large:,} records: "
                f"{per_record:.0f} bytes per record"
            )

        print("\nnear-duplicate search alone (near_pairs, max_distance 4, random distinct hashes)")
        print(f"{'hashes':>10}{'seconds':>9}{'hashes/s':>11}{'compared':>14}")
        for count in args.near:
            code = (
                "import numpy as np, time; from groundset.stages.dedup import near_pairs; "
                f"h = np.unique(np.random.default_rng(0).integers(0, 2**64 - 1, {count}, "
                "np.uint64)); t = time.perf_counter(); r = near_pairs(h, 4); "
                f"open({str(peak)!r}, 'w').write(f'{{len(h)}} {{time.perf_counter() - t}} {{r[3]}}')"
            )
            in_child(code)
            hashes, seconds, compared = (float(v) for v in peak.read_text().split())
            print(f"{hashes:>10,.0f}{seconds:9.2f}{hashes / seconds:11,.0f}{compared:14,.0f}")


if __name__ == "__main__":
    main()
