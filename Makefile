# Two commands on a fresh machine: `make demo` and `make test`. Each builds .venv itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch 2.13 lies on the machines' disk; an unpinned torch pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# PyPI's PoCL (LLVM 14) cannot compile for CPUs newer than its LLVM (AMD Zen 4/5: "unknown target CPU
	# 'generic'"); the distribution's PoCL can. Best effort: without root or apt the OpenCL plugin test skips.
	-command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && { dpkg -s pocl-opencl-icd >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends pocl-opencl-icd; } >/dev/null; }
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python samples/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) build *.egg-info
