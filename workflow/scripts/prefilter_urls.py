"""Snakemake script of rule prefilter_urls: see groundset.stages.prefilter."""

from groundset.core.config import download_options, find_source
from groundset.core.runlog import log_to
from groundset.stages.prefilter import PrefilterRules, run_prefilter

with log_to(snakemake.log[0]):
    # params: the thresholds; batch_rows (a memory bound, a tuning knob) from the config
    source = find_source(snakemake.config, snakemake.wildcards.source)
    batch_rows = download_options(snakemake.config, source)["prefilter"]["batch_rows"]
    run_prefilter(
        snakemake.input[0],
        snakemake.output.urls,
        snakemake.output.stats,
        PrefilterRules(**snakemake.params.rules),
        snakemake.params.columns,
        batch_rows,
        snakemake.output.dropped,
    )
