# tunegrid: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= coordinator,worker,trainer,client,dev

.PHONY: install demo test serve bench bench-trainer bench-scheduler bench-heartbeats bench-dispatch bench-agent bench-ledger bench-dashboard bench-soak clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; sys.exit("tunegrid needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The whole marketplace on this machine (SQLite, embedded mode, one CPU worker), ending by itself;
# `make demo KEEP=1` leaves it running with the dashboard URL and an admin key printed.
demo: install
	$(PY) -m demo $(if $(KEEP),--keep,)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/tunegrid-coordinator serve

bench: install
	$(PY) bench/api.py

bench-trainer: install
	$(PY) bench/trainer.py

# The marketplace core (PostgreSQL and Redis on this machine).
bench-scheduler: install
	$(PY) bench/scheduler.py

bench-heartbeats: install
	$(PY) bench/heartbeats.py

bench-dispatch: install
	$(PY) bench/dispatch.py

bench-agent: install
	$(PY) bench/agent.py

bench-ledger: install
	$(PY) bench/ledger.py

bench-dashboard: install
	$(PY) bench/dashboard.py

bench-soak: install
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
