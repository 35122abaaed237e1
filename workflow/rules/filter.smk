rule build_manifest:
    input:
        "downloads/{source}_stats.json",
    output:
        manifest="manifest/{source}.jsonl",
        stats="manifest/{source}_stats.json",
        dropped="manifest/{source}_dropped.jsonl",
    log:
        "logs/build_manifest/{source}.log",
    benchmark:
        "benchmarks/build_manifest/{source}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    params:
        folder=lambda wildcards, input: input[0].removesuffix("_stats.json"),
        columns=lambda wildcards: source_config(wildcards)["save_additional_columns"],
    script:
        "../scripts/build_manifest.py"


checkpoint index_shards:
    input:
        "manifest/{source}.jsonl",
    output:
        index="shards/{source}/index.json",
    log:
        "logs/index_shards/{source}.log",
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
        "models/stand_in/models.json",
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
        manifest="manifest/{source}.jsonl",
        index="shards/{source}/index.json",
        template=config["filter"]["template"],
        models=STAND_IN_MODELS,
    output:
        shard="shards/{source}/shard_{shard}.jsonl",
        probed="probed/{source}/shard_{shard}.jsonl",
        dropped="probed/{source}/shard_{shard}_dropped.jsonl",
        recipe="dj_configs/{source}/shard_{shard}.yaml",
        scored="scored/{source}/shard_{shard}.jsonl",
        stats="scored/{source}/shard_{shard}_stats.json",
    log:
        "logs/score_shard/{source}/{shard}.log",
    benchmark:
        "benchmarks/score_shard/{source}/{shard}.tsv"
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
        "scored/{source}/shard_{shard}.jsonl",
    output:
        kept="filtered/{source}/shard_{shard}.jsonl",
        rejected="rejected/{source}/shard_{shard}.jsonl",
        stats="filtered/{source}/shard_{shard}_stats.json",
    log:
        "logs/select_shard/{source}/{shard}.log",
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
        filtered_shards,
    output:
        low="merged/merged_output.jsonl",
        high="merged/aes_6.jsonl",
        stats="merged/merge_stats.json",
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
