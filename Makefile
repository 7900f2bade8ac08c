# tunegrid: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= coordinator,worker,trainer,client,dev

.PHONY: install demo test serve trainer-image bench bench-trainer bench-verification bench-export bench-batch bench-chunked-loss bench-gpu-dry-run bench-scheduler bench-heartbeats bench-dispatch bench-agent bench-ledger bench-dashboard bench-soak clean

install: $(VENV)/.installed

# llama-cpp-python builds llama.cpp from source (no wheel on PyPI for CPU Linux): the library only, for this CPU.
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -c 'import sys; sys.exit("tunegrid needs Python >= 3.11") if sys.version_info < (3, 11) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The whole marketplace on this machine (SQLite, embedded mode, one CPU worker), ending by itself;
# `make demo KEEP=1` leaves it running with the dashboard URL and an admin key printed.
demo: install
	$(PY) -m demo $(if $(KEEP),--keep,)

# Two test processes (pytest-xdist) on this 2-core machine; `make test PYTEST_WORKERS=0` runs in one.
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/tunegrid-coordinator serve

# The trainer image (worker/trainer/Dockerfile) without a registry: a Debian base made with debootstrap and
# `docker import`, and every wheel (the CPU torch on this disk included) downloaded first, so the build
# itself needs no network. Cached by Docker: a rebuild after a code change takes seconds.
TRAINER_IMAGE ?= tunegrid/trainer:latest
DEBIAN_BASE ?= tunegrid/debian-python:bookworm
ROOTFS ?= $(or $(TMPDIR),/var/tmp)/tunegrid-trainer-rootfs
trainer-image: install
	docker image inspect $(DEBIAN_BASE) >/dev/null 2>&1 || { rm -rf $(ROOTFS) \
	  && debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm $(ROOTFS) \
	     http://deb.debian.org/debian >/dev/null \
	  && tar -C $(ROOTFS) -c . | docker import - $(DEBIAN_BASE) && rm -rf $(ROOTFS); }
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps -w worker/trainer/wheels llama-cpp-python==0.3.36
	$(PY) -m pip download -q -d worker/trainer/wheels --find-links worker/trainer/wheels --only-binary llama-cpp-python \
	  torch==2.13.0 -r worker/trainer/requirements.txt
	docker build -q -t $(TRAINER_IMAGE) --build-arg BASE=$(DEBIAN_BASE) --build-arg PYTHON=python3 \
	  -f worker/trainer/Dockerfile . >/dev/null

bench: install
	$(PY) bench/api.py

bench-trainer: install
	$(PY) bench/trainer.py

bench-verification: install
	$(PY) bench/verification.py

bench-export: install
	$(PY) bench/export.py

bench-batch: install
	$(PY) bench/batch.py

bench-chunked-loss: install
	$(PY) bench/chunked_loss.py

# The GPU benchmark's steps on the CPU, on small shapes (bench/gpu.sh runs them for real on a lent GPU machine).
bench-gpu-dry-run: install
	PY=$(PY) bench/gpu.sh --dry-run

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
