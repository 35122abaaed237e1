"""Snakemake script of rule count_shard (placeholder shard consumer): see groundset.split."""

from groundset.io import write_json
from groundset.runlog import log_to
from groundset.split import count_records

with log_to(snakemake.log[0]):
    records = count_records(snakemake.input[0])
    write_json(snakemake.output[0], {"shard": int(snakemake.wildcards.shard), "records": records})
