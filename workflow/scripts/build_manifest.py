"""Snakemake script of rule build_manifest: see groundset.manifest."""

from groundset.manifest import build_manifest
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    build_manifest(
        snakemake.params.folder,
        snakemake.output.manifest,
        snakemake.wildcards.source,
        snakemake.params.columns,
        snakemake.output.stats,
    )
