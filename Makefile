# qtools: thin targets over scripts/ and the `qtools` CLI. `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
QTOOLS  := $(VENV)/bin/qtools
STAMP   := $(VENV)/.qtools-installed

BITS    ?= 5
GROUP   ?= 64
FROM    ?= models/fused_f16
BASE    ?= models/demo_base
ADAPTER ?= models/demo_adapter
OUT     ?= models/fused_f16
SUITE   ?= suites/demo.jsonl
RECIPE  ?= uniform
DATA    ?=
FORCE   ?= 0
LOGS    ?= logs
VALID_BITS := 2 3 4 5 6 8
VALID_GROUPS := 32 64 128

# Refuse bit-widths and group sizes MLX affine quantization does not support.
$(foreach b,$(BITS),$(if $(filter $(b),$(VALID_BITS)),,$(error BITS=$(b) is not supported: use one of $(VALID_BITS))))
$(if $(filter $(GROUP),$(VALID_GROUPS)),,$(error GROUP=$(GROUP) is not supported: use one of $(VALID_GROUPS)))

export FORCE GROUP LOGS

.PHONY: help install test demo fuse quantize validate sweep survival compare bench bench-scale calibrate calibrate-timing outside clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and build/install qtools (C++ kernel included)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h) scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) scripts/install.sh
	@touch $@

test: $(STAMP) ## Lint (ruff: pyflakes, import order) and run the test suite
	$(PY) -m ruff check qtools tests scripts
	$(PY) -m pytest -q tests

bench: $(STAMP) ## Benchmark the kernel against numpy and MLX-CPU on a 1 GB synthetic model
	$(PY) scripts/bench.py

LAYERS ?=
bench-scale: $(STAMP) ## Time + peak memory of fuse, delta-survival, ... on a Qwen3-30B-A3B-shaped model of 1.1x RAM (~60 GB disk; LAYERS=2: a small one)
	$(PY) scripts/bench_scale.py $(if $(LAYERS),--layers $(LAYERS))

demo: $(STAMP) ## The built-in demo: tiny model + LoRA, fuse, predict, sweep 8..2 bits, validate, compare
	scripts/demo.sh

outside: $(STAMP) ## Fine-tunes the study never saw (PAIRS="g12:1 g36:1 g24:2": family:seed, a demo-task family or a study one such as agent-moe-g24; a study family takes :KEYS:LR, e.g. agent-moe-g24:13::2e-3), each judged as make demo is: bracket, probe, point rule, constant guess against its real sweep -> logs/outside (docs/outside.md; ~10 min each)
	scripts/outside.sh

calibrate: $(STAMP) ## The study: 6 families x 24 fine-tunes, fake + real quantized truth, weights bracket and probe judged leave-one-family-out (hours; resumable, results kept in calibration/results; FROM_CACHE=1 refits) -> docs/study.md
	scripts/calibrate.sh

calibrate-timing: $(STAMP) ## The probe's cost against the sweep, each study fine-tune timed alone (resumable, ~1 min each; LIMIT=N stops after N) -> calibration/timing; then make calibrate FROM_CACHE=1
	.venv/bin/python -m qtools.calibrate.timing $(if $(LIMIT),--limit $(LIMIT))

# A variable's value if given on the command line or in the environment, else $(2):
# lets quantize/sweep/survival keep their own defaults for OUT and BITS.
given_or = $(if $(filter command line environment,$(origin $(1))),$($(1)),$(2))

fuse: $(STAMP) ## Fuse ADAPTER into BASE (float32 math, float16 out) -> OUT [FORCE=1]
	BASE="$(BASE)" ADAPTER="$(ADAPTER)" OUT="$(OUT)" scripts/fuse.sh

quantize: $(STAMP) ## Quantize FROM to BITS (GROUP, RECIPE=uniform|mixed_3_6|mixed_4_6|survival|mxfp4|nvfp4|mxfp8|awq|gptq|dwq|dynamic|adapter|compensated, DATA=calibration jsonl/txt) -> models/fused_<BITS>bit
	FROM="$(FROM)" BITS="$(BITS)" RECIPE="$(RECIPE)" DATA="$(DATA)" GROUP="$(call given_or,GROUP,)" OUT="$(call given_or,OUT,)" scripts/quantize.sh

# MODEL is checked before anything is built.
ifneq ($(filter validate,$(MAKECMDGOALS)),)
$(if $(MODEL),,$(error MODEL is required: make validate MODEL=models/fused_5bit))
endif

validate: $(STAMP) ## Run SUITE on MODEL=... -> $(LOGS)/<model>-<suite>.json; fails if the verdict fails (Error 3)
	MODEL="$(MODEL)" SUITE="$(SUITE)" scripts/validate.sh

sweep: $(STAMP) ## Quantize + validate each of BITS (default "8 6 5 4 3") and FROM; stops on an error, not on a failed verdict
	FROM="$(FROM)" BITS="$(call given_or,BITS,8 6 5 4 3)" SUITE="$(SUITE)" scripts/sweep.sh

survival: $(STAMP) ## qtools delta-survival on FROM for BITS (default all) -> $(LOGS)/survival.json + table
	FROM="$(FROM)" BITS="$(call given_or,BITS,$(VALID_BITS))" scripts/survival.sh

compare: $(STAMP) ## Compare every log in $(LOGS)/: winner per metric, verdicts, recommendation, plot
	scripts/compare.sh

.PHONY: recipes
recipes: $(STAMP) ## Every recipe (SPECS="recipe:bits ...") on the demo model, or on FAMILY=g12 [SEED=1]'s fine-tune: time, validate, retention, compare
	FROM="$(call given_or,FROM,models/demo_fused_f16)" BASE="$(BASE)" SUITE="$(SUITE)" FAMILY="$(FAMILY)" SEED="$(SEED)" scripts/recipes.sh
