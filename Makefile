# usage-agg: every command in README.md is one of these targets.
# Each Airflow version gets its own virtualenv, installed from its pinned constraints file.

PYTHON ?= python3
UV_VERSION := 0.13.9
AIRFLOW_VERSIONS ?= 3.3 2.11
# A third environment, "lowest": every direct dependency at the floor setup.cfg allows
# (uv's lowest-direct resolution), on the oldest Python python_requires allows (3.11).
ENVIRONMENTS ?= $(AIRFLOW_VERSIONS) lowest
DEMO_AIRFLOW ?= 3.3
PYTEST_ARGS ?=

venv = .venv-airflow-$(1)
SOURCES := setup.cfg pyproject.toml $(shell find plugins dags -name '*.py' -o -name '*.sql')

.PHONY: test demo bench services browser constraints clean $(addprefix test-,$(ENVIRONMENTS))

# The whole suite, on every supported Airflow version; the unit and DAG tiers at the lowest versions.
test: services browser $(addprefix test-,$(ENVIRONMENTS))

# The integration tier tests the plain-Python core: it imports no Airflow, and both
# environments pin the same drivers (tests/unit/test_constraints.py), so it runs once.
PYTEST_ARGS_2.11 := --ignore=tests/integration
PYTEST_ARGS_lowest := tests/unit tests/dags

$(addprefix test-,$(ENVIRONMENTS)): test-%: .venv-airflow-%/installed
	tools/airflow-env.sh $* $(call venv,$*)/bin/python -m pytest $(PYTEST_ARGS_$*) $(PYTEST_ARGS)

# Seed a few days of usage, run the hourly DAG with the Airflow CLI, print the rows.
demo: services $(call venv,$(DEMO_AIRFLOW))/installed
	tools/airflow-env.sh $(DEMO_AIRFLOW) tools/demo.sh

# The benchmark: the package against a naive job and the raw limits (ratios, not assertions).
BENCH_ARGS ?=
bench: services $(call venv,$(DEMO_AIRFLOW))/installed
	tools/airflow-env.sh $(DEMO_AIRFLOW) python bench/run.py $(BENCH_ARGS)

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

# Re-pin the constraints files after changing setup.cfg (not run by the tests). The lowest
# environment: the package and its optional integrations resolved lowest-direct (each direct
# dependency at its floor; the current pins kept as preferences for the rest), then the test
# tools fitted around that, at their newest.
constraints:
	echo 'apache-airflow==3.3.2' > .airflow-pin.txt && \
		uv pip compile -q --python-version 3.11 --no-header --no-annotate setup.cfg .airflow-pin.txt --extra test -o constraints/airflow-3.3.txt
	echo 'apache-airflow==2.11.2' > .airflow-pin.txt && \
		uv pip compile -q --python-version 3.11 --no-header --no-annotate setup.cfg .airflow-pin.txt --extra test -o constraints/airflow-2.11.txt
	cp constraints/airflow-lowest.txt .lowest-runtime.txt 2>/dev/null || true
	uv pip compile -q --python-version 3.11 --resolution lowest-direct --no-header --no-annotate \
		setup.cfg --extra statsd --extra openlineage -o .lowest-runtime.txt
	uv pip compile -q --python-version 3.11 --no-header --no-annotate \
		setup.cfg --extra test -c .lowest-runtime.txt -o constraints/airflow-lowest.txt
	rm -f .airflow-pin.txt .lowest-runtime.txt

clean:
	tools/services.sh stop
	rm -rf .venv-airflow-* .airflow-* .services build plugins/*.egg-info
