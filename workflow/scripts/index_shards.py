"""Snakemake script of checkpoint index_shards: see groundset.split."""

from groundset.runlog import log_to
from groundset.split import index_manifest, write_index

with log_to(snakemake.log[0]):
    write_index(
        index_manifest(snakemake.input[0], snakemake.params.shard_size), snakemake.output.index
    )
