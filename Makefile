# tunegrid: `make demo` (coming with the demo issue) and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= coordinator,worker,trainer,dev

.PHONY: install test serve bench bench-trainer clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; sys.exit("tunegrid needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/tunegrid-coordinator serve

bench: install
	$(PY) bench/api.py

bench-trainer: install
	$(PY) bench/trainer.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
