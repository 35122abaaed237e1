"""Snakemake script of rule select_shard: see groundset.select.select_shard."""

from groundset.runlog import log_to
from groundset.select import SelectFiles, select_shard, selection_rules

with log_to(snakemake.log[0]):
    scored = snakemake.input[0]
    files = SelectFiles(
        scored=scored,
        score_stats=scored.removesuffix(".jsonl") + "_stats.json",  # written with the scores
        kept=snakemake.output.kept,
        rejected=snakemake.output.rejected,
        stats=snakemake.output.stats,
    )
    select_shard(files, selection_rules(snakemake.params.template, snakemake.params.thresholds))
