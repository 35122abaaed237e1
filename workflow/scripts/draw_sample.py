"""Snakemake script of rule draw_sample: see groundset.draw.draw_sample."""

from pathlib import Path

from groundset.draw import draw_sample
from groundset.runlog import log_to

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
