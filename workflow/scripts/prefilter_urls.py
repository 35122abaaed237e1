"""Snakemake script of rule prefilter_urls: see groundset.prefilter."""

from groundset.prefilter import PrefilterRules, run_prefilter
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    run_prefilter(
        snakemake.input[0],
        snakemake.output.urls,
        snakemake.output.stats,
        PrefilterRules(**snakemake.params.rules),
        snakemake.params.columns,
        snakemake.params.batch_rows,
    )
