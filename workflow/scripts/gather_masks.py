"""Snakemake script of rule gather_masks: see groundset.mask.gather_masks."""

from groundset.mask import gather_masks
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    gather_masks(
        list(snakemake.input.chunks),
        snakemake.output.records,
        snakemake.output.dropped,
        snakemake.output.stats,
        index=snakemake.input.index,
    )
