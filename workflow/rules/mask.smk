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
        captioned=layout.CAPTION_CHUNK.records,
    output:
        records=layout.MASK_CHUNK.records,
        dropped=layout.MASK_CHUNK.dropped,
        stats=layout.MASK_CHUNK.stats,
        masks=directory(layout.CHUNK_MASKS),
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
        journal=layout.MASK_JOURNAL,
        store=layout.MASK_STORE,
    script:
        "../scripts/mask_chunk.py"


rule gather_masks:
    input:
        unpack(mask_chunks),
        index=CHUNK_INDEX,
    output:
        records=layout.MASK.records,
        dropped=layout.MASK.dropped,
        stats=layout.MASK.stats,
        floored=directory(layout.FLOORED_MASKS),
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
