"""Snakemake script of rule export_odvg: see groundset.exports.export_odvg."""

from groundset.exports import export_odvg
from groundset.io import write_json
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    stats = export_odvg(
        snakemake.input.masked, snakemake.output.odvg, skipped=snakemake.output.skipped
    )
    write_json(snakemake.output.stats, stats)
