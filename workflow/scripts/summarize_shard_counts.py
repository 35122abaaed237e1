"""Snakemake script of rule summarize_shard_counts: see groundset.split."""

from groundset.io import read_json, write_json
from groundset.runlog import log_to
from groundset.split import read_index, summarize_counts

with log_to(snakemake.log[0]):
    counts = [read_json(path) for path in snakemake.input.counts]
    write_json(snakemake.output[0], summarize_counts(read_index(snakemake.input.index), counts))
