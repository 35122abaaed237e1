"""Snakemake script of rule stage_counts: see groundset.tools.summary.write_stage_counts."""

from groundset.core.runlog import log_to
from groundset.tools.summary import write_stage_counts

with log_to(snakemake.log[0]):
    # the run's workdir; the exports its config asks for (files of other formats may be stale)
    write_stage_counts(".", snakemake.output.json, snakemake.output.html, snakemake.params.formats)
