"""Snakemake script of rule export_wds: see groundset.exports.wds.export_wds."""

from groundset.core.runlog import log_to
from groundset.exports.wds import export_wds

with log_to(snakemake.log[0]):
    export_wds(
        snakemake.input.masked,
        snakemake.output.shards,
        snakemake.params.shard_size,
        workers=snakemake.threads,  # processes reading .npy masks into RLE
        skipped=snakemake.output.skipped,
        stats=snakemake.output.stats,
    )
