# Export and inspection: Emu3, COCO, ODVG and WebDataset training data (export.formats),
# statistics, drawings, the validator over every stage's output and export, and the counts per
# stage for the report.
#
# A part's features are a declared output folder (export/emu3/feature/part_{k}/<source>/
# <image_id>.pth, listed in train.json relative to export/emu3/feature), which Snakemake empties
# before it reruns the job. So the job saves them into its store beside its journal (resume
# state, deliberately no output) and hard-links them into the folder: a rerun tokenizes only
# what the journal lacks (groundset.exports.emu3.Emu3PartFiles).


rule emu3_part:
    input:
        masked=layout.MASK.records,
    output:
        records=layout.EMU3_PART.records,
        errors=layout.EMU3_PART.dropped,
        stats=layout.EMU3_PART.stats,
        features=directory(layout.EMU3_PART_FEATURES),
    log:
        "logs/emu3_part/{part}.log",
    benchmark:
        "benchmarks/emu3_part/{part}.tsv"
    conda:
        "../envs/mask.yaml"
    threads: config["export"]["emu3"]["decode_workers"]
    resources:
        gpu=EMU3_GPUS,
    params:
        settings=EMU3_SETTINGS,
        journal=layout.EMU3_JOURNAL,
        store=layout.EMU3_STORE,
    script:
        "../scripts/emu3_part.py"


rule gather_emu3:
    input:
        records=expand(layout.EMU3_PART.records, part=range(EMU3_PARTS)),
        errors=expand(layout.EMU3_PART.dropped, part=range(EMU3_PARTS)),
        stats=expand(layout.EMU3_PART.stats, part=range(EMU3_PARTS)),
        features=expand(layout.EMU3_PART_FEATURES, part=range(EMU3_PARTS)),
    output:
        datalist=layout.EMU3.records,
        train=layout.EMU3_TRAIN,
        errors=layout.EMU3.dropped,
        prompts=layout.EMU3_PROMPTS,
        stats=layout.EMU3.stats,
    log:
        "logs/gather_emu3.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=60,
    params:
        settings=EMU3_SETTINGS,
        # train.json's prefix, which path_list is relative to: absolute, as train.json holds it
        # (a moved workdir rewrites the lists)
        prefix=os.path.abspath(layout.EMU3_FEATURES),
    script:
        "../scripts/gather_emu3.py"


# Other trainers' formats, each streamed from masked/masked.jsonl with its counts and the
# records it could not take (with drop_reason) beside.
rule export_coco:
    input:
        masked=layout.MASK.records,
    output:
        coco=layout.COCO.records,
        categories=layout.COCO_CATEGORIES,
        skipped=layout.COCO.dropped,
        stats=layout.COCO.stats,
    log:
        "logs/export_coco.log",
    benchmark:
        "benchmarks/export_coco.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=240,
    script:
        "../scripts/export_coco.py"


rule export_odvg:
    input:
        masked=layout.MASK.records,
    output:
        odvg=layout.ODVG.records,
        skipped=layout.ODVG.dropped,
        stats=layout.ODVG.stats,
    log:
        "logs/export_odvg.log",
    benchmark:
        "benchmarks/export_odvg.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=240,
    script:
        "../scripts/export_odvg.py"


rule export_wds:
    input:
        masked=layout.MASK.records,
    output:
        shards=directory(layout.WEBDATASET.records),
        skipped=layout.WEBDATASET.dropped,
        stats=layout.WEBDATASET.stats,
    log:
        "logs/export_wds.log",
    benchmark:
        "benchmarks/export_wds.tsv"
    conda:
        "../envs/groundset.yaml"
    threads: 2
    resources:
        mem_mb=2000,
        runtime=12 * 60,
    params:
        shard_size=config["export"]["webdataset"]["shard_size"],
    script:
        "../scripts/export_wds.py"


rule entity_stats:
    input:
        layout.MASK.records,
    output:
        stats=layout.ENTITY_STATS,
        plots=report(
            directory(layout.ENTITY_PLOTS),
            patterns=["{name}.png"],
            caption="../report/stats.rst",
            category="2. Statistics",
        ),
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
        layout.MASK.records,
    output:
        boxes=report(
            directory(layout.DRAWINGS),
            patterns=["{source}/{image_id}.jpg"],
            caption="../report/draw_boxes.rst",
            category="3. Drawings",
            subcategory="boxes",
        ),
        masks=report(
            directory(layout.MASK_DRAWINGS),
            patterns=["{source}/{image_id}.png"],
            caption="../report/draw_masks.rst",
            category="3. Drawings",
            subcategory="masks",
        ),
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


# The stats envelope and side file of drops of each export in export.formats (which the export
# check compares with the export itself).
EXPORT_ACCOUNTS = {
    f"{fmt}_{what}": getattr(layout.EXPORTS[fmt], what)
    for fmt in FORMATS
    if fmt in layout.EXPORTS
    for what in ("dropped", "stats")
}


# Every stage's records against their schemas and files; each export (COCO, ODVG, WebDataset,
# Emu3 lists) against its stats envelope, its drops and masked/masked.jsonl's record count.
rule validate_outputs:
    input:
        **EXPORT_ACCOUNTS,
        **EMU3_DATALIST,
        **COCO,
        **ODVG,
        **WDS,
        manifests=[path for source in SOURCES for path in source_manifests(source)],
        merged=MERGED,
        deduped=DEDUPED,
        captioned=CAPTIONED,
        masked=MASKED,
    output:
        layout.VALIDATED,
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


rule stage_counts:
    input:
        VALIDATED,
        EMU3,
        layout.ENTITY_STATS,
    output:
        json=layout.STAGE_COUNTS,
        html=report(
            layout.STAGE_COUNTS_HTML,
            caption="../report/stage_counts.rst",
            category="1. Records per stage",
        ),
    log:
        "logs/stage_counts.log",
    conda:
        "../envs/groundset.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=10,
    params:
        formats=FORMATS,
    script:
        "../scripts/stage_counts.py"
