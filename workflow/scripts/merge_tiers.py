"""Snakemake script of rule merge_tiers: see groundset.stages.merge."""

from groundset.core.runlog import log_to
from groundset.stages.merge import merge_tiers

with log_to(snakemake.log[0]):
    merge_tiers(
        list(snakemake.input.shards),
        (snakemake.output.low, snakemake.output.high),
        snakemake.params.tiers,
        snakemake.output.stats,
    )
