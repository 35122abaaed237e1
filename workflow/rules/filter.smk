rule build_manifest:
    input:
        stats=layout.DOWNLOAD.stats,
    output:
        manifest=layout.MANIFEST.records,
        stats=layout.MANIFEST.stats,
        dropped=layout.MANIFEST.dropped,
    log:
        "logs/build_manifest/{source}/{download_part}.log",
    benchmark:
        "benchmarks/build_manifest/{source}/{download_part}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        folder=lambda wildcards, input: input.stats.removesuffix("_stats.json"),
        columns=lambda wildcards: source_config(wildcards)["save_additional_columns"],
    script:
        "../scripts/build_manifest.py"


# One checkpoint per download part: a part's shards are planned, and scored, as soon as its own
# manifest is there, while later parts still download.
checkpoint index_shards:
    input:
        layout.MANIFEST.records,
    output:
        index=layout.SHARD_INDEX,
    log:
        "logs/index_shards/{source}/{download_part}.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    params:
        shard_size=config["shard_size"],
    script:
        "../scripts/index_shards.py"


rule build_stand_in_models:
    output:
        layout.STAND_IN_MODELS,
    log:
        "logs/build_stand_in_models.log",
    conda:
        "../envs/filter.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    script:
        "../scripts/build_stand_in_models.py"


# The filter stage is two rules per shard. score_shard (heavy: CPU threads or a GPU) slices the
# shard from the manifest, probes its images and has data-juicer compute all five filters' stats
# of every decodable record (groundset.stages.filter.score); its params are what changes scores, never a
# threshold. select_shard (cheap, local) applies the thresholds (groundset.stages.filter.select): changing one
# reruns select, the merge and what follows, and no score job.
rule score_shard:
    input:
        manifest=layout.MANIFEST.records,
        index=layout.SHARD_INDEX,
        template=config["filter"]["template"],
        models=STAND_IN_MODELS,
    output:
        shard=layout.SHARD,
        probed=layout.PROBED,
        dropped=layout.SCORE.dropped,
        recipe=layout.DJ_CONFIG,
        scored=layout.SCORE.records,
        stats=layout.SCORE.stats,
    log:
        "logs/score_shard/{source}/{download_part}/{shard}.log",
    benchmark:
        "benchmarks/score_shard/{source}/{download_part}/{shard}.tsv"
    conda:
        "../envs/filter.yaml"
    threads: config["filter"]["np"]
    resources:
        gpu=config["filter"]["gpus"],
        # declared, not the profile's default (an expression evaluated per job while planning)
        disk_mb=1000,
    params:
        settings=SCORE_SETTINGS,
    script:
        "../scripts/score_shard.py"


# Planned once per shard, so as light as a rule gets (bench/bench_dryrun.py: 10,000 shards plan
# 20,000 filter jobs): one input, no input function, `run:` (a `script:` is looked up in
# Snakemake's source cache per job). A local rule: it runs in the Snakemake process, in
# seconds per shard. The score job depends on the template itself: a new template rescores,
# and the new scores rerun select.
rule select_shard:
    input:
        layout.SCORE.records,
    output:
        kept=layout.SELECT.records,
        rejected=layout.SELECT.dropped,
        stats=layout.SELECT.stats,
    log:
        "logs/select_shard/{source}/{download_part}/{shard}.log",
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
        disk_mb=100,
    params:
        thresholds=SELECT_SETTINGS,
        template=config["filter"]["template"],
    run:
        groundset.stages.filter.select.select_job(
            input[0], output, log[0], params.template, params.thresholds
        )


rule merge_tiers:
    input:
        shards=filtered_shards,
        plans=PLANS,
    output:
        low=layout.MERGED,
        high=layout.AES_6,
        stats=layout.MERGE.stats,
    log:
        "logs/merge_tiers.log",
    benchmark:
        "benchmarks/merge_tiers.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=240,
    params:
        tiers=config["filter"]["aesthetics_tiers"],
    script:
        "../scripts/merge_tiers.py"
