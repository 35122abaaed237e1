# A source's URL list is cut into download parts (groundset.stages.parts): `download.part_rows`
# rows of one file each, named by the file and the row range. Each part is one prefilter_urls
# and one download_part job, so parts spread over the cluster's nodes; a file added to a source
# adds parts and leaves the others' files as they are.


rule plan_parts:
    output:
        layout.PARTS,
    log:
        "logs/plan_parts/{source}.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    params:
        # the plan itself: a file added, removed or cut otherwise rewrites it (and the manifest)
        parts=lambda wildcards: [vars(part) for part in source_parts(wildcards.source)],
    script:
        "../scripts/plan_parts.py"


rule prefilter_urls:
    input:
        part_file,
    output:
        urls=layout.PREFILTER.records,
        stats=layout.PREFILTER.stats,
        dropped=layout.PREFILTER.dropped,
    log:
        "logs/prefilter_urls/{source}/{download_part}.log",
    benchmark:
        "benchmarks/prefilter_urls/{source}/{download_part}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        part=lambda wildcards: vars(download_part(wildcards)),
        rules=prefilter_rules,
        # the columns it adds: a change reruns it (and the downloads that save them)
        provenance=list(PROVENANCE),
        columns=lambda wildcards: source_config(wildcards)["save_additional_columns"],
    script:
        "../scripts/prefilter_urls.py"


rule download_part:
    input:
        urls=layout.PREFILTER.records,
    output:
        stats=layout.DOWNLOAD.stats,
        dropped=layout.DOWNLOAD.dropped,
    log:
        "logs/download_part/{source}/{download_part}.log",
    benchmark:
        "benchmarks/download_part/{source}/{download_part}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: download_threads
    resources:
        mem_mb=8000,
        # at most download.max_parallel parts at once over the run (the global resource)
        download_parts=1,
    params:
        folder=lambda wildcards, output: output.stats.removesuffix("_stats.json"),
        download=img2dataset_options,
        part=lambda wildcards: vars(download_part(wildcards)),
        columns=lambda wildcards: source_config(wildcards)["save_additional_columns"],
        serve_dir=lambda wildcards: source_config(wildcards)["serve_dir"],
    script:
        "../scripts/download_part.py"
