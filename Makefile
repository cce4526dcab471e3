# `make test` is the one test command: README, CI (.ci/run) and developers use it.
# It installs what the integration tests need (moto_server in a local
# virtualenv, pinned) and then runs every test.

MOTO_VERSION := 5.2.1
VENV := .venv
PYTHON ?= python3
CARGO ?= cargo

.PHONY: test soak bench venv lint fmt clean-venv

test: venv
	MOTO_SERVER=$(CURDIR)/$(VENV)/bin/moto_server $(CARGO) test --all-targets

# The long reliability runs (docs/RELIABILITY.md): 20,000 events with 10
# SIGKILLs, and a 30 s endpoint outage.
soak: venv
	MOTO_SERVER=$(CURDIR)/$(VENV)/bin/moto_server CRASH_EVENTS=20000 CRASH_KILLS=10 OUTAGE_SECS=30 \
		$(CARGO) test --test it -- crash_loop endpoint_outage --nocapture

# Throughput, latency, CPU per image and memory against the endpoint's bound
# (docs/BENCHMARKS.md). Everything in-process, no moto needed. Pass
# scenario names or --quick: make bench ARGS="--quick 1-batch".
bench:
	$(CARGO) bench --bench throughput -- $(ARGS)

# Re-created when the pin changes; the stamp file names the pinned version.
venv: $(VENV)/.moto-$(MOTO_VERSION)

$(VENV)/.moto-$(MOTO_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'moto[server]==$(MOTO_VERSION)'
	touch $@

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-venv:
	rm -rf $(VENV)
