"""Snakemake script of rule prefilter_urls: see groundset.stages.prefilter."""

from groundset.core.config import download_options, find_source
from groundset.core.runlog import log_to
from groundset.stages.prefilter import PrefilterRules, prefilter_part

with log_to(snakemake.log[0]):
    # params: the part and the thresholds; batch_rows (a memory bound, a tuning knob) from the
    # config
    source = find_source(snakemake.config, snakemake.wildcards.source)
    batch_rows = download_options(snakemake.config, source)["prefilter"]["batch_rows"]
    prefilter_part(
        snakemake.input[0],
        snakemake.params.part,
        snakemake.output.urls,
        snakemake.output.stats,
        snakemake.output.dropped,
        PrefilterRules(**snakemake.params.rules),
        snakemake.params.columns,
        batch_rows,
    )
