"""Snakemake script of rule build_manifest: see groundset.stages.manifest."""

from groundset.core.runlog import log_to
from groundset.stages.manifest import build_manifest

with log_to(snakemake.log[0]):
    build_manifest(
        [snakemake.params.folder],
        snakemake.output.manifest,
        snakemake.wildcards.source,
        snakemake.params.columns,
        snakemake.output.stats,
        snakemake.output.dropped,
        parts=True,
    )
