"""Helpers for the benchmarks: run a step in a fresh process, report wall time and peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import time

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def in_child(code: str) -> dict:
    """Run `code` in a new interpreter; return its own wall seconds and peak RSS (MiB)."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, code], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed_shell(cmd: str) -> float:
    """Wall seconds of a shell command."""
    start = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True)
    return time.perf_counter() - start


def best_of(n: int, func) -> dict | float:
    """The fastest of `n` runs (by seconds) of `func`."""
    runs = [func() for _ in range(n)]
    return min(runs, key=lambda r: r["seconds"] if isinstance(r, dict) else r)
