# The README's two commands: `make sample` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.groundset-installed
SNAKEMAKE := $(BIN)/snakemake

.PHONY: install sample test lint format bench clean-sample slurm-profile

# Install groundset and everything its rules run into .venv (once; again when pyproject.toml changes).
# uv resolves and installs the same versions as pip in a third of the time (1 min 28 s with a
# warm cache, vs pip's 4 min 30 s on 2 cores); pip is the fallback where uv cannot install.
# --compile-bytecode as pip does: this environment sets PYTHONDONTWRITEBYTECODE, and without .pyc
# files every job's `import torch, transformers, snakemake` takes 20 s instead of 7 s.
# sam2 is a source package whose build imports torch: it is built against the torch above (an
# isolated build would download another torch); SAM2_BUILD_CUDA=0: no CUDA extension.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv || true
	if test -x $(BIN)/uv; then \
	  $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev]" && \
	  SAM2_BUILD_CUDA=0 $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --no-build-isolation sam2==1.1.0; \
	else false; fi || { \
	  $(BIN)/python -m pip install -q --upgrade pip && \
	  $(BIN)/python -m pip install -q -e ".[dev]" && \
	  SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install -q --no-build-isolation sam2==1.1.0; }
	touch $(STAMP)

install: $(STAMP)

# Run the whole workflow on the bundled sample, served on loopback; outputs in results/sample.
sample: install
	$(SNAKEMAKE) --profile profiles/local --configfile config/sample.yaml
	$(SNAKEMAKE) --profile profiles/local --configfile config/sample.yaml --report $(CURDIR)/results/sample/report.html
	@echo
	@echo "== groundset sample: counts per stage (results/sample) =="
	@$(BIN)/groundset summary --config config/sample.yaml

# Install profiles/slurm as your Snakemake user profile `slurm` (then: snakemake --profile slurm).
# Never overwrites one you already have; edit the copy (partitions.yaml, account) for your site.
SNAKEMAKE_PROFILES := $(or $(XDG_CONFIG_HOME),$(HOME)/.config)/snakemake
slurm-profile:
	@if test -e "$(SNAKEMAKE_PROFILES)/slurm"; then \
	  echo "$(SNAKEMAKE_PROFILES)/slurm exists: not overwriting it (compare it with profiles/slurm)" >&2; \
	  exit 1; \
	fi
	mkdir -p "$(SNAKEMAKE_PROFILES)"
	cp -R profiles/slurm "$(SNAKEMAKE_PROFILES)/slurm.tmp"
	mv "$(SNAKEMAKE_PROFILES)/slurm.tmp" "$(SNAKEMAKE_PROFILES)/slurm"
	@echo "installed $(SNAKEMAKE_PROFILES)/slurm: edit partitions.yaml and the account there, then run: snakemake --profile slurm"

# Lint and test (what CI runs): two workers; the tests that share the sample run stay on one
# (xdist groups), the SLURM test runs beside it.
test: install
	$(BIN)/pytest -q -n 2 --dist loadgroup --durations=25

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow/rules
	$(SNAKEMAKE) --lint --configfile config/sample.yaml

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/snakefmt Snakefile workflow/rules

bench: install
	$(BIN)/python bench/bench_manifest.py
	$(BIN)/python bench/bench_split.py
	$(BIN)/python bench/bench_filter.py
	$(BIN)/python bench/bench_caption.py
	$(BIN)/python bench/bench_stats.py
	$(BIN)/python bench/bench_emu3.py
	$(BIN)/python bench/bench_mask.py
	$(BIN)/python bench/bench_dedup.py
	$(BIN)/python bench/bench_export.py

clean-sample:
	rm -rf results/sample
