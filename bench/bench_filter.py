"""Filter stage throughput: the seed's data-juicer recipe vs groundset's, on generated JPEGs.

N photo-like JPEGs of 1024-2048 px (a few below 1024 and off-aspect so every filter works) go
through (a) the seed's recipe as is: data-juicer's five filters, each decoding every image it
sees; (b) groundset's: the probe (one reduced-size decode that also validates the file, sizes
from the header) then the same five data-juicer filters, whose shape and aspect checks now
need no decode. Both use the tiny stand-in models, so image decoding dominates, which is what
the change targets; with real-size models on CPU the models dominate instead (see the note at
the end). Prints images/s of the processing (data-juicer's own per-op times plus the probe)
and of the whole job including data-juicer's start-up, for np = 1 and 2, and the ratio.

Run: `python bench/bench_filter.py [--images 120]`.
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


def make_images(folder: Path, count: int) -> list[Path]:
    """Photo-like JPEGs (smooth noise, ~2-3 bits/px) of 1024-2048 px, some too small or too wide."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        w, h = int(rng.integers(1024, 2049)), int(rng.integers(1024, 2049))
        if i % 10 == 0:
            w = 900  # fails the shape filter
        elif i % 10 == 1:
            w, h = 2048, 1000 if w > 0 else h  # fails shape (h < 1024)
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noise = rng.normal(0, 6, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def run(cmd: list[str]) -> float:
    """Wall seconds of a command (its output is discarded unless it fails)."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_variant(
    tmp: Path, groundset: list[str], shard: Path, variant: str, np_: int, tag: str
) -> dict:
    """One filter job (probe + dj-config + filter for groundset; dj-config + filter for the seed)."""
    cfg = tmp / f"{variant}{np_}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "sources": [{"name": "b", "url_list": "x"}],
                "filter": {
                    "np": np_,
                    "stand_in_models": True,
                    "header_sizes": variant == "groundset",
                    "template": str(ROOT / "config" / "data_juicer_filter.yaml"),
                    "nsfw": {"max_score": 0.5},
                    "watermark": {"max_prob": 0.9},
                    "aesthetics": {"min_score": 0, "max_score": 10},
                },
                # the filter loads no SAM2 or Emu3 weights; the config must still opt in
                "mask": {"random_weights": True},
                "export": {"emu3": {"random_weights": True}},
            }
        )
    )
    work = tmp / f"run_{variant}{np_}_{tag}"
    work.mkdir()
    dataset, probe_seconds = shard, 0.0
    if variant == "groundset":
        dataset = work / "probed.jsonl"
        probe_seconds = run(
            [
                *groundset,
                "probe",
                "--config",
                str(cfg),
                "--input",
                str(shard),
                "--output",
                str(dataset),
                "--threads",
                str(np_),
            ]
        )
    run(
        [
            *groundset,
            "dj-config",
            "--config",
            str(cfg),
            "--input",
            str(dataset),
            "--output",
            str(work / "recipe.yaml"),
            "--models-dir",
            str(tmp / "models"),
        ]
    )
    job = (
        run(
            [
                *groundset,
                "filter",
                "--config",
                str(cfg),
                "--recipe",
                str(work / "recipe.yaml"),
                "--output",
                str(work / "out.jsonl"),
            ]
        )
        + probe_seconds
    )
    stats = json.loads((work / "out_stats.json").read_text())
    return {
        "job": job,
        "processing": sum(stats["seconds_by_filter"].values()) + probe_seconds,
        "ops": stats["seconds_by_filter"],
        "probe": probe_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--images", type=int, default=160, help="the larger shard; the smaller is a quarter"
    )
    args = parser.parse_args()
    groundset = [str(Path(sys.executable).with_name("groundset"))]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        paths = make_images(tmp / "img", args.images)
        sizes = {"small": args.images // 4, "large": args.images}
        shards = {}
        for tag, count in sizes.items():
            shards[tag] = tmp / f"shard_{tag}.jsonl"
            shards[tag].write_text(
                "".join(
                    json.dumps({"image": [str(p)], "text": "", "image_id": p.stem}) + "\n"
                    for p in paths[:count]
                )
            )
        mb = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"{args.images} JPEGs ({mb:.0f} MiB, 1024-2048 px), tiny stand-in models, 2-core machine."
        )
        print(
            "marginal img/s = extra images / extra processing seconds between a shard of "
            f"{sizes['small']} and one of {sizes['large']} (removes data-juicer's fixed per-op costs)"
        )
        print(
            f"{'variant':<12}{'np':>3}{'marginal img/s':>16}{'job s (large)':>15}{'job img/s':>11}"
        )
        marginal = {}
        for np_ in (1, 2):
            for variant in ("seed", "groundset"):
                small = run_variant(tmp, groundset, shards["small"], variant, np_, "small")
                large = run_variant(tmp, groundset, shards["large"], variant, np_, "large")
                extra = sizes["large"] - sizes["small"]
                marginal[(variant, np_)] = extra / max(
                    large["processing"] - small["processing"], 1e-9
                )
                print(
                    f"{variant:<12}{np_:>3}{marginal[(variant, np_)]:>16.1f}{large['job']:>15.1f}"
                    f"{args.images / large['job']:>11.1f}"
                )
                print(
                    f"    per-op seconds (large): {json.dumps(large['ops'])}, probe {large['probe']:.1f}"
                )
            print(
                f"  groundset / seed at np={np_}: {marginal[('groundset', np_)] / marginal[('seed', np_)]:.2f}x"
            )
        print(
            "Real-size models on CPU (DEPENDENCIES.md): ViT-B/16 0.21 s/img each for NSFW and watermark,"
            " CLIP ViT-L/14 1.04 s/img for aesthetics: on CPU the models, not decoding, set the pace."
        )


if __name__ == "__main__":
    main()
