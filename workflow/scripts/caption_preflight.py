"""Snakemake script of rule caption_preflight: see groundset.stages.caption.preflight."""

from groundset.core.io import write_json
from groundset.core.runlog import log_to
from groundset.stages.caption import Settings, preflight

with log_to(snakemake.log[0]):
    settings = Settings.for_job(snakemake.params.settings, snakemake.config["caption"])
    write_json(snakemake.output[0], preflight(settings))
