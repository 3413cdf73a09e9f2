# usage-agg: every command in README.md is one of these targets.
# Each Airflow version gets its own virtualenv, installed from its pinned constraints file.

PYTHON ?= python3
UV_VERSION := 0.13.9
# The linters, pinned here and in .pre-commit-config.yaml (tests/unit/test_lint_config.py keeps them equal).
RUFF_VERSION := 0.17.5
MYPY_VERSION := 2.4.1
AIRFLOW_VERSIONS ?= 3.3 2.11
# A third environment, "lowest": every direct dependency at the floor pyproject.toml allows
# (uv's lowest-direct resolution), on the oldest Python requires-python allows (3.11).
ENVIRONMENTS ?= $(AIRFLOW_VERSIONS) lowest
DEMO_AIRFLOW ?= 3.3
PYTEST_ARGS ?=

venv = .venv-airflow-$(1)
SOURCES := pyproject.toml $(shell find plugins dags -name '*.py' -o -name '*.sql')

.PHONY: lint check test demo bench services browser constraints mutation clean $(addprefix test-,$(ENVIRONMENTS))

# ruff (the rules in pyproject.toml) and mypy over plugins/, dags/ and example_dags/. ruff and mypy live in
# a small virtualenv of their own; mypy checks against Airflow 3.3's environment, so it sees
# the types of Airflow, its providers and the drivers as installed.
lint: .venv-lint/installed $(call venv,3.3)/installed
	.venv-lint/bin/ruff check plugins dags example_dags
	.venv-lint/bin/ruff format --check plugins dags example_dags
	.venv-lint/bin/mypy --python-executable $(call venv,3.3)/bin/python

.venv-lint/installed: Makefile
	test -x .venv-lint/bin/python || $(PYTHON) -m venv .venv-lint
	.venv-lint/bin/python -m pip install --quiet --disable-pip-version-check ruff==$(RUFF_VERSION) mypy==$(MYPY_VERSION)
	touch $@

# The quick loop while changing the code, not the proof (`make test` is; CI runs that): lint, then the
# unit and integration tiers on Airflow 3.3 alone, without the tests marked slow (pyproject.toml) and
# with one PostgreSQL driver, psycopg, the one Airflow 3's PostgresHook hands out (make test: both).
check: lint services $(call venv,3.3)/installed
	USAGE_AGG_PG_DRIVERS=psycopg tools/airflow-env.sh 3.3 $(call venv,3.3)/bin/python -m pytest --durations=10 \
		-m "not slow" tests/unit tests/integration $(PYTEST_ARGS)

# The whole suite, on every supported Airflow version; the unit and DAG tiers at the lowest versions.
test: services browser $(addprefix test-,$(ENVIRONMENTS))

# The integration tier tests the plain-Python core: it imports no Airflow, and both
# environments pin the same drivers (tests/unit/test_constraints.py), so it runs once.
PYTEST_ARGS_2.11 := --ignore=tests/integration
PYTEST_ARGS_lowest := tests/unit tests/dags

# --durations: the slowest tests in CI's log, where the suite's time budget is watched.
$(addprefix test-,$(ENVIRONMENTS)): test-%: .venv-airflow-%/installed
	tools/airflow-env.sh $* $(call venv,$*)/bin/python -m pytest --durations=25 $(PYTEST_ARGS_$*) $(PYTEST_ARGS)

# Seed a few days of usage, run the hourly DAG with the Airflow CLI, print the rows.
demo: services $(call venv,$(DEMO_AIRFLOW))/installed
	tools/airflow-env.sh $(DEMO_AIRFLOW) tools/demo.sh

# The benchmark: the package against a naive job and the raw limits (ratios, not assertions).
BENCH_ARGS ?=
bench: services $(call venv,$(DEMO_AIRFLOW))/installed
	tools/airflow-env.sh $(DEMO_AIRFLOW) python bench/run.py $(BENCH_ARGS)

# Mutation testing (mutmut, pinned in the test extra) of the core modules against the unit
# and integration tiers, one worker; hours of machine time, not run by CI. mutmut wants
# the package at src/usage_agg, so it runs in a copy of the tree, build/mutation/ (the
# configuration is [tool.mutmut] in pyproject.toml). MUTANTS narrows the run, e.g.
# MUTANTS='usage_agg.keys.*' (the report counts the rest as not run). A test
# that fails is run twice more (pytest-rerunfailures): on a loaded machine a timing-
# sensitive test failing once must not count as a killed mutant, nor stop the clean run.
MUTANTS ?=
mutation: services $(call venv,3.3)/installed
	rm -rf build/mutation && mkdir -p build/mutation/src
	cp -r plugins/usage_agg build/mutation/src/
	cp -r tests dags plugins constraints pyproject.toml docker-compose.yaml Dockerfile Makefile .pre-commit-config.yaml \
		.ci tools README.md CHANGELOG.md LICENSE build/mutation/
	find build/mutation -name __pycache__ -prune -exec rm -rf {} +
	cd build/mutation && PYTEST_ADDOPTS="--reruns 2" ../../tools/airflow-env.sh 3.3 mutmut run --max-children 1 $(MUTANTS)
	cd build/mutation && ../../tools/airflow-env.sh 3.3 python ../../tools/mutation_report.py ../../tests/mutation-equivalents.md

# Make sure Redis and PostgreSQL answer (start them, or embedded ones, when down).
services:
	tools/services.sh start

# Debian's Chromium, for the browser test of Airflow 3's trigger form (apt, as root).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

.venv-airflow-%/installed: constraints/airflow-%.txt $(SOURCES)
	test -x $(call venv,$*)/bin/python || $(PYTHON) -m venv $(call venv,$*)
	$(call venv,$*)/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(call venv,$*)/bin/uv pip install --quiet --python $(call venv,$*)/bin/python \
		-c constraints/airflow-$*.txt --reinstall-package usage-agg '.[test]'
	touch $@

# Re-pin the constraints files after changing the dependencies in pyproject.toml (not run by the tests). The lowest
# environment: the package and its optional integrations resolved lowest-direct (each direct
# dependency at its floor; the current pins kept as preferences for the rest), then the test
# tools fitted around that, at their newest.
constraints:
	echo 'apache-airflow==3.3.2' > .airflow-pin.txt && \
		uv pip compile -q --python-version 3.11 --no-header --no-annotate pyproject.toml .airflow-pin.txt --extra test -o constraints/airflow-3.3.txt
	echo 'apache-airflow==2.11.2' > .airflow-pin.txt && \
		uv pip compile -q --python-version 3.11 --no-header --no-annotate pyproject.toml .airflow-pin.txt --extra test -o constraints/airflow-2.11.txt
	cp constraints/airflow-lowest.txt .lowest-runtime.txt 2>/dev/null || true
	uv pip compile -q --python-version 3.11 --resolution lowest-direct --no-header --no-annotate \
		pyproject.toml --extra statsd --extra openlineage --extra celery -o .lowest-runtime.txt
	uv pip compile -q --python-version 3.11 --no-header --no-annotate \
		pyproject.toml --extra test -c .lowest-runtime.txt -o constraints/airflow-lowest.txt
	rm -f .airflow-pin.txt .lowest-runtime.txt

clean:
	tools/services.sh stop
	rm -rf .venv-airflow-* .venv-lint .airflow-* .services build plugins/*.egg-info .mypy_cache .ruff_cache
