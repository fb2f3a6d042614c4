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

# Test apps run under every CPython the kernel walker supports (pyenv's, on every machine of this
# kind): one venv each with the asyncio web framework and the OTel SDK they use.
APP_PYTHONS := 3.10.13 3.11.7 3.12.1 3.13.0
APP_PKGS    := aiohttp==3.14.5 opentelemetry-sdk==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2

$(VENV)/.stamp-test: $(VENV)/.stamp-base pyproject.toml Makefile
	@$(PY) -m pip install -q -e '.[test]' >/dev/null
	@test -x $(PYRO08)/bin/python || $(SYS_PYTHON) -m venv $(PYRO08)
	@$(PYRO08)/bin/pip install -q 'pyroscope-io==0.8.16' >/dev/null
	@for v in $(APP_PYTHONS); do \
	  py=$$HOME/.pyenv/versions/$$v/bin/python3; \
	  if [ ! -x $$py ]; then echo "note: no $$py: its app tests will be skipped" >&2; continue; fi; \
	  test -x $(VENV)/apps/$$v/bin/python || $$py -m venv $(VENV)/apps/$$v; \
	  $(VENV)/apps/$$v/bin/pip install -q $(APP_PKGS) >/dev/null; \
	done
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
