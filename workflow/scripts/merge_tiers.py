"""Snakemake script of rule merge_tiers: see groundset.merge."""

from groundset.merge import merge_tiers
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    merge_tiers(
        list(snakemake.input),
        (snakemake.output.low, snakemake.output.high),
        snakemake.params.tiers,
        snakemake.output.stats,
    )
