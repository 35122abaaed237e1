"""Snakemake script of rule export_odvg: see groundset.exports.odvg.export_odvg."""

from groundset.core.io import write_json
from groundset.core.runlog import log_to
from groundset.exports.odvg import export_odvg

with log_to(snakemake.log[0]):
    stats = export_odvg(
        snakemake.input.masked, snakemake.output.odvg, skipped=snakemake.output.skipped
    )
    write_json(snakemake.output.stats, stats)
