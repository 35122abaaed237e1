"""Snakemake script of rule plan_parts: see groundset.stages.parts."""

from groundset.core.runlog import log_to
from groundset.stages.parts import Part, write_plan

with log_to(snakemake.log[0]):
    parts = [Part(**part) for part in snakemake.params.parts]
    write_plan(snakemake.output[0], snakemake.wildcards.source, parts)
