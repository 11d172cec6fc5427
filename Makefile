# One entry point for people and CI. Each target does its own set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUNDLE ?= build/bundle-minilm
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test lint unit integration gpu bench demo chaos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU wheel: anything that depends on torch would otherwise pull a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[learn,dev]'
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA driver found: installing onnxruntime-gpu"; \
		$(BIN)/pip uninstall -q -y onnxruntime && $(BIN)/pip install -q onnxruntime-gpu; fi
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(BIN)/ruff check agent tools tests
	$(BIN)/ruff format --check agent tools tests
	$(BIN)/mypy agent

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

unit: setup
	$(BIN)/python -m pytest -q tests/unit

integration: setup
	$(BIN)/python -m pytest -q tests/integration

gpu: setup
	$(BIN)/python -m pytest -q tests/gpu

# Rebuilt when the graph builder changes, so `make bench`/`make demo` measure the current graph.
$(BUNDLE)/manifest.json: agent/build.py agent/lora_graph.py | setup
	$(BIN)/edge-agent model build --out $(BUNDLE)

bench: setup $(BUNDLE)/manifest.json
	$(BIN)/python -m tools.bench inference --bundle $(BUNDLE)

# Every fault scenario, 100,000 hostile messages and a 10-minute soak (~25 min); make test runs the quick part.
chaos: setup
	$(BIN)/python -m tools.chaos --json

demo: setup $(BUNDLE)/manifest.json
	$(BIN)/python -m tools.demo --bundle $(BUNDLE)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
