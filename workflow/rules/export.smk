# Export and inspection: statistics, drawings, and the validator over every stage's output.


rule entity_stats:
    input:
        "masked/masked.jsonl",
    output:
        stats="export/stats/stats.json",
    log:
        "logs/entity_stats.log",
    benchmark:
        "benchmarks/entity_stats.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=120,
    script:
        "../scripts/entity_stats.py"


rule draw_sample:
    input:
        "masked/masked.jsonl",
    output:
        directory("export/draw"),
        directory("export/draw_sam2_mask"),
    log:
        "logs/draw_sample.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    params:
        n=config["export"]["draw_n"],
        seed=config["export"]["draw_seed"],
    script:
        "../scripts/draw_sample.py"


rule validate_outputs:
    input:
        manifests=expand("manifest/{source}.jsonl", source=SOURCES),
        merged=MERGED,
        captioned=CAPTIONED,
        masked=MASKED,
    output:
        "validated/report.txt",
    log:
        "logs/validate_outputs.log",
    benchmark:
        "benchmarks/validate_outputs.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=240,
    script:
        "../scripts/validate_outputs.py"
