"""Snakemake script of rule validate_outputs: see groundset.tools.validate.validate_outputs."""

from groundset.core.runlog import log_to
from groundset.tools.validate import validate_outputs

RECORDS = ("manifests", "merged", "deduped", "captioned", "masked")
# the rule's export inputs (those of export.formats) and check_exports' arguments
EXPORTS = {"coco": "coco", "odvg": "odvg", "wds": "wds_dir", "emu3": "emu3"}


def paths(name: str) -> list[str]:
    """The paths of a named input (none if the rule names no such input)."""
    value = getattr(snakemake.input, name, [])
    return [value] if isinstance(value, str) else [str(path) for path in value]


with log_to(snakemake.log[0]):
    # each export is checked against the masked records
    exports = {arg: paths(name)[0] for name, arg in EXPORTS.items() if paths(name)}
    if paths("masked"):
        exports["masked"] = paths("masked")[0]
    # manifests: schema and keys; the probe checked their images and counted its drops
    # every Emu3 prompt is parsed back and compared with its masked record
    emu3 = (paths("emu3")[0], snakemake.config["export"]["emu3"]) if paths("emu3") else None
    validate_outputs(
        [path for name in RECORDS for path in paths(name)],
        snakemake.output[0],
        schema_only=paths("manifests"),
        exports=exports,
        emu3=emu3,
    )
