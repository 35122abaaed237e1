"""Captioning throughput against the loopback stand-in server with a set answer latency.

(a) paced: sustained request rate vs the configured quota (target >= 95 %);
(b) unpaced (self-hosted server): images/s at high concurrency vs the ideal concurrency/latency;
(c) servers the jobs start (caption.serve.command): N caption jobs at once, each starting its own
    stand-in server as its own process (as a vLLM server is started), images/s against the ideal
    N x concurrency / latency (target >= 90 %), start-up and shutdown included;
(d) bytes per request with and without caption.max_pixels on the sample's largest images.

    python bench/bench_caption.py [--latency 1.5] [--rate 2] [--paced-images 60]
                                  [--concurrency 64] [--unpaced-images 640]
                                  [--instances 2] [--serve-concurrency 32] [--serve-images 4800]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from groundset.core.io import write_jsonl
from groundset.stages.caption import Settings, caption_chunk, load_payload
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
    assert stats["records_out"] == stats["records_in"], stats
    return {"wall": wall, "starts": starts, "records": stats["records_in"]}


ROOT = Path(__file__).resolve().parents[1]


def serve_job(folder: str, chunk: int, latency: float, concurrency: int) -> dict:
    """One caption job (its own process) that starts its own stand-in server for its chunk."""
    command = (f"{sys.executable} -m groundset.testing.vlm --port {{port}} --latency {latency} "
               f"--request-log {folder}/requests_{chunk}.jsonl")  # fmt: skip
    settings = Settings.from_config({
        "backend": "openai", "model": "stand-in", "concurrency": concurrency, "timeout_s": 60,
        "serve": {"command": command, "startup_timeout_s": 120},
    })  # fmt: skip
    base = Path(folder) / f"serve_{chunk}"
    began = time.perf_counter()
    stats = caption_chunk(
        Path(folder) / f"chunk_{chunk}.jsonl", f"{base}.jsonl", f"{base}_errors.jsonl",
        f"{base}_stats.json", f"{base}.journal.jsonl", settings, server_log=f"{base}.server.log",
    )  # fmt: skip
    assert stats["records_out"] == stats["records_in"], stats
    with open(f"{folder}/requests_{chunk}.jsonl") as handle:
        lines = [json.loads(line) for line in handle]
    return {"wall": time.perf_counter() - began, "records": stats["records_in"], "requests": lines}


def bench_serve(folder: Path, instances: int, concurrency: int, images: int, latency: float):
    """(c): `instances` jobs at once, each with its own server; images/s vs the ideal."""
    make_input(folder, images)
    records = (folder / "in.jsonl").read_text().splitlines(keepends=True)
    for chunk in range(instances):
        (folder / f"chunk_{chunk}.jsonl").write_text("".join(records[chunk::instances]))
    ideal = instances * concurrency / latency
    print(f"\n(c) {instances} caption jobs, each starting its own stand-in server "
          f"(caption.serve.command), concurrency {concurrency}, {latency:g} s per answer, "
          f"{images} images (ideal {ideal:.1f} images/s)")  # fmt: skip
    began = time.perf_counter()
    with cf.ProcessPoolExecutor(instances) as pool:
        jobs = [pool.submit(serve_job, str(folder), c, latency, concurrency)
                for c in range(instances)]  # fmt: skip
        results = [job.result() for job in jobs]
    wall = time.perf_counter() - began
    rows = [r for result in results for r in result["requests"]]
    servers = len({r["pid"] for r in rows})
    # start-up: from the jobs' start to the first request a server saw (monotonic clocks differ
    # per process: measured on the server's clock against its own first and last request)
    spans = []
    for result in results:
        mine = result["requests"]
        first, last = min(r["start"] for r in mine), max(r["end"] for r in mine)
        low, high = first + 0.1 * (last - first), first + 0.9 * (last - first)
        busy = sum(max(0.0, min(r["end"], high) - max(r["start"], low)) for r in mine)
        spans.append((last - first, busy / (high - low)))
    rate = images / wall
    in_flight = sum(f for _, f in spans) / len(spans)
    overhead = wall - max(span for span, _ in spans)
    print(f"{'servers':<8} {'images/s':>9} {'% of ideal':>11} {'in flight (middle 80 %)':>24} "
          f"{'start+stop s':>13} {'wall s':>7}")  # fmt: skip
    print(f"{servers:<8} {rate:>9.2f} {100 * rate / ideal:>10.1f}% "
          f"{in_flight:>17.1f} of {concurrency:<4} {overhead:>13.1f} {wall:>7.1f}")  # fmt: skip


def bench_payload(budget: int = 1003520, count: int = 5) -> None:
    """(d): request bytes of the sample's largest images, as is and within the pixel budget."""
    from PIL import Image

    sizes = []
    for path in (ROOT / "tests" / "data" / "sample" / "www" / "img").iterdir():
        try:
            with Image.open(path) as image:
                sizes.append((image.width * image.height, path))
        except OSError:  # the sample's broken files
            continue
    largest = [path for _, path in sorted(sizes, reverse=True)[:count]]
    print(f"\n(d) bytes per request (the image's data URL), max_pixels null vs {budget}")
    print(f"{'image':<34} {'as is':>10} {'budget':>10} {'ratio':>6}  sent size")
    total = [0, 0]
    for path in largest:
        as_is, shrunk = load_payload(str(path), None), load_payload(str(path), budget)
        a, b = len(as_is.data_url), len(shrunk.data_url)
        total[0] += a
        total[1] += b
        print(f"{path.name:<34} {a:>10,} {b:>10,} {a / b:>6.2f}  "
              f"{as_is.width}x{as_is.height} -> {shrunk.width}x{shrunk.height}")  # fmt: skip
    print(f"{'total':<34} {total[0]:>10,} {total[1]:>10,} {total[0] / total[1]:>6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=1.5, help="seconds per answer")
    parser.add_argument("--rate", type=float, default=2.0, help="quota, images/s")
    parser.add_argument("--paced-images", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--unpaced-images", type=int, default=640)
    parser.add_argument("--instances", type=int, default=2, help="(c) servers at once")
    parser.add_argument("--serve-concurrency", type=int, default=32, help="(c) per job")
    parser.add_argument("--serve-images", type=int, default=4800)
    parser.add_argument("--only", choices=["paced", "unpaced", "serve", "payload"], default=None)
    args = parser.parse_args()
    if args.only in ("serve", "payload"):
        with tempfile.TemporaryDirectory() as tmp:
            if args.only == "serve":
                bench_serve(Path(tmp), args.instances, args.serve_concurrency,
                            args.serve_images, args.latency)  # fmt: skip
            else:
                bench_payload()
        return 0

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
        serve_dir = folder / "serve"
        serve_dir.mkdir()
        bench_serve(serve_dir, args.instances, args.serve_concurrency, args.serve_images,
                    args.latency)  # fmt: skip
    bench_payload()
    return 0


if __name__ == "__main__":
    sys.exit(main())
