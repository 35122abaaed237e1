"""Snakemake script of rule validate_outputs: see groundset.validate.validate_outputs."""

from groundset.runlog import log_to
from groundset.validate import validate_outputs

with log_to(snakemake.log[0]):
    # manifests: schema and keys; the probe checked their images and counted its drops
    validate_outputs(
        list(snakemake.input), snakemake.output[0], schema_only=snakemake.input.manifests
    )
