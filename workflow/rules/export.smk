# Export and inspection. For now: the validator over every stage's output, last in the DAG.


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
