# The one entry point for set-up, tests, lint, the demo and benchmarks.
#   make demo    create .venv, install, run examples/quickstart on the embedded broker
#   make test    create .venv, install, run the test suite (starts private brokers)
#   make lint    ruff and mypy
#   make bench   benchmarks/throughput.py: dramaturg vs bare Dramatiq on Redis and RabbitMQ

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test lint bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]' --group dev
	touch $@

demo: install
	$(PY) examples/quickstart/demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache examples/*/.dramaturg
