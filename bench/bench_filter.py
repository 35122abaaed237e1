"""Filter stage throughput: the seed's data-juicer recipe as is vs groundset's score + select.

The same generated photo-like JPEGs (1024-2048 px) and the same random-weight models go through
(a) the seed's way: its five-filter recipe (header sizes off) run by stock data-juicer, every
op decoding every image it sees, one sample at a time; (b) groundset's: `groundset score` (the
probe, then data-juicer runs groundset's op: one decode per image at reduced size, batched
models, bf16 where the hardware has it) and `groundset select` (the thresholds). Thresholds are
open (aesthetics, the last filter, at its 0-10 range) so that both paths run every model on
every image (the same work). Each path is one job,
start-up included, as a shard job runs. Also reported: how far the fast scores are from stock
data-juicer's, and how many keep/drop decisions flip with thresholds at the scores' quantiles.

    python bench/bench_filter.py [--models tiny|real-size] [--np 2] [--device cpu|cuda]
                                 [--images 120] [--precision auto] [--decode draft]

First it says which machine it runs on (machines of one kind differ: AMX or not): the CPU, and
its bf16 and fp32 GEMM throughput (`torch.nn.functional.linear`, 2048² by 2048², on `--np`
threads) with their ratio, `ceiling: N.NN`, the most a bf16 path can gain over the seed's fp32.
After the table: each path's start-up (job seconds outside the scoring itself: imports, model
loads) and `steady_speedup: N.NN`, the speed-up once both are running. Ends with the line
`speedup: N.NN` (groundset images/s ÷ the seed's, whole jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("image_nsfw_score", "image_watermark_prob", "image_aesthetics_scores")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def make_images(folder: Path, count: int) -> list[Path]:
    """Photo-like JPEGs (smooth noise, ~2-3 bits/px) of 1024-2048 px on each side."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        w, h = int(rng.integers(1024, 2049)), int(rng.integers(1024, 2049))
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noise = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def run(cmd: list[str], env: dict | None = None) -> float:
    """Wall seconds of a command (its output is discarded unless it fails)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def write_config(path: Path, args: argparse.Namespace, models: dict, header_sizes: bool) -> Path:
    """A groundset config with open thresholds and the benchmark's models and settings."""
    open_bounds = {
        "image_shape": {"min_width": 0, "min_height": 0},
        "aspect_ratio": {"min_ratio": 0.01, "max_ratio": 100},
        "nsfw": {"model": models["nsfw"], "max_score": 1.0},
        "watermark": {"model": models["watermark"], "max_prob": 1.0},
        "aesthetics": {"model": models["aesthetics"], "min_score": 0, "max_score": 10},
    }
    config = {
        "sources": [{"name": "b", "url_list": "x"}],
        "filter": {
            "np": args.np,
            "template": str(ROOT / "config" / "data_juicer_filter.yaml"),
            "header_sizes": header_sizes,
            "precision": args.precision,
            "decode": args.decode,
            "device": args.device,
            "batch_size": args.batch_size,
            "aesthetics_tiers": [0, 0],
            **open_bounds,
        },
        # the filter loads no SAM2 or Emu3 weights; the config must still opt in
        "mask": {"random_weights": True},
        "export": {"emu3": {"random_weights": True}},
    }
    path.write_text(json.dumps(config))
    return path


def scores_of(path: Path) -> dict[str, dict[str, float]]:
    """image_id -> {score: value} from a JSONL with __dj__stats__."""
    out = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            stats = record["__dj__stats__"]
            out[record["image_id"]] = {key: float(stats[key][0]) for key in SCORES}
    return out


def deviation(stock: dict, fast: dict) -> dict[str, dict]:
    """Per score: max and mean absolute difference, and the worst share of flipped decisions
    with a threshold at each quantile of stock's scores (midway between two of them)."""
    ids = sorted(stock)
    report = {}
    for key in SCORES:
        a = np.array([stock[i][key] for i in ids])
        b = np.array([fast[i][key] for i in ids])
        ranked = np.sort(a)  # thresholds between two stock scores, never on a (tied) score
        cuts = [(ranked[int(q * len(a))] + ranked[int(q * len(a)) - 1]) / 2 for q in QUANTILES]
        flips = [float(np.mean((a <= t) != (b <= t))) for t in cuts]
        report[key] = {
            "max_abs": float(np.max(np.abs(a - b))),
            "mean_abs": float(np.mean(np.abs(a - b))),
            "spread": float(np.std(a)),
            "flipped": max(flips),
        }
    return report


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX (bf16 tiles) or only AVX512-BF16."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown CPU")  # fmt: skip
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))  # fmt: skip
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16"
    return f"{name} ({bf16})"


def gemm_gflops(dtype_name: str, threads: int, size: int = 2048, seconds: float = 2.0) -> float:
    """GFLOP/s of F.linear on this CPU in one dtype (warm, the best of a few timed rounds)."""
    import torch

    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    x = torch.randn(size, size).to(dtype)
    w = torch.randn(size, size).to(dtype)
    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        best, deadline = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=["tiny", "real-size"], default="tiny")
    parser.add_argument("--np", type=int, default=2, help="the seed's processes, our threads")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--decode", default="draft", choices=["draft", "full"])
    args = parser.parse_args()
    groundset = str(Path(sys.executable).with_name("groundset"))
    env = {**os.environ}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = (
            ""  # stock data-juicer's model ops take a GPU when they see one
        )
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "img", args.images)
        shard = tmp / "shard.jsonl"
        shard.write_text(
            "".join(
                json.dumps({"image": [str(p)], "text": "", "image_id": p.stem}) + "\n"
                for p in paths
            )
        )
        from groundset.testing.models import build_stand_in_models

        started = time.perf_counter()
        models = build_stand_in_models(tmp / "models", size=args.models)
        built = time.perf_counter() - started
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"{args.images} JPEGs ({mb:.0f} MiB, 1024-2048 px), {args.models} models with random "
            f"weights (built in {built:.0f} s), device {args.device}, np {args.np}, "
            f"{os.cpu_count()} cores"
        )
        bf16, fp32 = gemm_gflops("bfloat16", args.np), gemm_gflops("float32", args.np)
        print(f"cpu: {cpu_name()}, load {os.getloadavg()[0]:.2f}")
        print(
            f"gemm: bf16 {bf16:.0f} GFLOP/s, fp32 {fp32:.0f} GFLOP/s (F.linear, {args.np} threads)"
        )
        print(f"ceiling: {bf16 / fp32:.2f}")

        # (a) the seed's way: its recipe (thresholds open), stock data-juicer
        seed_cfg = write_config(tmp / "seed.yaml", args, models, header_sizes=False)
        seed_dir = tmp / "seed"
        seed_dir.mkdir()
        recipe = seed_dir / "recipe.yaml"
        seed_s = run([groundset, "dj-config", "--config", str(seed_cfg), "--input", str(shard),
                      "--output", str(recipe)], env)  # fmt: skip
        seed_s += run([groundset, "filter", "--config", str(seed_cfg), "--recipe", str(recipe),
                       "--output", str(seed_dir / "out.jsonl")], env)  # fmt: skip
        seed_ops = json.loads((seed_dir / "out_stats.json").read_text())["seconds_by_filter"]

        # (b) groundset: score (probe + one data-juicer op) then select
        ours_cfg = write_config(tmp / "ours.yaml", args, models, header_sizes=True)
        ours = tmp / "ours"
        ours.mkdir()
        score_s = run([groundset, "score", "--config", str(ours_cfg), "--input", str(shard),
                       "--output", str(ours / "scored.jsonl"), "--threads", str(args.np)], env)  # fmt: skip
        select_s = run([groundset, "select", "--config", str(ours_cfg), "--input",
                        str(ours / "scored.jsonl"), "--output", str(ours / "kept.jsonl")], env)  # fmt: skip
        score_stats = json.loads((ours / "scored_stats.json").read_text())
        kept = len((ours / "kept.jsonl").read_text().splitlines())
        seed_kept = len((seed_dir / "out.jsonl").read_text().splitlines())

        ours_s = score_s + select_s
        seed_rate, ours_rate = args.images / seed_s, args.images / ours_s
        print(f"{'path':<44}{'job s':>8}{'img/s':>9}")
        print(f"{'seed recipe, stock data-juicer':<44}{seed_s:>8.1f}{seed_rate:>9.2f}")
        print(f"    per-op seconds: {json.dumps({k: round(v, 1) for k, v in seed_ops.items()})}")
        label = f"groundset score+select ({score_stats['precision']}, {score_stats['decode']})"
        print(f"{label:<44}{ours_s:>8.1f}{ours_rate:>9.2f}")
        print(
            f"    score {score_s:.1f} s (data-juicer op {score_stats['seconds']:.1f} s, "
            f"{score_stats['images_per_second']} img/s inside), select {select_s:.1f} s"
        )
        print(f"    kept: seed {seed_kept}, groundset {kept} (of {args.images})")
        report = deviation(scores_of(seed_dir / "out.jsonl"), scores_of(ours / "scored.jsonl"))
        print("scores against stock data-juicer (thresholds at its 10/25/50/75/90 % quantiles):")
        for key, row in report.items():
            print(
                f"    {key:<24} max |d| {row['max_abs']:.2e}  mean |d| {row['mean_abs']:.2e}  "
                f"(spread {row['spread']:.2e})  decisions flipped {100 * row['flipped']:.2f} %"
            )
        seed_scoring = sum(seed_ops.values())
        seed_start, ours_start = seed_s - seed_scoring, ours_s - score_stats["seconds"]
        print(
            f"startup: seed {seed_start:.1f} s, groundset {ours_start:.1f} s (job s outside scoring)"
        )
        print(f"steady_speedup: {seed_scoring / score_stats['seconds']:.2f}")
        print(f"speedup: {ours_rate / seed_rate:.2f}")


if __name__ == "__main__":
    main()
