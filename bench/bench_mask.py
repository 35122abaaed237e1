"""SAM2 masks: the seed's loop vs groundset's batched path, same model, images and device.

(a) seed: per image, decode, `set_image`, one `predict(box=(N,4), multimask_output=False)`,
    fp32, `np.save` of the masks;
(b) groundset: `groundset.stages.mask.mask_chunk` (decode thread pool, batched encoder on the
    device, bf16 autocast on CUDA, one prompt batch per image, atomic .npy writes, journal).
Random weights (no checkpoint): timing does not depend on them.

    python bench/bench_mask.py [--model tiny|small|base_plus|large ...] [--images 8]
                               [--width 1536 --height 1024] [--entities 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from groundset.core.io import write_jsonl
from groundset.stages.mask import MaskChunkFiles, Masker, MaskSettings, load_model, mask_chunk

CONFIGS = {
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "large": "configs/sam2.1/sam2.1_hiera_l.yaml",
}


def make_records(folder: Path, count: int, width: int, height: int, entities: int) -> Path:
    """`count` JPEGs (smooth shapes on a gradient) and captioned records with `entities` boxes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    records = []
    for i in range(count):
        pixels = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], -1)
        boxes = []
        for _ in range(entities):
            x1, y1 = rng.uniform(0, 0.6, 2)
            x2, y2 = x1 + rng.uniform(0.15, 0.4), y1 + rng.uniform(0.15, 0.4)
            boxes.append([round(x1, 3), round(y1, 3), round(x2, 3), round(y2, 3)])
            r1, r2, c1, c2 = int(y1 * height), int(y2 * height), int(x1 * width), int(x2 * width)
            pixels[r1:r2, c1:c2] = rng.integers(0, 255, 3)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
        records.append({
            "image": [str(path)], "image_id": f"{i:09d}", "source": "bench", "caption": "c",
            "entities": [{"entity": f"e{j}", "bboxes": [b]} for j, b in enumerate(boxes)],
        })  # fmt: skip
    path = folder / "captioned.jsonl"
    write_jsonl(path, records)
    return path


def sync(device) -> None:
    """Wait for the GPU (timings must include its work)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def seed_loop(predictor, records: list[dict], out: Path) -> None:
    """The seed's predict_mask_with_sam2.py loop."""
    out.mkdir(parents=True, exist_ok=True)
    for record in records:
        image = np.array(Image.open(record["image"][0]).convert("RGB"))
        h, w = image.shape[:2]
        boxes = np.array([e["bboxes"][0] for e in record["entities"]]) * [w, h, w, h]
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(box=boxes, multimask_output=False)
        np.save(out / f"{record['image_id']}.npy", masks)


def chunk_files(folder: Path, name: str) -> MaskChunkFiles:
    """One mask job's files under `folder` (its masks in masks_<name>/)."""
    return MaskChunkFiles(
        records=str(folder / f"{name}.jsonl"), dropped=str(folder / f"{name}_d.jsonl"),
        stats=str(folder / f"{name}.json"), masks=str(folder / f"masks_{name}"),
        journal=str(folder / f"{name}.journal"),
    )  # fmt: skip


def bench_model(name: str, args, folder: Path, records_path: Path, records: list[dict]) -> dict:
    """Images/s of both paths for one model size."""
    import torch

    settings = MaskSettings.from_config({"model_config": CONFIGS[name], "device": args.device,
                                         "batch_size": args.batch_size,
                                         "decode_workers": args.decode_workers})  # fmt: skip
    predictor, device = load_model(settings)
    # warm-up both paths (CUDA context, kernels) on the first image
    seed_loop(predictor, records[:1], folder / "warm")
    warm = folder / f"warm_{name}.jsonl"
    write_jsonl(warm, records[:1])
    masker = Masker(predictor, device)
    mask_chunk(warm, chunk_files(folder, f"w_{name}"), settings, masker)
    sync(device)

    began = time.perf_counter()
    seed_loop(predictor, records, folder / f"seed_{name}")
    sync(device)
    seed = time.perf_counter() - began

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    began = time.perf_counter()
    stats = mask_chunk(records_path, chunk_files(folder, f"g_{name}"), settings, masker)
    sync(device)
    ours = time.perf_counter() - began
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    assert stats["records_out"] == len(records) and stats["computed"] == len(records), stats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    del predictor, masker
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"device": str(device), "seed": len(records) / seed, "ours": len(records) / ours,
            "peak_gib": peak}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tiny"], choices=sorted(CONFIGS))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--entities", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode-workers", type=int, default=4)
    parser.add_argument("--profile", action="store_true", help="cProfile groundset's path")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        records_path = make_records(folder, args.images, args.width, args.height, args.entities)
        import json

        records = [json.loads(line) for line in records_path.open()]
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"{args.images} images {args.width}x{args.height}, {args.entities} boxes each, "
              f"batch {args.batch_size}, {args.decode_workers} decode workers, {name}, torch {torch.__version__}")  # fmt: skip
        print(f"{'model':<10} {'device':<7} {'seed img/s':>11} {'groundset img/s':>16} "
              f"{'ratio':>6} {'peak GiB':>9}")  # fmt: skip
        for model in args.model:
            r = bench_model(model, args, folder, records_path, records)
            print(f"{model:<10} {r['device']:<7} {r['seed']:>11.2f} {r['ours']:>16.2f} "
                  f"{r['ours'] / r['seed']:>5.2f}x {r['peak_gib']:>9.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
