# SAM2 masks: one job per caption chunk, then one file.


rule mask_chunk:
    input:
        "captioned/chunk_{chunk}.jsonl",
    output:
        records="masked/chunk_{chunk}.jsonl",
        dropped="masked/chunk_{chunk}_dropped.jsonl",
        stats="masked/chunk_{chunk}_stats.json",
    log:
        "logs/mask_chunk/{chunk}.log",
    benchmark:
        "benchmarks/mask_chunk/{chunk}.tsv"
    conda:
        "../envs/mask.yaml"
    threads: config["mask"]["decode_workers"]
    resources:
        mem_mb=16000,
        runtime=12 * 60,
        gpu=config["mask"]["gpus"],
    params:
        settings={k: v for k, v in config["mask"].items() if k != "gpus"},
        journal=lambda wildcards: f"masked/journal/chunk_{wildcards.chunk}.jsonl",
        mask_dir="masks",
    script:
        "../scripts/mask_chunk.py"


rule gather_masks:
    input:
        index=CHUNK_INDEX,
        chunks=mask_chunks,
    output:
        records="masked/masked.jsonl",
        dropped="masked/dropped.jsonl",
        stats="masked/mask_stats.json",
    log:
        "logs/gather_masks.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    script:
        "../scripts/gather_masks.py"
