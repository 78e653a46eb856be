# remora: `make demo` runs the whole chain locally; `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build release fmt lint unit e2e test demo bench golden images deploy undeploy manifests-check

all: build

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --workspace --bins

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit tests, then the end-to-end tests in tests/ (real namespaces and iptables: run as root).
test:
	scripts/install-deps.sh test
	$(MAKE) lint
	$(MAKE) build
	$(CARGO) test --workspace
	@if [ -x scripts/check-manifests.sh ]; then scripts/check-manifests.sh; fi

demo:
	@if [ -x scripts/demo.sh ]; then scripts/demo.sh; else echo "the demo arrives with remora-proxy"; exit 1; fi

bench:
	scripts/bench.sh

# Regenerates every golden file from the current code; review the diff before committing.
golden:
	REMORA_BLESS=1 $(CARGO) test --workspace golden
