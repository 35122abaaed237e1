"""groundset's data-juicer op: the five filters' stats of every record, none removed.

Loaded by data-juicer from the scoring recipe (`custom_operator_paths`), so a recipe written by
`score_shard` also runs under plain `dj-process`. `groundset_image_scores_filter` is a batched
Filter: per batch of records it fills the stats data-juicer's `image_shape_filter`,
`image_aspect_ratio_filter`, `image_nsfw_filter`, `image_watermark_filter` and
`image_aesthetics_filter` would compute (same keys, aesthetics on 0-10), with one decode per
image and batched models (groundset.stages.filter.scoring), and keeps every record: the thresholds are applied
afterwards by `groundset.stages.filter.select`. Stats a record already has (the probe's header sizes) are kept.
"""

from __future__ import annotations

from data_juicer.ops.base_op import OPERATORS, Filter
from data_juicer.utils.constant import Fields

from groundset.stages.filter import scoring

OP_NAME = "groundset_image_scores_filter"
# One scorer per process and settings: data-juicer builds the op again per run, not the models.
_SCORERS: dict[tuple, scoring.ImageScorer] = {}


def _record_stats(record: dict, mine: list[dict]) -> dict:
    """A record's stats filled from its images' scoring results (the probe's sizes kept)."""
    record = dict(record)
    for key in scoring.STATS_KEYS:
        values = [r.get(key) for r in mine if scoring.SCORE_ERRORS not in r]
        if key in scoring.SIZE_KEYS and record.get(key) is not None:
            continue  # the probe's header sizes
        record[key] = values
    record[scoring.SCORE_ERRORS] = [r.get(scoring.SCORE_ERRORS, "") for r in mine]
    return record


class ImageScoresFilter(Filter):
    """Compute (never threshold) the five image filters' stats; keep every record."""

    _batched_op = True

    def __init__(
        self,
        hf_nsfw_model: str = "Falconsai/nsfw_image_detection",
        hf_watermark_model: str = "amrul-hzz/watermark_detector",
        hf_scorer_model: str = "shunk031/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE",
        precision: str = "auto",
        decode: str = "draft",
        device: str = "auto",
        threads: int = 1,
        *args,
        **kwargs,
    ):
        """Models as data-juicer's three filters name them; how to run them (groundset.stages.filter.scoring)."""
        super().__init__(*args, **kwargs)
        if decode not in scoring.DECODES:
            raise ValueError(f"decode must be one of {scoring.DECODES}, not {decode!r}")
        self.models = {
            "nsfw": hf_nsfw_model,
            "watermark": hf_watermark_model,
            "aesthetics": hf_scorer_model,
        }
        self.precision = precision
        self.decode = decode
        self.device = device
        self.threads = threads

    def scorer(self) -> scoring.ImageScorer:
        """This process's scorer for the op's models and settings (loaded on first use)."""
        key = (tuple(sorted(self.models.items())), self.precision, self.device)
        if key not in _SCORERS:
            _SCORERS[key] = scoring.ImageScorer(
                self.models, precision=self.precision, device=self.device
            )
        return _SCORERS[key]

    def _score(self, paths: list[str]) -> list[dict]:
        """The scoring results of each image path, in order (no model loaded for none)."""
        scorer = self.scorer() if paths else None
        # data-juicer sets torch to one thread (on imports and model loads): the job's cores back
        scoring.set_threads(self.threads)
        if not paths:
            return []
        return scoring.score_paths(
            scorer,
            paths,
            decode_mode=self.decode,
            batch_size=self.batch_size,
            threads=self.threads,
        )

    def compute_stats_batched(self, samples, rank=None):
        """Fill the five filters' stats of every record of the batch (one decode per image)."""
        stats = samples[Fields.stats]
        images = [list(paths or []) for paths in samples[self.image_key]]
        todo = [i for i, record in enumerate(stats) if scoring.NSFW not in (record or {})]
        results = self._score([path for i in todo for path in images[i]])
        position = 0
        for i in todo:
            mine = results[position : position + len(images[i])]
            position += len(images[i])
            stats[i] = _record_stats(stats[i] or {}, mine)
        return samples

    def runtime_np(self):
        """None: data-juicer's map runs in this process. `datasets` forks a pool for any
        num_proc >= 1, and torch's OpenMP threads (the job's cores, set above) hang in a child
        forked from a parent that already ran them; in-process, the models also load once."""
        return None

    def process_batched(self, samples):
        """Keep every record (groundset.stages.filter.select applies the thresholds)."""
        return [True] * len(samples[Fields.stats])


if OP_NAME not in OPERATORS.modules:  # loaded by path and by import: register once
    OPERATORS.register_module(OP_NAME)(ImageScoresFilter)
