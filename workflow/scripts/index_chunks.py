"""Snakemake script of checkpoint index_chunks: see groundset.caption.index_chunks."""

from groundset.caption import index_chunks
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    index_chunks(
        snakemake.input.records,
        snakemake.output.index,
        snakemake.params.chunk_size,
        snakemake.params.journal_dir,
        snakemake.params.mask_journal_dir,
    )
