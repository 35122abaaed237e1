# Grounded captioning (Qwen-VL): duplicates out, preflight, chunks, one paced job per chunk, gather.

# `params: settings` holds only the keys that change a chunk's outputs (caption_settings); the
# jobs read the tuning knobs (groundset.stages.caption.TUNING_KEYS: pacing, retries, timeouts,
# concurrency) from the config, so changing one marks nothing stale. Their share of the rate is
# that of the quota in force (`--resources vlm_api=N` over caption.api_jobs, see common.smk).
config["caption"]["api_jobs"] = API_JOBS


rule caption_preflight:
    output:
        layout.PREFLIGHT,
    log:
        "logs/caption_preflight.log",
    localrule: True
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        # what the check depends on (groundset.stages.caption.PREFLIGHT_KEYS): the endpoint, the stand-in
        settings=lambda wildcards: groundset.stages.caption.preflight_settings(config["caption"]),
    script:
        "../scripts/caption_preflight.py"


# One record per image before any paid request (caption.dedup): exact duplicates (same bytes or
# URL) and near ones (perceptual hashes within max_distance bits); the highest aesthetic score
# stays. Turned off, it passes every record on. The hashes are kept in a cache beside (resume
# state, deliberately no output), so a new max_distance or tier hashes only new images.
rule dedup_records:
    input:
        records=config["caption"]["input"],
    output:
        records=DEDUPED,
        dropped=layout.DEDUP.dropped,
        stats=layout.DEDUP.stats,
    log:
        "logs/dedup_records.log",
    benchmark:
        "benchmarks/dedup_records.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: config["caption"]["dedup"]["threads"]
    resources:
        mem_mb=4000,
        runtime=12 * 60,
    params:
        enabled=config["caption"]["dedup"]["enabled"],
        max_distance=config["caption"]["dedup"]["max_distance"],
        cache=layout.HASH_CACHE,
    script:
        "../scripts/dedup_records.py"


checkpoint index_chunks:
    input:
        records=DEDUPED,
        # checked first thing in a run, long before the first chunk
        preflight=layout.PREFLIGHT,
    output:
        index=CHUNK_INDEX,
    log:
        "logs/index_chunks.log",
    localrule: True
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=30,
    params:
        chunk_size=config["caption"]["chunk_size"],
        journal_dir=layout.CAPTION_JOURNALS,
        # the mask jobs' journals follow the same chunks: moved with their records
        mask_journal_dir=layout.MASK_JOURNALS,
    script:
        "../scripts/index_chunks.py"


rule caption_chunk:
    input:
        records=DEDUPED,
        index=CHUNK_INDEX,
    output:
        records=layout.CAPTION_CHUNK.records,
        errors=layout.CAPTION_CHUNK.dropped,
        stats=layout.CAPTION_CHUNK.stats,
    log:
        job="logs/caption_chunk/{chunk}.log",
        # the output of the VLM server the job starts (caption.serve.command), if any
        server="logs/caption_chunk/{chunk}.server.log",
    benchmark:
        "benchmarks/caption_chunk/{chunk}.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: SERVE["cpus"] if SERVING else 1
    resources:
        mem_mb=SERVE["mem_mb"] if SERVING else 2000,
        # a share of the API quota, or one of the servers the run may start (each on its GPUs)
        vlm_api=0 if SERVING else 1,
        vlm_server=1 if SERVING else 0,
        gpu=SERVE["gpus"] if SERVING else 0,
    params:
        settings=caption_settings,
        journal=lambda wildcards: layout.CAPTION_JOURNAL.format(chunk=wildcards.chunk),
    script:
        "../scripts/caption_chunk.py"


rule gather_captions:
    input:
        unpack(caption_chunks),
        index=CHUNK_INDEX,
    output:
        records=layout.CAPTION.records,
        errors=layout.CAPTION.dropped,
        stats=layout.CAPTION.stats,
    log:
        "logs/gather_captions.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    script:
        "../scripts/gather_captions.py"
