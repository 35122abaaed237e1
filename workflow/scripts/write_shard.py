"""Snakemake script of rule write_shard: see groundset.split."""

from groundset.runlog import log_to
from groundset.split import read_index, write_shard

with log_to(snakemake.log[0]):
    write_shard(
        read_index(snakemake.input.index), int(snakemake.wildcards.shard), snakemake.output[0]
    )
