rule build_manifest:
    input:
        "downloads/{source}_stats.json",
    output:
        manifest="manifest/{source}.jsonl",
        stats="manifest/{source}_stats.json",
    log:
        "logs/build_manifest/{source}.log",
    benchmark:
        "benchmarks/build_manifest/{source}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
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


rule write_shard:
    input:
        manifest="manifest/{source}.jsonl",
        index="shards/{source}/index.json",
    output:
        "shards/{source}/shard_{shard}.jsonl",
    log:
        "logs/write_shard/{source}/{shard}.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=30,
    script:
        "../scripts/write_shard.py"


# Placeholder consumer of the shards until the data-juicer filter stage lands.
rule count_shard:
    input:
        "shards/{source}/shard_{shard}.jsonl",
    output:
        "shard_counts/{source}/shard_{shard}.json",
    log:
        "logs/count_shard/{source}/{shard}.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=30,
    script:
        "../scripts/count_shard.py"


rule summarize_shard_counts:
    input:
        index="shards/{source}/index.json",
        counts=shard_counts,
    output:
        "shard_counts/{source}.json",
    log:
        "logs/summarize_shard_counts/{source}.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    script:
        "../scripts/summarize_shard_counts.py"
