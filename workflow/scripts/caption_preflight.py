"""Snakemake script of rule caption_preflight: see groundset.caption.preflight."""

from groundset.caption import Settings, preflight
from groundset.io import write_json
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    settings = Settings.for_job(snakemake.params.settings, snakemake.config["caption"])
    write_json(snakemake.output[0], preflight(settings))
