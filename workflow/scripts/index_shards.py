"""Snakemake script of checkpoint index_shards: see groundset.stages.split."""

from groundset.core.runlog import log_to
from groundset.stages.split import index_manifest, write_index

with log_to(snakemake.log[0]):
    write_index(
        index_manifest(snakemake.input[0], snakemake.params.shard_size), snakemake.output.index
    )
