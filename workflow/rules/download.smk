rule prefilter_urls:
    input:
        url_list,
    output:
        urls=directory(layout.URL_LISTS),
        stats=layout.PREFILTER.stats,
        dropped=layout.PREFILTER.dropped,
    log:
        "logs/prefilter_urls/{source}.log",
    benchmark:
        "benchmarks/prefilter_urls/{source}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        rules=prefilter_rules,
        # the columns it adds: a change reruns it (and the downloads that save them)
        provenance=list(PROVENANCE),
        columns=lambda wildcards: source_config(wildcards)["save_additional_columns"],
    script:
        "../scripts/prefilter_urls.py"


rule download_images:
    input:
        urls=layout.URL_LISTS,
    output:
        stats=layout.DOWNLOAD.stats,
        dropped=layout.DOWNLOAD.dropped,
    log:
        "logs/download_images/{source}.log",
    benchmark:
        "benchmarks/download_images/{source}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: download_threads
    resources:
        mem_mb=8000,
    params:
        folder=lambda wildcards, output: output.stats.removesuffix("_stats.json"),
        download=img2dataset_options,
        columns=lambda wildcards: source_config(wildcards)["save_additional_columns"],
        serve_dir=lambda wildcards: source_config(wildcards)["serve_dir"],
    script:
        "../scripts/download_images.py"
