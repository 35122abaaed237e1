"""Snakemake script of rule gather_masks: see groundset.mask.gather_masks."""

from groundset.mask import MaskGatherFiles, gather_masks
from groundset.runlog import job_files, log_to

with log_to(snakemake.log[0]):
    gather_masks(
        list(snakemake.input.chunks),
        list(snakemake.input.dropped),
        list(snakemake.input.stats),
        job_files(MaskGatherFiles, snakemake),
        index=snakemake.input.index,
    )
