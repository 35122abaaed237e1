"""Snakemake script of rule gather_captions: see groundset.stages.caption.gather_chunks."""

from groundset.core.runlog import log_to
from groundset.stages.caption import gather_chunks

with log_to(snakemake.log[0]):
    gather_chunks(
        list(snakemake.input.chunks),
        list(snakemake.input.errors),
        list(snakemake.input.stats),
        snakemake.output.records,
        snakemake.output.errors,
        snakemake.output.stats,
        index=snakemake.input.index,
    )
