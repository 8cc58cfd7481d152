# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv, install everything, run the default training job end to end
#   make test   - create .venv, install everything, run lint, type checks and the whole test suite
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.dcmdp-installed
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_ALLOW_INSECURE_SERIALIZATION ?= 1
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint typecheck unit clean

$(STAMP): pyproject.toml scripts/install.sh
	PY=$(PY) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

# The llama.cpp engine is an optional extra; the tests install it. Its source build (5-15 minutes)
# runs once per machine: the wheel is cached under ~/.cache/dcmdp/wheels (DCMDP_WHEEL_CACHE).
LLAMA_STAMP := $(VENV)/.dcmdp-llamacpp
$(LLAMA_STAMP): $(STAMP) scripts/install_llamacpp.sh
	VENV=$(VENV) bash scripts/install_llamacpp.sh
	touch $(LLAMA_STAMP)

# TRL and verl (their loss registry only) for the integration tests.
INTEG_STAMP := $(VENV)/.dcmdp-integrations
$(INTEG_STAMP): $(STAMP) scripts/install_integrations.sh
	VENV=$(VENV) bash scripts/install_integrations.sh
	touch $(INTEG_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dcmdp train

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples experiments scripts
	$(BIN)/ruff format --check src tests benchmarks examples experiments scripts

typecheck: $(STAMP)
	$(BIN)/mypy src

unit: $(STAMP) $(LLAMA_STAMP) $(INTEG_STAMP)
	DCMDP_REQUIRE_ENGINES=1 $(BIN)/python -m pytest -q

test: lint typecheck unit

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
