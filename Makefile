# The one entry point for set-up, tests, lint, the demo and benchmarks.
#   make demo    create .venv, install, run examples/user_import on the embedded broker
#                (20,000 users; DEMO_ARGS="--users 100000 --emails eager" for more)
#   make quickstart  the same for examples/quickstart
#   make test    create .venv, install, run the test suite (starts private brokers)
#   make lint    ruff and mypy
#   make compat  Dramatiq's own test suite (its sdist, downloaded into .compat/) on dramaturg's brokers,
#                against compat/differences.toml; COMPAT_ARGS="tests/test_actors.py" runs a part
#   make chaos   the chaos suite's full run (tests/chaos: more repetitions, the 15 s outage), then
#                its table in docs/RELIABILITY.md; CHAOS_ARGS="-k redis -x" to narrow it
#   make screenshots  the dashboard's pictures in docs/operations/dashboard/ (headless Chromium on a private Redis)
#   make docs    the documentation site (mkdocs.yml, docs/) into site/, warnings as errors
#   make bench   benchmarks/throughput.py: dramaturg vs bare Dramatiq on Redis and RabbitMQ
#   make bench-peers  benchmarks/peers.py: dramaturg vs Dramatiq, Celery, RQ and Huey (the bench group),
#                written to benchmarks/RESULTS.md; PEERS_ARGS="--rounds 1 --count 2000" for a quick look

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=
CHAOS_ARGS ?=
CHAOS_ROWS := .chaos-rows.jsonl
PEERS_ARGS ?= --write benchmarks/RESULTS.md
COMPAT_ARGS ?=

.PHONY: demo quickstart test lint docs chaos bench bench-peers install clean screenshots

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
	$(PY) -m ruff check src tests benchmarks examples compat docs/_hooks
	$(PY) -m ruff format --check src tests benchmarks examples compat docs/_hooks
	$(PY) -m mypy
	for example in examples/*/; do $(PY) -m mypy $$example*.py || exit 1; done

# tests/test_dashboard_browser.py's last test fills a private Redis and saves one picture per page.
screenshots: install
	DRAMATURG_SCREENSHOTS=docs/operations/dashboard $(PY) -m pytest tests/test_dashboard_browser.py -k screenshots -q -p no:cacheprovider

$(VENV)/.docs-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --group docs
	touch $@

# --strict: a warning (a broken link or anchor, a stale API name) fails the build, and CI.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

.PHONY: compat
compat: install
	$(PY) compat/run.py $(COMPAT_ARGS)

# The table is written whatever the run found: a failed scenario is a row of the page too.
chaos: install
	rm -f $(CHAOS_ROWS)
	DRAMATURG_CHAOS=full DRAMATURG_CHAOS_ROWS=$(CHAOS_ROWS) $(PY) -m pytest tests/chaos -m chaos $(CHAOS_ARGS); \
	status=$$?; $(PY) tests/chaos/table.py $(CHAOS_ROWS) docs/RELIABILITY.md && exit $$status

bench: install
	$(PY) benchmarks/throughput.py

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --group bench
	touch $@

bench-peers: $(VENV)/.bench-installed
	$(PY) benchmarks/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache .compat examples/*/.dramaturg examples/user_import/data $(CHAOS_ROWS)
