"""Snakemake script of rule gather_masks: see groundset.stages.mask.gather_masks."""

from groundset.core.runlog import job_files, log_to
from groundset.stages.mask import MaskGatherFiles, MaskSettings, gather_masks

with log_to(snakemake.log[0]):
    # params: the quality floors; the rest of the mask section does not change what it writes
    settings = MaskSettings.from_config({**snakemake.config["mask"], **snakemake.params.floors})
    gather_masks(
        list(snakemake.input.chunks),
        list(snakemake.input.dropped),
        list(snakemake.input.stats),
        job_files(MaskGatherFiles, snakemake),
        settings,
        index=snakemake.input.index,
    )
