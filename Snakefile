# groundset: LAION URL lists -> filtered, grounded text-to-image data. See README.md.
import os

from snakemake.utils import min_version

min_version("9.0")


# Relative paths (config files, URL lists, models, workdir) are relative to where snakemake was
# started. Cluster job steps start in the workdir, so the first snakemake hands its directory on.
LAUNCH_DIR = os.environ.setdefault("GROUNDSET_LAUNCH_DIR", os.getcwd())


configfile: os.path.join(LAUNCH_DIR, "config", "config.yaml")


# `--report` reads the config files again after `workdir:`; keep their paths absolute
workflow.configfiles[:] = [os.path.join(LAUNCH_DIR, path) for path in workflow.configfiles]


include: "workflow/rules/common.smk"


workdir: os.path.join(LAUNCH_DIR, config["workdir"])


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
        DEDUP,
        CAPTIONED,
        MASKED,
        VALIDATED,
        EXPORTED,
        EMU3,
        EXPORTS,
        COUNTS,
