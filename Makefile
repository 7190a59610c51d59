# ProxyMQ developer commands. `make demo` and `make test` each work on a fresh Debian-like
# machine: they create the virtual environment and make sure a RabbitMQ broker answers first.
#
#   make install    .venv with the project and its dev tools (fast when nothing changed)
#   make broker     a broker at PROXYMQ_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/),
#                   started or installed when the URL is this machine, with the plugins enabled
#   make test       lint + typecheck + the whole pytest suite (PYTEST_ARGS="-k status" to narrow)
#   make demo       the whole pipeline on this machine, a dozen calls shown as a table
#   make bench      throughput and latency through the queue
#   make clean      caches and build leftovers (make distclean also removes .venv)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstalled when pyproject.toml changes, so a new dependency arrives with `git pull`.
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help install broker tools test lint format typecheck demo bench clean distclean

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

install: $(STAMP)
	@:

$(STAMP): pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
		echo "creating $(VENV) with $$($(PYTHON) --version)"; \
		$(PYTHON) -m venv $(VENV) || { \
			echo "cannot create $(VENV): on Debian/Ubuntu run 'apt-get install python3-venv'" >&2; \
			exit 1; }; \
	fi
	@echo "installing proxymq and its dev tools into $(VENV)"
	@# pip's and setuptools' chatter goes to a log, shown only when the install fails.
	@$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]' \
		> $(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log >&2; exit 1; }
	@touch $@

broker: install
	@$(BIN)/python -m shared.cli.ensure_broker

# promtool validates the Prometheus alert rules in the tests (Debian package `prometheus`).
tools:
	@command -v promtool >/dev/null || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing promtool (Debian package prometheus)"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		else \
			echo "promtool is missing: install the prometheus package (apt-get install prometheus)" >&2; \
			exit 1; \
		fi; }

# Cheap checks first, so a typo fails in seconds instead of after the integration tests.
test: install lint typecheck broker tools
	@# three workers on two cores (most tests wait on processes and the broker); the fault
	@# tests share one (tests/conftest.py: pytest_xdist_make_scheduler)
	@$(BIN)/pytest -q -n 3 $(PYTEST_ARGS)

lint: install
	@$(BIN)/ruff check --quiet --output-format concise .
	@$(BIN)/ruff format --check --quiet . || { \
		echo "formatting differs: run 'make format'" >&2; exit 1; }

format: install
	@$(BIN)/ruff check --quiet --fix .
	@$(BIN)/ruff format --quiet .

typecheck: install
	@$(BIN)/mypy

demo: install broker
	@$(BIN)/proxymq demo

bench: install broker
	@$(BIN)/proxymq bench

clean:
	@rm -rf build .mypy_cache .ruff_cache .pytest_cache *.egg-info bench-*.png
	@find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	@rm -rf $(VENV)
