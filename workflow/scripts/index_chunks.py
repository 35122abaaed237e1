"""Snakemake script of checkpoint index_chunks: see groundset.stages.caption.index_chunks."""

from groundset.core.runlog import log_to
from groundset.stages.caption import index_chunks

with log_to(snakemake.log[0]):
    index_chunks(
        snakemake.input.records,
        snakemake.output.index,
        snakemake.params.chunk_size,
        snakemake.params.journal_dir,
        snakemake.params.mask_journal_dir,
    )
