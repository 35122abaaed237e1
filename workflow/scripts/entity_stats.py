"""Snakemake script of rule entity_stats: see groundset.tools.stats.write_stats."""

from groundset.core.runlog import log_to
from groundset.tools.stats import write_stats

with log_to(snakemake.log[0]):
    write_stats(snakemake.input[0], snakemake.output.stats, snakemake.output.plots)
