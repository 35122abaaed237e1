"""Snakemake script of rule emu3_part: see groundset.emu3.export_part."""

from pathlib import Path

from groundset.emu3 import Emu3Settings, export_part
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    # the job's threads (the profile may set them) decode images ahead of the tokenizer
    settings = Emu3Settings.from_config(
        {**snakemake.params.settings, "decode_workers": snakemake.threads}
    )
    export_part(
        snakemake.input[0],
        Path(snakemake.output.records).parents[2],  # export/emu3 (list/parts/part_N.jsonl)
        settings,
        int(snakemake.wildcards.part),
    )
