"""Snakemake script of rule export_coco: see groundset.exports.coco.export_coco."""

from groundset.core.runlog import log_to
from groundset.exports.coco import export_coco

with log_to(snakemake.log[0]):
    export_coco(
        snakemake.input.masked,
        snakemake.output.coco,
        snakemake.output.categories,
        workers=snakemake.threads,  # processes reading .npy masks into RLE
        skipped=snakemake.output.skipped,
        stats=snakemake.output.stats,
    )
