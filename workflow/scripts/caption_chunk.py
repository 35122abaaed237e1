"""Snakemake script of rule caption_chunk: see groundset.stages.caption.caption_chunk."""

from groundset.core.runlog import log_to
from groundset.stages.caption import Settings, caption_chunk, chunk_range, stop_on_sigterm

# params: what changes the outputs; the tuning knobs (retry_errors among them) come from the
# config, so that changing one marks no chunk stale
section = snakemake.config["caption"]
with log_to(snakemake.log.job), stop_on_sigterm():
    path, start, end = chunk_range(
        snakemake.input.index, int(snakemake.wildcards.chunk), snakemake.input.records
    )
    caption_chunk(
        path,
        snakemake.output.records,
        snakemake.output.errors,
        snakemake.output.stats,
        snakemake.params.journal,
        Settings.for_job(snakemake.params.settings, section, rate_share=section["api_jobs"]),
        start=start,
        end=end,
        retry_errors=section["retry_errors"],
        server_log=snakemake.log.server,
    )
