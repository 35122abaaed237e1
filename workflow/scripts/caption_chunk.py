"""Snakemake script of rule caption_chunk: see groundset.caption.caption_chunk."""

from groundset.caption import Settings, caption_chunk, chunk_range, stop_on_sigterm
from groundset.runlog import log_to

with log_to(snakemake.log[0]), stop_on_sigterm():
    path, start, end = chunk_range(
        snakemake.input.index, int(snakemake.wildcards.chunk), snakemake.input.records
    )
    caption_chunk(
        path,
        snakemake.output.records,
        snakemake.output.errors,
        snakemake.output.stats,
        snakemake.params.journal,
        Settings.from_config(snakemake.params.settings, snakemake.params.rate_share),
        start=start,
        end=end,
        # read here, not a param: switching it on for one run must not mark every chunk stale
        retry_errors=snakemake.config["caption"]["retry_errors"],
    )
