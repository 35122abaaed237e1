"""Snakemake script of rule filter_shard: see groundset.filter.filter_shard."""

from groundset.filter import filter_shard
from groundset.io import read_json
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    filter_shard(
        snakemake.input.recipe,
        snakemake.output.kept,
        snakemake.output.stats,
        np_override=snakemake.threads,
        models_home=snakemake.params.models_home,
        probe_stats=read_json(snakemake.input.probe),
    )
