"""Snakemake script of rule download_images: see groundset.download."""

from groundset.download import download_source
from groundset.runlog import log_to

with log_to(snakemake.log[0]) as log:
    download_source(
        snakemake.input.urls,
        snakemake.params.folder,
        snakemake.output.stats,
        {**snakemake.params.download, "processes_count": snakemake.threads},
        snakemake.params.columns,
        serve_dir=snakemake.params.serve_dir,
        stdout=log,
    )
