# `make test` is the one test command: README, CI (.ci/run) and developers use it.
# It installs what the integration tests need (moto_server in a local
# virtualenv, pinned; Debian's chromium and chromium-driver for the console's
# browser tests) and then runs every test.

MOTO_VERSION := 5.2.1
VENV := .venv
PYTHON ?= python3
CARGO ?= cargo
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
TEST_ENV := MOTO_SERVER=$(CURDIR)/$(VENV)/bin/moto_server CHROMIUM=$(CHROMIUM) CHROMEDRIVER=$(CHROMEDRIVER)
SCREENSHOTS := $(CURDIR)/target/tmp/screenshots

.PHONY: test soak bench bench-backfill venv browser screenshots lint fmt clean-venv

test: venv browser
	$(TEST_ENV) $(CARGO) test --all-targets

# The console's browser tests again, and their screenshots into docs/images
# (the README shows them).
screenshots: venv browser
	$(TEST_ENV) $(CARGO) test --test it -- in_the_browser
	cp $(SCREENSHOTS)/console.png $(SCREENSHOTS)/console-review.png docs/images/

# The long reliability runs (docs/RELIABILITY.md): 20,000 events with 10
# SIGKILLs, and a 30 s endpoint outage.
soak: venv
	$(TEST_ENV) CRASH_EVENTS=20000 CRASH_KILLS=10 OUTAGE_SECS=30 \
		$(CARGO) test --test it -- crash_loop endpoint_outage --nocapture

# Throughput, latency, CPU per image and memory against the endpoint's bound
# (docs/BENCHMARKS.md). Everything in-process, no moto needed. Pass
# scenario names or --quick: make bench ARGS="--quick 1-batch".
bench:
	$(CARGO) bench --bench throughput -- $(ARGS)

# inferstream backfill over a million keys: objects/s and peak RSS;
# ARGS="--keys N" for another size.
bench-backfill:
	$(CARGO) bench --bench backfill -- $(ARGS)

# Re-created when the pin changes; the stamp file names the pinned version.
venv: $(VENV)/.moto-$(MOTO_VERSION)

$(VENV)/.moto-$(MOTO_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'moto[server]==$(MOTO_VERSION)'
	touch $@

# Debian's Chromium and its WebDriver, from the Debian registry (as root,
# or through sudo), unless both are there already.
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null; then SUDO=sudo; \
	else echo "the browser tests need Debian's chromium and chromium-driver: install them as root (apt-get install chromium chromium-driver), or set CHROMIUM and CHROMEDRIVER" >&2; exit 1; fi; \
	echo "installing chromium and chromium-driver (Debian) for the browser tests"; \
	$$SUDO apt-get update -qq && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-venv:
	rm -rf $(VENV)
