# Quick start: `make demo` (a local 3-node cluster) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2

.PHONY: install demo test lint bench clean down sysdeps

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "python3.11 not found; set PY=..."; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,plot,bench]'
	touch $(STAMP)

install: $(STAMP)

# System tools the tests use (iptables for partitions, redis-tools for redis-cli, etcd-server and
# redis-server for the side-by-side benchmarks).
# Installed with apt-get only when missing and only when we are root (as in CI).
sysdeps:
	@.ci/sysdeps

demo: install
	$(BIN)/raftkv cluster up
	$(BIN)/raftkv put greeting "hello, raftkv"
	$(BIN)/raftkv get greeting
	$(BIN)/raftkv cas greeting "hello, raftkv" "hello again"
	$(BIN)/raftkv get greeting
	$(BIN)/raftkv status
	@echo "cluster is still running: '$(BIN)/raftkv cluster down' stops it"

down: install
	$(BIN)/raftkv cluster down

test: install sysdeps
	$(BIN)/ruff check raftkv shards jepsen_like tests bench
	@# Cached bytecode: the suite starts hundreds of node processes, and where PYTHONDONTWRITEBYTECODE is set
	@# (as on our build machines) each would compile raftkv from source again (about 0.3 s of CPU per start).
	$(BIN)/python -m compileall -q raftkv shards jepsen_like >/dev/null
	@# Two workers, one test file at a time each (a file's module fixtures stay in one process); TEST_WORKERS=0
	@# runs everything in this process.
	$(BIN)/python -m pytest -q -x --durations=20 -n $(TEST_WORKERS) --dist loadfile tests

lint: install
	$(BIN)/ruff check raftkv shards jepsen_like tests bench

clean:
	rm -rf $(VENV) .raftkv store *.egg-info
