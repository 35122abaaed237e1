"""Snakemake script of rule gather_captions: see groundset.caption.gather_chunks."""

from groundset.caption import gather_chunks
from groundset.runlog import log_to

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
