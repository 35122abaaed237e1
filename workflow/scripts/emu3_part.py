"""Snakemake script of rule emu3_part: see groundset.exports.emu3.export_part."""

from pathlib import Path

from groundset.core.runlog import job_files, log_to
from groundset.exports.emu3 import Emu3PartFiles, Emu3Settings, export_part

with log_to(snakemake.log[0]):
    # params: what the outputs depend on; the tuning knobs come from the config, the decode
    # threads are the job's threads (the profile may set them)
    settings = Emu3Settings.from_config(
        {
            **snakemake.config["export"]["emu3"],
            **snakemake.params.settings,
            "decode_workers": snakemake.threads,
        }
    )
    files = job_files(Emu3PartFiles, snakemake)
    Path(files.features).mkdir(parents=True, exist_ok=True)  # a declared folder, also if empty
    export_part(snakemake.input.masked, files, settings, int(snakemake.wildcards.part))
