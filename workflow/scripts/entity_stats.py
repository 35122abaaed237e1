"""Snakemake script of rule entity_stats: see groundset.stats.write_stats."""

from pathlib import Path

from groundset.runlog import log_to
from groundset.stats import write_stats

with log_to(snakemake.log[0]):
    write_stats(snakemake.input[0], Path(snakemake.output.stats).parent)
