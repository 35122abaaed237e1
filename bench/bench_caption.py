"""Captioning throughput against the loopback stand-in server with a set answer latency.

(a) paced: sustained request rate vs the configured quota (target >= 95 %);
(b) unpaced (self-hosted server): images/s at high concurrency vs the ideal concurrency/latency.

    python bench/bench_caption.py [--latency 1.5] [--rate 2] [--paced-images 60]
                                  [--concurrency 64] [--unpaced-images 640]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from groundset.caption import Settings, caption_chunk
from groundset.io import write_jsonl
from groundset.testing.vlm import STAND_IN_KEY, StandInVLM


def make_input(folder: Path, count: int, distinct: int = 32, side: int = 512) -> Path:
    """`count` records cycling over `distinct` JPEGs of side x side pixels."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(distinct):
        path = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
        images.append(path)
    records = (
        {"image": [str(images[i % distinct])], "image_id": f"{i:09d}", "source": "bench"}
        for i in range(count)
    )
    path = folder / "in.jsonl"
    write_jsonl(path, records)
    return path


def run(folder: Path, records: Path, backend: str, latency: float, **caption) -> dict:
    """Caption `records` once (fresh journal); return wall time and the server's request starts."""
    with StandInVLM(latency=latency) as server:
        url = server.openai_url if backend == "openai" else server.dashscope_url
        settings = Settings.from_config({"backend": backend, "base_url": url, **caption})
        settings = replace(settings, api_key=STAND_IN_KEY)
        tag = f"{backend}_{time.monotonic_ns()}"
        began = time.perf_counter()
        stats = caption_chunk(
            records, folder / f"{tag}.jsonl", folder / f"{tag}_errors.jsonl",
            folder / f"{tag}_stats.json", folder / f"{tag}.journal.jsonl", settings,
        )  # fmt: skip
        wall = time.perf_counter() - began
        starts = sorted(entry.start for entry in server.log)
    assert stats["captioned"] == stats["records"], stats
    return {"wall": wall, "starts": starts, "records": stats["records"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.5, help="seconds per answer")
    parser.add_argument("--rate", type=float, default=2.0, help="quota, images/s")
    parser.add_argument("--paced-images", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--unpaced-images", type=int, default=640)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paced_in = make_input(folder, args.paced_images)
        print(f"(a) paced at {args.rate:g} images/s, {args.latency:g} s per answer, "
              f"{args.paced_images} images, concurrency 8")  # fmt: skip
        window = 10.0
        allowed = f"max in {window:g} s (quota {args.rate * window:g})"
        print(
            f"{'backend':<10} {'sustained/s':>12} {'% of quota':>11} {'overall/s':>10} {allowed:>28}"
        )
        for backend in ("dashscope", "openai"):
            result = run(folder, paced_in, backend, args.latency,
                         rate_per_second=args.rate, concurrency=8)  # fmt: skip
            starts = result["starts"]
            sustained = (len(starts) - 1) / (starts[-1] - starts[0])
            overall = result["records"] / result["wall"]
            densest = max(sum(1 for t in starts if s <= t < s + window) for s in starts)
            print(f"{backend:<10} {sustained:>12.3f} {100 * sustained / args.rate:>10.1f}% "
                  f"{overall:>10.3f} {densest:>28d}")  # fmt: skip

        unpaced_in = make_input(folder, args.unpaced_images)
        ideal = args.concurrency / args.latency
        print(f"\n(b) no rate limit, concurrency {args.concurrency}, {args.latency:g} s per answer, "
              f"{args.unpaced_images} images (ideal {ideal:.1f} images/s)")  # fmt: skip
        print(f"{'backend':<10} {'images/s':>10} {'% of ideal':>11} {'wall s':>8}")
        for backend in ("dashscope", "openai"):
            result = run(folder, unpaced_in, backend, args.latency,
                         rate_per_second=None, concurrency=args.concurrency)  # fmt: skip
            rate = result["records"] / result["wall"]
            print(
                f"{backend:<10} {rate:>10.2f} {100 * rate / ideal:>10.1f}% {result['wall']:>8.1f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
