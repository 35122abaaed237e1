"""Snakemake script of rule gather_emu3: see groundset.emu3.gather_emu3."""

from groundset.emu3 import Emu3ListFiles, Emu3Settings, gather_emu3
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    gather_emu3(
        list(snakemake.input.records),
        list(snakemake.input.errors),
        list(snakemake.input.stats),
        list(snakemake.input.features),
        Emu3ListFiles(
            datalist=snakemake.output.datalist,
            train=snakemake.output.train,
            errors=snakemake.output.errors,
            prompts=snakemake.output.prompts,
            stats=snakemake.output.stats,
        ),
        snakemake.params.prefix,
        Emu3Settings.from_config(snakemake.params.settings),
    )
