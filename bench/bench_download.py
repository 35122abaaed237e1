"""Download parts against one img2dataset: the same URLs, the same processes in all.

A loopback server answers every URL with one of the sample's JPEGs after `--latency` seconds
(a remote host's round trip). The seed's way is one img2dataset over the whole URL list with
`--processes` processes; the parts' way cuts the list into `--parts` parts (what
download.part_rows does) and runs one img2dataset per part, `processes / parts` processes each,
all at once (as Snakemake runs download_part jobs side by side on one machine). Target: the
parts' images/s at least 0.9 of the seed's, so that splitting costs nothing. Both run
groundset.stages.download.download_source, the code of the download_part job.

    python bench/bench_download.py [--urls 2000] [--parts 4] [--processes 4] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pyarrow as pa
import pyarrow.parquet as pq

from groundset.stages.download import download_source
from groundset.stages.parts import plan_parts
from groundset.stages.prefilter import PrefilterRules, prefilter_part

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "tests" / "data" / "sample" / "www" / "img" / "chelsea.jpg"
TARGET = 0.9  # the parts' images/s over the seed's


@contextlib.contextmanager
def slow_server(latency: float):
    """A loopback HTTP server answering every path with IMAGE after `latency` s; its base URL."""
    body = IMAGE.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            time.sleep(latency)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def options(processes: int) -> dict:
    """The download options of the run: small img2dataset shards, no resize (the sample image is
    smaller than 1024 px: the time is the network's, as a real download's)."""
    return {"processes_count": processes, "thread_count": 16, "number_sample_per_shard": 100,
            "image_size": 1024, "resize_only_if_bigger": True}  # fmt: skip


def timed(work: Path, lists: list[Path], processes: int) -> float:
    """Seconds to download every list at once, `processes` img2dataset processes each."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(lists)) as pool:
        jobs = [pool.submit(download_source, urls, work / urls.stem, work / f"{urls.stem}.json",
                            options(processes), []) for urls in lists]  # fmt: skip
        for job in jobs:
            assert job.result()["records_out"] > 0
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, slow_server(args.latency) as base:
        tmp = Path(tmp)
        rows = [{"URL": f"{base}/{i}.jpg", "TEXT": f"t{i}"} for i in range(args.urls)]
        pq.write_table(pa.Table.from_pylist(rows), tmp / "urls.parquet")
        rules = PrefilterRules.from_config({"download": {"prefilter": {"enabled": False}}})
        parts = []
        for part in plan_parts(tmp / "urls.parquet", -(-args.urls // args.parts)):
            out = tmp / "lists" / f"{part.name}.parquet"
            prefilter_part(tmp / "urls.parquet", vars(part), out, tmp / f"{part.name}_s.json",
                           tmp / f"{part.name}_d.parquet", rules)  # fmt: skip
            parts.append(out)
        seed = timed(tmp / "seed", [tmp / "urls.parquet"], args.processes)
        split = timed(tmp / "parts", parts, max(1, args.processes // len(parts)))
    ratio = seed / split
    print(f"{args.urls} URLs, {args.latency * 1000:.0f} ms each, {args.processes} processes in all")
    print(f"one img2dataset:      {seed:7.1f} s  {args.urls / seed:7.1f} images/s")
    print(f"{len(parts)} parts at once:      {split:7.1f} s  {args.urls / split:7.1f} images/s")
    print(f"parts / seed: {ratio:.2f} (target >= {TARGET}) {'ok' if ratio >= TARGET else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
