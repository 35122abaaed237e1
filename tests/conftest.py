"""Shared fixtures: repository paths, tiny parquet URL lists, and a Snakemake runner."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from groundset.core.io import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests" / "data" / "sample"


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Write rows as a parquet file (nullable integer columns kept nullable)."""
    frame = pd.DataFrame.from_records(rows)
    for column in ("WIDTH", "HEIGHT"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


# Configs of workflow tests that never reach captioning: no API key needed (README: Captioning).
STAND_IN_CAPTIONS = {"caption": {"stand_in": True}}
# Configs of tests without model weights: SAM2 and the Emu3 tokenizer may be random (a null
# checkpoint or tokenizer is a config error otherwise).
RANDOM_WEIGHTS = {"mask": {"random_weights": True}, "export": {"emu3": {"random_weights": True}}}


def run_snakemake(args: list[str], cwd: Path = ROOT, check: bool = True, timeout: int = 900):
    """Run the real snakemake CLI of this interpreter; return the completed process."""
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled")
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"snakemake failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table snakemake prints (a dry-run's or a run's) as {rule: count}; empty
    when nothing is to be done."""
    if "Job stats:" not in output:
        assert "Nothing to be done" in output, output
        return {}
    table = output.split("Job stats:")[1].split("\n\n")[0]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M))
    return {rule: int(n) for rule, n in counts.items() if rule != "total"}


def write_config(path: Path, config: dict) -> Path:
    """Write a YAML config file."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def laion_rows() -> list[dict]:
    """A few URL-list rows in LAION's laion-high-resolution schema."""
    return [
        {
            "URL": "http://x/a.jpg",
            "TEXT": "a",
            "WIDTH": 2048,
            "HEIGHT": 1536,
            "similarity": 0.3,
            "hash": 1,
            "punsafe": 0.01,
            "pwatermark": 0.1,
            "LANGUAGE": "en",
        },
        {
            "URL": "http://x/b.jpg",
            "TEXT": "b",
            "WIDTH": 800,
            "HEIGHT": 1200,
            "similarity": 0.3,
            "hash": 2,
            "punsafe": 0.2,
            "pwatermark": 0.9,
            "LANGUAGE": "en",
        },
        {
            "URL": "http://x/c.jpg",
            "TEXT": "c",
            "WIDTH": 3000,
            "HEIGHT": 1024,
            "similarity": 0.3,
            "hash": 3,
            "punsafe": 0.5,
            "pwatermark": 0.2,
            "LANGUAGE": "de",
        },
        {
            "URL": "http://x/d.jpg",
            "TEXT": "d",
            "WIDTH": None,
            "HEIGHT": None,
            "similarity": 0.3,
            "hash": 4,
            "punsafe": None,
            "pwatermark": 0.95,
            "LANGUAGE": "en",
        },
        {
            "URL": "",
            "TEXT": "e",
            "WIDTH": 2048,
            "HEIGHT": 2048,
            "similarity": 0.3,
            "hash": 5,
            "punsafe": 0.0,
            "pwatermark": 0.0,
            "LANGUAGE": "en",
        },
        {
            "URL": "http://x/f.jpg",
            "TEXT": "f",
            "WIDTH": 2048,
            "HEIGHT": 1024,
            "similarity": 0.3,
            "hash": 6,
            "punsafe": 0.0,
            "pwatermark": 0.0,
            "LANGUAGE": "en",
        },
    ]


def fake_download(root, shards, per_shard, failures=0):
    """An img2dataset `files` tree: per shard `per_shard` successes and `failures` failed rows."""
    for s in range(shards):
        folder = root / f"{s:05d}"
        folder.mkdir(parents=True)
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            (folder / f"{key}.jpg").write_bytes(b"\xff\xd8")
            (folder / f"{key}.txt").write_text(f"caption {key}")
            (folder / f"{key}.json").write_text(
                json.dumps(
                    {
                        "caption": f"caption {key}",
                        "url": f"http://x/{key}.jpg",
                        "key": key,
                        "status": "success",
                        "error_message": None,
                        "width": 1024 + i,
                        "height": 768,
                        "original_width": 1024 + i,
                        "original_height": 768,
                        "exif": "{}",
                        "sha256": "0" * 64,
                        "similarity": 0.31,
                        "hash": 123,
                        "punsafe": float("nan"),
                        "pwatermark": 0.2,
                        "LANGUAGE": "en",
                    }
                )
            )
        (root / f"{s:05d}_stats.json").write_text(
            json.dumps(
                {
                    "count": per_shard + failures,
                    "successes": per_shard,
                    "failed_to_download": failures,
                    "failed_to_resize": 0,
                    "status_dict": {"success": per_shard, "HTTP Error 404": failures},
                }
            )
        )
    return root


def make_images(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Distinct RGB JPEGs of the given (width, height): random 6x6 colour blocks under noise, so
    that their perceptual hashes are far apart too (>= 14 bits; the dedup stage keeps them all)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        blocks = rng.integers(0, 200, (6, 6, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(blocks).resize((w, h), Image.NEAREST)).copy()
        pixels += rng.integers(0, 50, (h, w, 3), dtype=np.uint8)
        path = folder / f"{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def make_records(path: Path, images: list[Path], source: str = "src") -> list[dict]:
    """A JSONL of filter-stage records naming the images; returns the records."""
    records = [
        {
            "image": [str(p)],
            "text": f"alt {i}",
            "image_id": f"{i:09d}",
            "source": source,
            "__dj__stats__": {"image_aesthetics_scores": [6.0 + i / 10]},
        }  # fmt: skip
        for i, p in enumerate(images)
    ]
    write_jsonl(path, records)
    return records


def fake_vllm(folder: Path) -> Path:
    """A `vllm` program in `folder` whose `vllm serve MODEL --port P ...` starts the loopback
    OpenAI-compatible stand-in serving MODEL on P (put `folder` first on PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    program = folder / "vllm"
    program.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == 'serve', args\n"
        "port = args[args.index('--port') + 1]\n"
        f"os.execv({sys.executable!r}, [{sys.executable!r}, '-m', 'groundset.testing.vlm',\n"
        "         '--port', port, '--served-model-name', args[1]])\n"
    )
    program.chmod(0o755)
    return program


def _shared_root(tmp_path_factory) -> Path:
    """A folder all pytest-xdist workers of this session share (the basetemp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def run_sample_once(tmp_path_factory) -> dict:
    """The bundled sample through the local profile, whole DAG, run once per session.

    Under pytest-xdist the first worker to ask runs it, the others wait on a lock and read the
    result. `snapshot` is a copy of the finished workdir taken right after the run, before any
    test changes the workdir (tests that compare with it or start from it use the copy).
    """
    from filelock import FileLock

    root = _shared_root(tmp_path_factory) / "sample_run"
    root.mkdir(exist_ok=True)
    workdir, snapshot, result = root / "results", root / "snapshot", root / "result.json"
    args = [
        "--profile",
        str(ROOT / "profiles" / "local"),
        "--configfile",
        "config/sample.yaml",
        "--config",
        f"workdir={workdir}",
        "--cores",
        "2",
    ]
    with FileLock(str(root / "lock")):
        if not result.exists():
            started = time.time()
            done = run_snakemake(args)
            seconds = time.time() - started
            shutil.copytree(workdir, snapshot, symlinks=True)
            output = done.stdout + done.stderr
            result.write_text(json.dumps({"output": output, "seconds": seconds}))
    saved = json.loads(result.read_text())
    return {"workdir": workdir, "snapshot": snapshot, "args": args, **saved}


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory):
    """The finished sample run (shared by the workflow, config-change and SLURM tests)."""
    return run_sample_once(tmp_path_factory)


@pytest.fixture(scope="session")
def sample_run_later(tmp_path_factory):
    """A function returning the finished sample run: a test that needs it only at its end (the
    SLURM test) does its own work first, in parallel with the worker that runs the sample."""
    return lambda: run_sample_once(tmp_path_factory)
