"""The three model scores of the filter stage, computed together: one decode, batched, bf16.

data-juicer's `image_nsfw_filter`, `image_watermark_filter` and `image_aesthetics_filter` score
one sample at a time and each decodes the full image. `ImageScorer` loads the same models the
same way (data-juicer's own `prepare_model` / `get_model`, so `models_home` and the processors
are data-juicer's) and scores a batch of images at once:

- each image is decoded once for the three models; with `decode="draft"` at reduced size
  (JPEG DCT scaling to the smallest size the models' processors need), with `"full"` exactly as
  data-juicer loads it;
- batches run on the job's device (`device="auto"`: its GPU when it has one);
- `precision="bf16"` runs the transformers under bf16 autocast (CUDA, and CPUs with AMX or
  AVX512-BF16); softmax and the aesthetics head stay fp32. `fp32` + `full` is the exact mode:
  data-juicer's scores within float rounding.

The groundset data-juicer op (`groundset.stages.filter.dj_op`) calls it, so data-juicer stays the engine.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
DECODES = ("draft", "full")
# data-juicer's stats keys of the five filters (data_juicer.utils.constant.StatsKeys)
WIDTH, HEIGHT, ASPECT = "image_width", "image_height", "aspect_ratios"
NSFW, WATERMARK, AESTHETICS = "image_nsfw_score", "image_watermark_prob", "image_aesthetics_scores"
SIZE_KEYS = (WIDTH, HEIGHT, ASPECT)
DRAFT_FACTOR = 2
STATS_KEYS = (*SIZE_KEYS, NSFW, WATERMARK, AESTHETICS)
# Per image, why it could not be decoded when scoring ("" when it could): an image changed after
# the probe. A list of strings in every record, so the stats column keeps one type.
SCORE_ERRORS = "groundset_score_errors"


def dj_ops_path() -> str:
    """The file of groundset's data-juicer op (a recipe's `custom_operator_paths`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "dj_op.py")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AMX or AVX512-BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when torch sees a GPU (the job's, under SLURM), else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """`auto` → `bf16` on CUDA with bf16 support and on CPUs with AMX/AVX512-BF16, else `fp32`."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


@dataclass(frozen=True)
class Decoded:
    """One image as the models see it: the decoded picture, its header size, or why it failed."""

    image: object | None  # PIL.Image in RGB
    size: tuple[int, int] | None  # (width, height) of the file, before any draft reduction
    error: str | None = None


def decode(path: str, mode: str, min_side: int) -> Decoded:
    """Decode an image once for the three models: `draft` at the reduced size, `full` as data-juicer."""
    from PIL import Image

    try:
        if mode == "full":
            from data_juicer.utils.mm_utils import load_image

            image = load_image(path)  # data-juicer's own loader: the exact mode
            return Decoded(image, image.size)
        with Image.open(path) as img:
            size = img.size
            img.draft("RGB", (min_side, min_side))  # JPEG: DCT-scaled, still >= min_side
            return Decoded(img.convert("RGB"), size)
    except Exception as err:  # noqa: BLE001 (any decoder error is reported per image)
        return Decoded(None, None, f"{type(err).__name__}: {err}")


def processor_min_side(processor) -> int:
    """The smallest image side a processor resizes to (what a draft decode must keep)."""
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None) or {}
    sides = [v for k, v in dict(size).items() if k in ("shortest_edge", "height", "width") and v]
    crop = getattr(image_processor, "crop_size", None) or {}
    sides += [v for v in dict(crop).values() if v]
    return max(sides or [224])


class ImageScorer:
    """data-juicer's three filter models, loaded once, scoring batches of decoded images."""

    def __init__(
        self,
        models: dict[str, str],
        *,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        import torch
        from data_juicer.utils.model_utils import get_model, prepare_model

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        loaded = {}
        for name, model_type in (
            ("nsfw", "huggingface"),
            ("watermark", "huggingface"),
            ("aesthetics", "simple_aesthetics"),
        ):
            key = prepare_model(model_type=model_type, pretrained_model_name_or_path=models[name])
            model, processor = get_model(key, None, False)  # on CPU; moved below
            loaded[name] = (model.to(self.device).eval(), processor)
        self.models = loaded
        # a draft decode keeps twice the largest side a processor resizes to: as fast as 1x on
        # LAION sizes (the same DCT scale) and half the score deviation (bench/bench_filter.py)
        self.min_side = DRAFT_FACTOR * max(processor_min_side(p) for _, p in loaded.values())
        self._torch = torch

    def _autocast(self):
        """bf16 autocast on the scorer's device, or nothing (fp32)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return self._torch.autocast(self.device.split(":")[0], dtype=self._torch.bfloat16)

    def _classify(self, name: str, images: list) -> list[float]:
        """Positive-class probability (index 1, as data-juicer reads it) per image."""
        torch = self._torch
        model, processor = self.models[name]
        inputs = processor(images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode(), self._autocast():
            logits = model(**inputs).logits
        return torch.softmax(logits.float(), dim=-1)[:, 1].tolist()

    def _aesthetics(self, images: list) -> list[float]:
        """LAION aesthetics on 0-10: CLIP vision tower (autocast), normalized embedding and head in fp32."""
        torch = self._torch
        from transformers import CLIPVisionModelWithProjection

        model, processor = self.models["aesthetics"]
        inputs = processor(images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            with self._autocast():
                embeds = CLIPVisionModelWithProjection.forward(
                    model, pixel_values=inputs["pixel_values"], return_dict=True
                ).image_embeds
            embeds = embeds.float()
            embeds = embeds / embeds.norm(dim=-1, keepdim=True)
            head = model.layers if hasattr(model, "layers") else model.predictor  # v2 | v1
            scores = head(embeds)[:, 0]  # outside autocast: fp32
        return scores.tolist()

    def score(self, images: list) -> dict[str, list[float]]:
        """The three scores of every image of a batch (aesthetics on LAION's 0-10 scale)."""
        if not images:
            return {NSFW: [], WATERMARK: [], AESTHETICS: []}
        return {
            NSFW: self._classify("nsfw", images),
            WATERMARK: self._classify("watermark", images),
            AESTHETICS: self._aesthetics(images),
        }


def _batches(items: list, size: int) -> Iterator[list]:
    """Consecutive slices of `items` of at most `size`."""
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def score_paths(
    scorer: ImageScorer,
    paths: list[str],
    *,
    decode_mode: str = "draft",
    batch_size: int = 32,
    threads: int = 1,
) -> list[dict]:
    """Per path: its five stats (sizes and three scores), or `{SCORE_ERRORS: reason}` alone.

    Images are decoded by `threads` threads one batch ahead of the models.
    """
    results: list[dict] = []
    batches = list(_batches(paths, batch_size))
    with cf.ThreadPoolExecutor(max(1, threads)) as pool:

        def submit(batch: list[str]):
            return [pool.submit(decode, p, decode_mode, scorer.min_side) for p in batch]

        pending = submit(batches[0]) if batches else []
        for index in range(len(batches)):
            decoded = [future.result() for future in pending]
            pending = submit(batches[index + 1]) if index + 1 < len(batches) else []
            good = [d for d in decoded if d.error is None]
            scores = scorer.score([d.image for d in good])
            position = 0
            for item in decoded:
                if item.error is not None:
                    results.append({SCORE_ERRORS: item.error})
                    continue
                width, height = item.size
                results.append(
                    {
                        WIDTH: width,
                        HEIGHT: height,
                        ASPECT: width / height,
                        **{key: values[position] for key, values in scores.items()},
                    }
                )
                position += 1
    return results


def set_threads(threads: int) -> None:
    """Give torch the job's cores (data-juicer's workers may have set one)."""
    import torch

    threads = max(1, int(threads or os.cpu_count() or 1))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
