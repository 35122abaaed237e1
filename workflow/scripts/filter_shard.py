"""Snakemake script of rule filter_shard: see groundset.filter.process_shard."""

import dataclasses

from groundset.filter import ShardFiles, process_shard, resolve_models
from groundset.io import read_json
from groundset.runlog import log_to
from groundset.split import read_index

with log_to(snakemake.log[0]):
    source, shard = snakemake.wildcards.source, snakemake.wildcards.shard
    filter_cfg = snakemake.params.filter
    stand_in = read_json(snakemake.input.models[0]) if snakemake.input.models else None
    process_shard(
        read_index(snakemake.input.index),
        int(shard),
        ShardFiles(**{f.name: snakemake.output[f.name] for f in dataclasses.fields(ShardFiles)}),
        template=snakemake.input.template,
        work_dir=f"dj_work/{source}/shard_{shard}",
        name=f"{source}_shard_{shard}",
        filter_cfg=filter_cfg,
        models=resolve_models(filter_cfg, stand_in),
        threads=snakemake.threads,
        header_sizes=filter_cfg["header_sizes"],
        models_home=filter_cfg["models_home"],
    )
