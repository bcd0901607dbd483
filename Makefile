# The one entry point for set-up, tests, lint, the demo and benchmarks.
#   make demo    create .venv, install, run examples/user_import on the embedded broker
#                (20,000 users; DEMO_ARGS="--users 100000 --emails eager" for more)
#   make quickstart  the same for examples/quickstart
#   make test    create .venv, install, run the test suite (starts private brokers)
#   make lint    ruff and mypy
#   make compat  Dramatiq's own test suite (its sdist, downloaded into .compat/) on dramaturg's brokers,
#                against compat/differences.toml; COMPAT_ARGS="tests/test_actors.py" runs a part
#   make bench   benchmarks/throughput.py: dramaturg vs bare Dramatiq on Redis and RabbitMQ
#   make bench-peers  benchmarks/peers.py: dramaturg vs Dramatiq, Celery, RQ and Huey (the bench group),
#                written to benchmarks/RESULTS.md; PEERS_ARGS="--rounds 1 --count 2000" for a quick look

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=
PEERS_ARGS ?= --write benchmarks/RESULTS.md
COMPAT_ARGS ?=

.PHONY: demo quickstart test lint bench bench-peers install clean

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
	$(PY) -m ruff check src tests benchmarks examples compat
	$(PY) -m ruff format --check src tests benchmarks examples compat
	$(PY) -m mypy
	for example in examples/*/; do $(PY) -m mypy $$example*.py || exit 1; done

.PHONY: compat
compat: install
	$(PY) compat/run.py $(COMPAT_ARGS)

bench: install
	$(PY) benchmarks/throughput.py

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --group bench
	touch $@

bench-peers: $(VENV)/.bench-installed
	$(PY) benchmarks/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .compat examples/*/.dramaturg examples/user_import/data
