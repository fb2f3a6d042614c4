# spanflame: `make run` starts the agent on this node, `make test` runs the full suite.
# Both do their own set-up (host packages, .venv) and are quick when it is already done.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
SYS_PYTHON  ?= /usr/bin/python3
SITE         = $(VENV)/lib/python3.11/site-packages
PYTEST_ARGS ?=

.PHONY: help run test setup setup-test host host-test proto bench clean

help:
	@echo "make run    start the spanflame agent on this node (set-up included)"
	@echo "make test   run the full test suite (set-up included)"
	@echo "make bench  run the benchmarks and print their figures"
	@echo "make proto  regenerate agent/proto/*_pb2.py from the .proto files"

host:
	@deploy/host-setup.sh run

host-test:
	@deploy/host-setup.sh test

# The venv comes from Debian's python3 so that bcc (Debian's python3-bpfcc, pure Python over
# libbcc.so) can be exposed to it. Only the bcc package is linked in, not all of dist-packages.
$(VENV)/.stamp-base: pyproject.toml | host
	@test -x $(PY) || $(SYS_PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e . >/dev/null
	@bccdir=$$($(SYS_PYTHON) -c 'import bcc, os; print(os.path.dirname(bcc.__file__))' 2>/dev/null); \
	  if [ -n "$$bccdir" ]; then ln -sfn "$$bccdir" $(SITE)/bcc; else echo "note: bcc not importable; eBPF probes will be off" >&2; fi
	@touch $@

# The test suite also runs the older pyroscope-io 0.8 client, which cannot share a venv with 1.x.
PYRO08 := $(VENV)/pyroscope08

$(VENV)/.stamp-test: $(VENV)/.stamp-base pyproject.toml
	@$(PY) -m pip install -q -e '.[test]' >/dev/null
	@test -x $(PYRO08)/bin/python || $(SYS_PYTHON) -m venv $(PYRO08)
	@$(PYRO08)/bin/pip install -q 'pyroscope-io==0.8.16' >/dev/null
	@touch $@

setup: host $(VENV)/.stamp-base

setup-test: host-test $(VENV)/.stamp-test

run: setup
	@$(VENV)/bin/spanflame run

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup-test
	$(PY) -m bench

proto: setup-test
	$(PY) -m grpc_tools.protoc -I. --python_out=. agent/proto/*.proto

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
