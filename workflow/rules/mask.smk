# SAM2 masks: one job per caption chunk, then one file. A mask job keeps one mask per entity
# with its score and quality; the gather applies the quality floors (its params), so changing
# a floor reruns only the gather: records that lose entities get their kept masks in
# masks/floored/<source>/<image_id>.npy.
#
# A chunk's masks are a declared output folder (masks/chunk_{j}/<source>/<image_id>.npy), which
# Snakemake empties before it reruns the job. So the job computes them into the store
# masked/store/<source>/<image_id>.npy (resume state, deliberately no output: Snakemake never
# deletes it; one store for all chunks, so a record that moves to another chunk keeps its mask)
# and hard-links them into the folder; a rerun, killed or forced, links what the journal has
# and computes the rest (groundset.stages.mask.MaskChunkFiles). index_chunks moves journal entries with
# their records when the chunk layout changes.


rule mask_chunk:
    input:
        captioned="captioned/chunk_{chunk}.jsonl",
    output:
        records="masked/chunk_{chunk}.jsonl",
        dropped="masked/chunk_{chunk}_dropped.jsonl",
        stats="masked/chunk_{chunk}_stats.json",
        masks=directory("masks/chunk_{chunk}"),
    log:
        "logs/mask_chunk/{chunk}.log",
    benchmark:
        "benchmarks/mask_chunk/{chunk}.tsv"
    conda:
        "../envs/mask.yaml"
    threads: config["mask"]["decode_workers"]
    resources:
        gpu=config["mask"]["gpus"],
    params:
        settings=MASK_SETTINGS,
        journal="masked/journal/chunk_{chunk}.jsonl",
        store="masked/store",
    script:
        "../scripts/mask_chunk.py"


rule gather_masks:
    input:
        unpack(mask_chunks),
        index=CHUNK_INDEX,
    output:
        records="masked/masked.jsonl",
        dropped="masked/dropped.jsonl",
        stats="masked/mask_stats.json",
        floored=directory("masks/floored"),
    log:
        "logs/gather_masks.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    params:
        floors=MASK_FLOORS,
    script:
        "../scripts/gather_masks.py"
