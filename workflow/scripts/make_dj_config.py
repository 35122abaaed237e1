"""Snakemake script of rule make_dj_config: see groundset.filter.make_dj_config."""

import os

from groundset.filter import make_dj_config, resolve_models
from groundset.io import read_json
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    work_dir = snakemake.params.work_dir
    name = f"{snakemake.wildcards.source}_shard_{snakemake.wildcards.shard}"
    make_dj_config(
        snakemake.input.template,
        snakemake.output[0],
        dataset_path=snakemake.input.shard,
        export_path=os.path.join(work_dir, "export", f"{name}.jsonl"),
        project_name=f"groundset_filter_{name}",
        work_dir=work_dir,
        filter_cfg=snakemake.params.filter,
        models=resolve_models(
            snakemake.params.filter,
            read_json(snakemake.input.models[0]) if snakemake.input.models else None,
        ),
    )
