"""Snakemake script of rule dedup_records: see groundset.stages.dedup.dedup_records."""

from groundset.core.runlog import log_to
from groundset.stages.dedup import dedup_records

with log_to(snakemake.log[0]):
    dedup_records(
        snakemake.input.records,
        snakemake.output.records,
        snakemake.output.dropped,
        snakemake.output.stats,
        max_distance=snakemake.params.max_distance,
        enabled=snakemake.params.enabled,
        threads=snakemake.threads,
        cache=snakemake.params.cache,
    )
