"""Snakemake script of rule probe_shard: see groundset.filter.probe_shard."""

from groundset.filter import probe_shard
from groundset.io import write_json
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    stats = probe_shard(
        snakemake.input[0],
        snakemake.output.kept,
        snakemake.output.dropped,
        snakemake.threads,
        header_sizes=snakemake.params.header_sizes,
    )
    write_json(snakemake.output.stats, stats)
