# groundset: LAION URL lists -> filtered, grounded text-to-image data. See README.md.
import os

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# `--report` reads the config files again after `workdir:`; keep their paths absolute
workflow.configfiles[:] = [os.path.abspath(path) for path in workflow.configfiles]


include: "workflow/rules/common.smk"


workdir: config["workdir"]


report: "workflow/report/workflow.rst"


include: "workflow/rules/download.smk"
include: "workflow/rules/filter.smk"
include: "workflow/rules/caption.smk"
include: "workflow/rules/mask.smk"
include: "workflow/rules/export.smk"


rule all:
    default_target: True
    input:
        *ALL_TARGETS,
        MERGED,
        CAPTIONED,
        MASKED,
        VALIDATED,
        EXPORTED,
        EMU3,
        COUNTS,
