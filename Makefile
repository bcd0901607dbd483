# The one entry point for set-up, tests, lint, the demo and benchmarks.
#   make demo    create .venv, install, run examples/user_import on the embedded broker
#                (20,000 users; DEMO_ARGS="--users 100000 --emails eager" for more)
#   make quickstart  the same for examples/quickstart
#   make test    create .venv, install, run the test suite (starts private brokers)
#   make lint    ruff and mypy
#   make bench   benchmarks/throughput.py: dramaturg vs bare Dramatiq on Redis and RabbitMQ

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo quickstart test lint bench install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]' --group dev
	touch $@

demo: install
	$(PY) examples/user_import/demo.py $(DEMO_ARGS)

quickstart: install
	$(PY) examples/quickstart/demo.py

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy
	for example in examples/*/; do $(PY) -m mypy $$example*.py || exit 1; done

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache examples/*/.dramaturg examples/user_import/data
