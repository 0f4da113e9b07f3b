# Set-up is automatic: every target creates or reuses .venv by itself.
#   make demo | make test | make bench
# The venv is (re)installed when it is missing or pyproject.toml changed (stamp file below).
# TORCH_INDEX=<url> installs torch from another package index (e.g. a CPU-only wheel index);
# pip's own PIP_INDEX_URL / PIP_EXTRA_INDEX_URL environment variables work as usual.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.graphpeft-installed
# torch is pinned here (not in pyproject): a range admitting newer releases pulls a CUDA build.
TORCH   := torch==2.13.*
TORCH_INDEX ?=
# test processes (pytest-xdist): the suite is mostly single-threaded tracing, so 2 workers on
# 2 cores nearly halve it; TEST_WORKERS=0 runs it in one process
TEST_WORKERS ?= 2

.PHONY: venv demo test fuzz bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	$(PY) -m pip install -q -e ".[test,hf,bench,quant,executorch]" "$(TORCH)"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest tests -n $(TEST_WORKERS)

# the long property-based run (random models x plans; make test runs a few examples)
fuzz: $(STAMP)
	GRAPHPEFT_FUZZ_EXAMPLES=$${GRAPHPEFT_FUZZ_EXAMPLES:-500} $(PY) -m pytest tests/test_compat_fuzz.py

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

clean:
	rm -rf demo_out build dist *.egg-info .pytest_cache
