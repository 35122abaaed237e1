"""Snakemake script of rule mask_chunk: see groundset.mask.mask_chunk."""

from groundset.mask import Masker, MaskSettings, load_model, mask_chunk
from groundset.runlog import log_to

with log_to(snakemake.log[0]):
    # the job's threads (the profile may set them) decode images ahead of the model
    settings = MaskSettings.from_config(
        {**snakemake.params.settings, "decode_workers": snakemake.threads}
    )
    mask_chunk(
        snakemake.input[0],
        snakemake.output.records,
        snakemake.output.dropped,
        snakemake.output.stats,
        snakemake.params.journal,
        snakemake.params.mask_dir,
        settings,
        lambda: Masker(*load_model(settings)),  # built only if an image needs it
    )
