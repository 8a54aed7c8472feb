# stoqd: `make run` starts the daemon on the embedded default; `make test` passes the tests.
# Both set up everything they need on a fresh Debian machine (a venv, and as root the
# Debian packages the tests use), so a fresh clone needs nothing else.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= etc/stoq.cfg
PYTEST_ARGS ?=

.PHONY: run test lint bench install system-deps clean

LOCK   := deploy/docker/requirements.lock

# The tests run the versions the Docker image installs: its lock constrains the venv, with
# the hashes left out (pip would demand them for the editable install too). Without it a
# dependency released since the lock was made would be tested instead.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	grep -v -e '^ *--hash' $(LOCK) | sed 's/ *\\$$//' > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need: libmagic for the mimetype worker, RabbitMQ for the
# queue tests. The Pub/Sub emulator comes with the machine image (see README).
system-deps:
	@bash tests/setup-system.sh

run: install
	mkdir -p var/incoming var/results var/run
	$(BIN)/stoqd -c $(CONFIG)

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check stoqd stoq providers tests bench
	$(BIN)/ruff format --check stoqd stoq providers tests bench
	$(BIN)/mypy stoqd stoq

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var build *.egg-info
