# Export and inspection: Emu3 training data, statistics, drawings, the validator over every
# stage's output, and the counts per stage for the report.
#
# A part's features are a declared output folder (export/emu3/feature/part_{k}/<source>/
# <image_id>.pth, listed in train.json relative to export/emu3/feature), which Snakemake empties
# before it reruns the job. So the job saves them into its store beside its journal (resume
# state, deliberately no output) and hard-links them into the folder: a rerun tokenizes only
# what the journal lacks (groundset.emu3.Emu3PartFiles).


rule emu3_part:
    input:
        masked="masked/masked.jsonl",
    output:
        records="export/emu3/list/parts/part_{part}.jsonl",
        errors="export/emu3/list/parts/error_{part}.jsonl",
        stats="export/emu3/list/parts/stats_{part}.json",
        features=directory("export/emu3/feature/part_{part}"),
    log:
        "logs/emu3_part/{part}.log",
    benchmark:
        "benchmarks/emu3_part/{part}.tsv"
    conda:
        "../envs/mask.yaml"
    threads: config["export"]["emu3"]["decode_workers"]
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=EMU3_GPUS,
    params:
        settings=EMU3_SETTINGS,
        journal="export/emu3/journal/part_{part}.jsonl",
        store="export/emu3/journal/part_{part}",
    script:
        "../scripts/emu3_part.py"


rule gather_emu3:
    input:
        records=expand("export/emu3/list/parts/part_{part}.jsonl", part=range(EMU3_PARTS)),
        errors=expand("export/emu3/list/parts/error_{part}.jsonl", part=range(EMU3_PARTS)),
        stats=expand("export/emu3/list/parts/stats_{part}.json", part=range(EMU3_PARTS)),
        features=expand("export/emu3/feature/part_{part}", part=range(EMU3_PARTS)),
    output:
        datalist="export/emu3/list/datalist.jsonl",
        train="export/emu3/list/train.json",
        errors="export/emu3/list/error.jsonl",
        prompts="export/emu3/list/prompts.json",
        stats="export/emu3/emu3_stats.json",
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
        prefix=os.path.abspath("export/emu3/feature"),
    script:
        "../scripts/gather_emu3.py"


rule entity_stats:
    input:
        "masked/masked.jsonl",
    output:
        stats="export/stats/stats.json",
        plots=report(
            directory("export/stats/plots"),
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
        "masked/masked.jsonl",
    output:
        boxes=report(
            directory("export/draw"),
            patterns=["{source}/{image_id}.jpg"],
            caption="../report/draw_boxes.rst",
            category="3. Drawings",
            subcategory="boxes",
        ),
        masks=report(
            directory("export/draw_sam2_mask"),
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


rule stage_counts:
    input:
        VALIDATED,
        EMU3,
        "export/stats/stats.json",
    output:
        json="export/stage_counts.json",
        html=report(
            "export/stage_counts.html",
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
    script:
        "../scripts/stage_counts.py"
