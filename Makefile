# Two commands set up a fresh Debian 12 machine (as root): `make run` and `make test`.
# Each installs only what is missing (stamp files under .stamps/), so a second call is quick.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMPS := .stamps
# FFCV compiles its extension against OpenCV and libjpeg-turbo; the default dataset is Debian's.
APT_PKGS := libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist
# The SLURM test cluster (tests/cluster/slurm.py; `make test`, `make test-slurm`): the tests install nothing.
SLURM_APT_PKGS := munge slurmctld slurmd slurm-client slurmdbd mariadb-server
CORES ?= 2

.PHONY: help install run test test-fast test-slurm coverage bench bench-all gpu-smoke clean-results
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

install: $(STAMPS)/venv  ## Debian packages + virtual environment with pinned versions + barlow (editable)

$(STAMPS)/apt:
	@mkdir -p $(STAMPS)
	@dpkg -s $(APT_PKGS) >/dev/null 2>&1 || { \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; }
	@touch $@

$(STAMPS)/apt-slurm:
	@mkdir -p $(STAMPS)
	@dpkg -s $(SLURM_APT_PKGS) >/dev/null 2>&1 || { \
	  echo "installing Debian packages: $(SLURM_APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SLURM_APT_PKGS) >/dev/null; }
	@touch $@

# torch first: ffcv declares no torch dependency, and the pair in requirements-torch.txt is the one
# that imports together under this machine's pip cap (README, "Installing").
$(STAMPS)/venv: $(STAMPS)/apt requirements.txt requirements-torch.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-torch.txt
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

run: install  ## install, then run the default pipeline end to end (Fashion-MNIST, CPU)
	$(BIN)/snakemake --cores $(CORES)

# Two pytest runs side by side: the non-SLURM tests on $(TEST_WORKERS) xdist workers, each pinned to its own core
# (tests/conftest.py; order: LONGEST_FIRST), and the SLURM suite against its own cluster, whose jobs mostly wait
# on the scheduler (its log is printed when both are done). Both always run; the exit status is 0 only if both pass.
TEST_WORKERS ?= 2
test: install $(STAMPS)/apt-slurm  ## install, then run the whole test suite (starts its own SLURM cluster)
	@status=0; log=$$(mktemp /tmp/barlow-slurm-tests.XXXXXX); \
	$(BIN)/pytest -q -ra -p no:cacheprovider -m slurm tests/slurm > $$log 2>&1 & slurm=$$!; \
	$(BIN)/pytest -q -ra -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not slurm" || status=1; \
	wait $$slurm || status=1; echo "--- the SLURM suite (tests/slurm), run beside the others:"; cat $$log; rm -f $$log; \
	exit $$status

test-fast: install  ## unit tests only (no workflow, no SLURM)
	$(BIN)/pytest -q -ra -m "not slow and not slurm"

test-slurm: install $(STAMPS)/apt-slurm  ## only the tests against a real 2-node SLURM cluster (root; starts and stops it)
	$(BIN)/pytest -q -ra -m slurm tests/slurm

# Not part of `make test` (~1.3x its time): the same two suites one after the other under coverage.py, the stages'
# subprocesses included (pyproject.toml [tool.coverage]); coverage.json names its commit, for
# `python -m benchmarks.coverage_compare BEFORE.json AFTER.json` (lines covered before and not after).
COV := COVERAGE_FILE=$(CURDIR)/.coverage-data/.coverage COVERAGE_RCFILE=$(CURDIR)/pyproject.toml
coverage: install $(STAMPS)/apt-slurm  ## line coverage of barlow/ over the whole suite -> coverage.json
	rm -rf .coverage-data && mkdir -p .coverage-data
	-$(COV) $(BIN)/coverage run -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder -m "not slurm"
	-$(COV) $(BIN)/coverage run -m pytest -q -p no:cacheprovider -m slurm tests/slurm
	$(COV) $(BIN)/coverage combine -q && $(COV) $(BIN)/coverage report && $(COV) $(BIN)/coverage json -q -o coverage.json
	$(BIN)/python -m benchmarks.coverage_compare --stamp coverage.json

# Not part of `make test`: the figures need an idle machine and minutes, not a pass/fail.
bench: install  ## performance figures vs their peers (~8 min; idle machine): benchmarks/README.md
	$(BIN)/python -m benchmarks.run

bench-all: install  ## the same plus the default pipeline end to end (~20 min)
	$(BIN)/python -m benchmarks.run --with-pipeline

# Needs a CUDA GPU (one is enough); installs nothing. On a GPU machine with this tree (and torch etc. installed),
# the exact command is:   python -m benchmarks.gpu_smoke --out $OUT
# The ImageNet presets' CUDA paths through the real launch path (barlow.launch.run, submitit's local executor, 2
# tasks on ONE GPU over gloo: LOCAL_RANK 1 computes on cuda:0): pretraining in fp32/bf16/fp16, accumulation,
# killed and resumed on the GPU; both probe protocols data-parallel. A timeout per check; images/s per stage and
# provenance -> $(OUT)/gpu_smoke.json (OUT unset: a new temp dir; never the repository). ~8 min on one H200
# (measured 2026-12-04: benchmarks/gpu_h200/). `python -m benchmarks.gpu_smoke --dry-run`: the same checks on the CPU (~2 min here);
# `--plan`: what it would run (estimates, timeouts, the experiments), as JSON, running nothing.
gpu-smoke:  ## GPU check through the real launch path + images/s per stage (needs a GPU; OUT=dir)
	$(BIN)/python -m benchmarks.gpu_smoke $(if $(OUT),--out $(OUT))

clean-results:  ## delete results/ outputs except the committed reference tables (asks nothing!)
	rm -rf results/data results/fmnist* .snakemake
