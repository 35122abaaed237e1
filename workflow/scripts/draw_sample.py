"""Snakemake script of rule draw_sample: see groundset.tools.draw.draw_sample."""

from pathlib import Path

from groundset.core.runlog import log_to
from groundset.tools.draw import draw_sample

with log_to(snakemake.log[0]):
    for folder in (snakemake.output.boxes, snakemake.output.masks):
        Path(folder).mkdir(parents=True, exist_ok=True)  # also when nothing has masks
    draw_sample(
        snakemake.input[0],
        snakemake.output.boxes,
        snakemake.output.masks,
        snakemake.params.n,
        snakemake.params.seed,
    )
