"""Snakemake script of rule download_part: see groundset.stages.download."""

from groundset.core.config import download_options, find_source
from groundset.core.runlog import log_to
from groundset.stages.download import download_source, tuning_options

with log_to(snakemake.log[0]) as log:
    # params: what changes the downloads; the tuning knobs (threads, wandb) from the config, the
    # processes as many as the job's threads
    source = find_source(snakemake.config, snakemake.wildcards.source)
    knobs = tuning_options(download_options(snakemake.config, source))
    download_source(
        snakemake.input.urls,
        snakemake.params.folder,
        snakemake.output.stats,
        {**snakemake.params.download, **knobs, "processes_count": snakemake.threads},
        snakemake.params.columns,
        serve_dir=snakemake.params.serve_dir,
        stdout=log,
        dropped=snakemake.output.dropped,
        part=snakemake.params.part,
        source=snakemake.wildcards.source,
    )
