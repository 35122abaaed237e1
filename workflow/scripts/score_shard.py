"""Snakemake script of rule score_shard: see groundset.stages.filter.score.score_shard."""

from groundset.core.io import read_json
from groundset.core.runlog import job_files, log_to
from groundset.stages.filter.score import ScoreFiles, score_shard, with_tuning
from groundset.stages.filter.shard import resolve_models
from groundset.stages.split import read_index

with log_to(snakemake.log[0]):
    source, shard = snakemake.wildcards.source, snakemake.wildcards.shard
    # params: what the scores depend on; the tuning knobs (threads, batch, device) from the config
    settings = with_tuning(snakemake.params.settings, snakemake.config["filter"])
    stand_in = read_json(snakemake.input.models[0]) if snakemake.input.models else None
    score_shard(
        read_index(snakemake.input.index),
        int(shard),
        job_files(ScoreFiles, snakemake),
        template=snakemake.input.template,
        name=f"{source}_{snakemake.wildcards.download_part}_shard_{shard}",  # a project name
        settings=settings,
        models=resolve_models({**snakemake.config["filter"], **settings}, stand_in),
        threads=snakemake.threads,
        stand_in=stand_in is not None,
    )
