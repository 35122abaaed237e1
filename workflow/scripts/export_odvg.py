"""Snakemake script of rule export_odvg: see groundset.exports.odvg.export_odvg."""

from groundset.core.runlog import log_to
from groundset.exports.odvg import export_odvg

with log_to(snakemake.log[0]):
    export_odvg(
        snakemake.input.masked,
        snakemake.output.odvg,
        skipped=snakemake.output.skipped,
        stats=snakemake.output.stats,
    )
