"""Build a manifest from an img2dataset-style tree of 100,000 images: records/s and peak memory.

Next to it: `cat` of the same sidecar bytes (find | xargs cat), the floor for any walker that
reads every sidecar. Run: `python bench/bench_manifest.py [--images N]`. Memory must not grow
with the number of images (compare --images 20000 and 100000).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

from common import best_of, in_child, timed_shell


def make_tree(root: Path, images: int, per_shard: int = 10_000) -> None:
    """img2dataset `files` output: per image a tiny .jpg, its .txt caption and .json sidecar."""
    rng = random.Random(0)
    for shard in range(-(-images // per_shard)):
        folder = root / f"{shard:05d}"
        folder.mkdir(parents=True)
        count = min(per_shard, images - shard * per_shard)
        for i in range(count):
            key = f"{shard:05d}{i:04d}"
            caption = f"a photo number {key} of something"
            (folder / f"{key}.jpg").write_bytes(b"\xff\xd8\xff\xd9")
            (folder / f"{key}.txt").write_text(caption)
            meta = {
                "caption": caption,
                "url": f"https://example.com/{rng.getrandbits(64):x}.jpg",
                "key": key,
                "status": "success",
                "error_message": None,
                "width": 1500,
                "height": 1200,
                "original_width": 1500,
                "original_height": 1200,
                "exif": "{}",
                "sha256": "0" * 64,
                "similarity": 0.31,
                "hash": rng.getrandbits(62),
                "punsafe": 0.001,
                "pwatermark": 0.2,
                "LANGUAGE": "en",
            }
            (folder / f"{key}.json").write_text(json.dumps(meta, indent=4))
        stats = {
            "count": count,
            "successes": count,
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "status_dict": {"success": count},
        }
        (root / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        root = Path(tmp) / "downloads"
        make_tree(root, args.images)
        cat_cmd = f"find {root} -name '*.json' -print0 | xargs -0 cat > /dev/null"
        timed_shell(cat_cmd)  # warm the cache
        cat = best_of(3, lambda: timed_shell(cat_cmd))
        code = (
            "from groundset.stages.manifest import build_manifest; "
            f"build_manifest({str(root)!r}, {str(Path(tmp) / 'm.jsonl')!r}, 'laion-high-resolution', "
            "['similarity', 'hash', 'punsafe', 'pwatermark', 'LANGUAGE'])"
        )
        result = best_of(3, lambda: in_child(code))
        base = in_child("import groundset.stages.manifest")
        print(
            f"tree: {args.images:,} images in {-(-args.images // 10_000)} shard folders "
            f"(3 files each; warm cache; best of 3)"
        )
        print(f"{'step':<36}{'seconds':>9}{'images/s':>12}{'x cat':>8}{'peak MiB':>10}")
        print(f"{'find | xargs cat (sidecars)':<36}{cat:9.3f}{args.images / cat:12,.0f}{1:8.2f}")
        print(
            f"{'groundset manifest':<36}{result['seconds']:9.3f}{args.images / result['seconds']:12,.0f}"
            f"{result['seconds'] / cat:8.2f}{result['peak_rss_mb']:10.0f}"
        )
        print(
            f"import groundset.stages.manifest alone: {base['seconds']:.3f} s, {base['peak_rss_mb']:.0f} MiB peak"
        )


if __name__ == "__main__":
    main()
