"""Snakemake script of rule filter_shard: see groundset.filter.process_shard."""

from groundset.filter import ShardFiles, process_shard, resolve_models, with_tuning
from groundset.io import read_json
from groundset.runlog import job_files, log_to
from groundset.split import read_index

with log_to(snakemake.log[0]):
    source, shard = snakemake.wildcards.source, snakemake.wildcards.shard
    # params: what the outputs depend on; the tuning knobs (np: the job's threads) from the config
    filter_cfg = with_tuning(snakemake.params.filter, snakemake.config["filter"])
    stand_in = read_json(snakemake.input.models[0]) if snakemake.input.models else None
    process_shard(
        read_index(snakemake.input.index),
        int(shard),
        job_files(ShardFiles, snakemake),
        template=snakemake.input.template,
        name=f"{source}_shard_{shard}",  # data-juicer's project name, not a path
        filter_cfg=filter_cfg,
        models=resolve_models(filter_cfg, stand_in),
        threads=snakemake.threads,
        header_sizes=filter_cfg["header_sizes"],
        models_home=filter_cfg["models_home"],
    )
