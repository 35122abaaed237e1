"""Snakemake script of rule gather_emu3: see groundset.exports.emu3.gather_emu3."""

from groundset.core.runlog import job_files, log_to
from groundset.exports.emu3 import Emu3ListFiles, Emu3Settings, gather_emu3

with log_to(snakemake.log[0]):
    gather_emu3(
        list(snakemake.input.records),
        list(snakemake.input.errors),
        list(snakemake.input.stats),
        list(snakemake.input.features),
        job_files(Emu3ListFiles, snakemake),
        snakemake.params.prefix,
        Emu3Settings.from_config(snakemake.params.settings),
    )
