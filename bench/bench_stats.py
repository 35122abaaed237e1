"""Statistics and drawing sample over large grounded JSONL files: records/s and peak memory.

Memory must stay flat as the file grows (fixed-bin histograms, a reservoir of N records).

    python bench/bench_stats.py [--records 100000 1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import in_child  # noqa: E402


def make_file(path: Path, count: int) -> None:
    """`count` masked-stage records with 3 entities each."""
    rng = random.Random(0)
    names = [f"thing {i}" for i in range(500)]
    with open(path, "w") as out:
        for i in range(count):
            entities = []
            for _ in range(3):
                x1, y1 = rng.random() * 0.5, rng.random() * 0.5
                entities.append({"entity": rng.choice(names),
                                 "bbox": [round(x1, 3), round(y1, 3), round(x1 + 0.3, 3), round(y1 + 0.4, 3)]})  # fmt: skip
            record = {"image": f"/data/{i}.jpg", "image_id": f"{i:09d}", "source": "s",
                      "caption": "a caption of some length " * 4, "entities": entities,
                      "mask_scores": [round(rng.random(), 4) for _ in range(3)],
                      "mask_file": f"/masks/{i}.npy",
                      "__dj__stats__": {"image_width": [2048], "image_height": [1365],
                                        "image_aesthetics_scores": [6 + rng.random()],
                                        "image_nsfw_score": [rng.random() / 2000],
                                        "image_watermark_prob": [rng.random()],
                                        "aspect_ratios": [1.5]}}  # fmt: skip
            out.write(json.dumps(record) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    print(f"{'records':>10} {'step':<14} {'seconds':>8} {'records/s':>11} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.records:
            path = Path(tmp) / f"{count}.jsonl"
            make_file(path, count)
            steps = {
                "stats": f"from groundset.tools.stats import collect_stats; collect_stats({str(path)!r})",
                "draw sample": f"from groundset.tools.draw import sample_records; sample_records({str(path)!r}, 50)",
            }
            for step, code in steps.items():
                r = in_child(code)
                print(f"{count:>10,} {step:<14} {r['seconds']:>8.2f} {count / r['seconds']:>11,.0f} "
                      f"{r['peak_rss_mb']:>9.0f}", flush=True)  # fmt: skip
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
