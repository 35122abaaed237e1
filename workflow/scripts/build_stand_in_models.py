"""Snakemake script of rule build_stand_in_models: see groundset.testing.models."""

import os

from groundset.core.io import write_json
from groundset.core.runlog import log_to
from groundset.testing.models import build_stand_in_models

with log_to(snakemake.log[0]):
    paths = build_stand_in_models(os.path.dirname(snakemake.output[0]))
    write_json(snakemake.output[0], paths)
