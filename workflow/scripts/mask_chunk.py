"""Snakemake script of rule mask_chunk: see groundset.stages.mask.mask_chunk."""

from pathlib import Path

from groundset.core.runlog import job_files, log_to
from groundset.stages.mask import MaskChunkFiles, Masker, MaskSettings, load_model, mask_chunk

with log_to(snakemake.log[0]):
    # params: what the outputs depend on; the tuning knobs come from the config, the decode
    # threads are the job's threads (the profile may set them)
    settings = MaskSettings.from_config(
        {
            **snakemake.config["mask"],
            **snakemake.params.settings,
            "decode_workers": snakemake.threads,
        }
    )
    files = job_files(MaskChunkFiles, snakemake)
    Path(files.masks).mkdir(parents=True, exist_ok=True)  # a declared folder, also if empty
    mask_chunk(
        snakemake.input.captioned,
        files,
        settings,
        lambda: Masker(*load_model(settings)),  # built only if an image needs it
    )
