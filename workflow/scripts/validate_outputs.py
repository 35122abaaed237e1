"""Snakemake script of rule validate_outputs: see groundset.validate.validate_outputs."""

from groundset.runlog import log_to
from groundset.validate import validate_outputs

RECORDS = ("manifests", "merged", "deduped", "captioned", "masked")
# the rule's export inputs (those of export.formats) and check_exports' arguments
EXPORTS = {"coco": "coco", "odvg": "odvg", "wds": "wds_dir"}


def paths(value) -> list[str]:
    """A named input's paths (a single path is a str)."""
    return [value] if isinstance(value, str) else [str(path) for path in value]


with log_to(snakemake.log[0]):
    inputs = snakemake.input
    exports = {arg: paths(getattr(inputs, name))[0] for name, arg in EXPORTS.items()
               if hasattr(inputs, name)}  # fmt: skip
    # manifests: schema and keys; the probe checked their images and counted its drops
    validate_outputs(
        [path for name in RECORDS for path in paths(getattr(inputs, name))],
        snakemake.output[0],
        schema_only=inputs.manifests,
        exports={"masked": paths(inputs.masked)[0], **exports},
    )
