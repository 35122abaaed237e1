"""Drawings for inspection: entity boxes with labels, and SAM2 masks as coloured overlays.

A deterministic sample of N records (reservoir sampling with a fixed seed, one streaming pass)
is drawn into `draw/<source>/<image_id>.jpg` and `draw_sam2_mask/<source>/<image_id>.png`
(`draw/<image_id>.jpg` for a record without a source, as the seed's drawings).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from groundset.core.io import atomic_save, iter_jsonl
from groundset.core.records import image_path, record_boxes, record_relpath

COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]  # fmt: skip
MAX_SIDE = 1024


def sample_records(path: str | os.PathLike, n: int, seed: int = 0) -> list[dict]:
    """A uniform sample of `n` records (reservoir sampling: one pass, memory for n records)."""
    rng = random.Random(seed)
    sample: list[dict] = []
    for i, record in enumerate(iter_jsonl(path)):
        if i < n:
            sample.append(record)
        else:
            j = rng.randint(0, i)
            if j < n:
                sample[j] = record
    return sample


def _open(record: dict) -> tuple[Image.Image, float]:
    """The record's image as RGB, scaled to at most MAX_SIDE, and the scale."""
    with Image.open(image_path(record)) as img:
        img = img.convert("RGB")
    scale = min(1.0, MAX_SIDE / max(img.size))
    if scale < 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)))
    return img, scale


def draw_boxes(record: dict) -> Image.Image:
    """The image with each entity box outlined and labelled."""
    img, _ = _open(record)
    canvas = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    for i, (name, (x1, y1, x2, y2)) in enumerate(record_boxes(record)):
        colour = COLOURS[i % len(COLOURS)]
        box = (x1 * img.width, y1 * img.height, x2 * img.width, y2 * img.height)
        canvas.rectangle(box, outline=colour, width=width)
        left, top, right, bottom = canvas.textbbox((box[0] + width, box[1] + width), name)
        canvas.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
        canvas.text((box[0] + width, box[1] + width), name, fill=(0, 0, 0))
    return img


def load_masks(record: dict) -> np.ndarray:
    """(N, H, W) bool masks of a masked record (from its .npy file or its RLE)."""
    if record.get("mask_rle"):
        from groundset.stages.mask import decode_rle

        return decode_rle(record["mask_rle"])
    if record.get("mask_file"):
        return np.load(record["mask_file"])
    return np.zeros((0, 1, 1), dtype=bool)


def draw_masks(record: dict, alpha: float = 0.5) -> Image.Image:
    """The image with each entity's mask blended in its colour (and the boxes outlined)."""
    img, _ = _open(record)
    pixels = np.asarray(img, dtype=np.float32)
    for i, mask in enumerate(load_masks(record)):
        if mask.shape != (img.height, img.width):
            mask = np.asarray(Image.fromarray(mask).resize(img.size, Image.NEAREST))
        colour = np.asarray(COLOURS[i % len(COLOURS)], dtype=np.float32)
        pixels[mask] = (1 - alpha) * pixels[mask] + alpha * colour
    out = Image.fromarray(pixels.round().astype(np.uint8))
    canvas = ImageDraw.Draw(out)
    for i, (_, (x1, y1, x2, y2)) in enumerate(record_boxes(record)):
        canvas.rectangle((x1 * out.width, y1 * out.height, x2 * out.width, y2 * out.height),
                         outline=COLOURS[i % len(COLOURS)], width=2)  # fmt: skip
    return out


def _save(img: Image.Image, path: Path) -> None:
    """Save atomically, in the format the file name says (a full disk names the file)."""
    fmt = Image.registered_extensions()[path.suffix.lower()]
    atomic_save(path, lambda handle: img.save(handle, format=fmt))


def draw_sample(
    path: str | os.PathLike,
    boxes_dir: str | os.PathLike,
    masks_dir: str | os.PathLike,
    n: int = 50,
    seed: int = 0,
) -> dict:
    """Box drawings into `boxes_dir` (and mask overlays into `masks_dir` when the records have
    masks) of a sample, as <source>/<image_id>.jpg/.png; returns counts."""
    boxes_dir, masks_dir = Path(boxes_dir), Path(masks_dir)
    counts = {"boxes": 0, "masks": 0, "failed": 0}
    for record in sample_records(path, n, seed):
        try:
            _save(draw_boxes(record), boxes_dir / record_relpath(record, ".jpg"))
            counts["boxes"] += 1
            if "mask_scores" in record and (record.get("mask_file") or record.get("mask_rle")):
                _save(draw_masks(record), masks_dir / record_relpath(record, ".png"))
                counts["masks"] += 1
        except (OSError, ValueError):
            counts["failed"] += 1
    return counts
