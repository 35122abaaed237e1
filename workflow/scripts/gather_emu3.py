"""Snakemake script of rule gather_emu3: see groundset.emu3.gather_emu3."""

from pathlib import Path

from groundset.emu3 import Emu3Settings, gather_emu3
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    gather_emu3(
        Path(snakemake.output.stats).parent,  # export/emu3
        Emu3Settings.from_config(snakemake.params.settings),
    )
