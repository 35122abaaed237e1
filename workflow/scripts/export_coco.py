"""Snakemake script of rule export_coco: see groundset.exports.export_coco."""

from groundset.exports import export_coco
from groundset.io import write_json
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    stats = export_coco(
        snakemake.input.masked,
        snakemake.output.coco,
        snakemake.output.categories,
        workers=snakemake.threads,  # processes reading .npy masks into RLE
        skipped=snakemake.output.skipped,
    )
    write_json(snakemake.output.stats, stats)
