# Set-up is automatic: every target creates or reuses .venv by itself.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.graphpeft-installed
# torch is pinned here (not in pyproject): a range admitting newer releases pulls a CUDA build.
TORCH   := torch==2.13.*

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,hf]" "$(TORCH)"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m benchmarks --quick

clean:
	rm -rf demo_out build dist *.egg-info .pytest_cache
