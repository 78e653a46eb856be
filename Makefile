# remora: `make demo` runs the whole chain locally; `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all build release fmt lint unit e2e test demo bench golden images deploy undeploy manifests-check fuzz fuzz-smoke

all: build

# remora-proxy is linked statically (static-pie, so it keeps ASLR). One runs in every pod:
# dynamically linked, start-up touched pages of libc, libm, libgcc_s and the loader, which the
# kernel maps 64 KiB at a time; static, its idle RSS in `make bench` went from 5.1 to 4.1 MiB,
# with the same instructions per request (scripts/bench/README.md). Only the proxy's own link
# takes the flag (`cargo rustc`): as a RUSTFLAGS entry it would reach proc macros, which can't
# be static. glibc >= 2.34 resolves names without loading modules: tests/tests/service.rs
# finds remora-control by its DNS name through the static proxy.
PROXY_LINK := -C target-feature=+crt-static

build:
	$(CARGO) build --workspace --bins
	$(CARGO) rustc -p remora-proxy --bin remora-proxy -- $(PROXY_LINK)

# remora-proxy is built on its own: in one build with remora-injector, Cargo would give it the
# union of both crates' dependency features, and kube-client's `tracing/log` would put a log
# fallback into every tracing span of the proxy's hot path (h2, hyper): 4% more instructions per
# HTTP/2 request. `lint` checks that the proxy alone does not ask for it.
release:
	$(CARGO) build --release -p remora-injector -p remora-control -p remora-init --bins
	$(CARGO) rustc --release -p remora-proxy --bin remora-proxy -- $(PROXY_LINK)

fmt:
	$(CARGO) fmt --all
	cd fuzz && $(CARGO) fmt

lint:
	$(CARGO) fmt --all -- --check
	cd fuzz && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if $(CARGO) tree -p remora-proxy -e features -i tracing | grep -q 'tracing feature "log"'; then \
	  echo 'remora-proxy: its dependency tree turns on tracing'"'"'s "log" feature (cargo tree -p remora-proxy -e features -i tracing); it slows every span on the hot path' >&2; \
	  exit 1; \
	fi

# Unit tests, then the end-to-end tests in tests/ (real namespaces and iptables: run as root).
test:
	scripts/install-deps.sh test
	$(MAKE) lint
	$(MAKE) build
	$(CARGO) test --workspace
	@if [ -x scripts/check-manifests.sh ]; then scripts/check-manifests.sh; fi
	$(MAKE) fuzz-smoke

# The fuzz targets (fuzz/, its own crate outside the workspace; fuzz/README.md).
#   make fuzz [FUZZ_SECONDS=60] [FUZZ_TARGETS="h1_response detect"]: each target that long, with
#   AddressSanitizer; fails on a crash, a hang or an unbounded allocation, prints executions.
#   make fuzz-smoke: each target over its seeds and past failures plus a few seconds (make test).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
export FUZZ_SECONDS

fuzz:
	scripts/install-deps.sh fuzz
	CARGO=$(CARGO) fuzz/run.sh fuzz $(FUZZ_TARGETS)

fuzz-smoke:
	scripts/install-deps.sh fuzz
	CARGO=$(CARGO) fuzz/run.sh smoke $(FUZZ_TARGETS)

demo:
	@if [ -x scripts/demo.sh ]; then scripts/demo.sh; else echo "the demo arrives with remora-proxy"; exit 1; fi

bench:
	scripts/bench.sh

# Regenerates every golden file from the current code; review the diff before committing.
golden:
	REMORA_BLESS=1 $(CARGO) test --workspace golden

# Container images (docker/Dockerfile; needs a Docker engine with BuildKit) and a cluster install.
#   make images [REGISTRY=my.registry/remora] [TAG=dev] [PUSH=1]
#   make deploy [REGISTRY=…] [TAG=…] [DEPLOY=manifests/cert-manager]
#   make undeploy [DEPLOY=…]
REGISTRY ?= ghcr.io/remora-mesh
TAG ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' Cargo.toml | head -n1)
DOCKER ?= docker
KUBECTL ?= kubectl
DEPLOY ?= manifests

images:
	@for image in injector control proxy init; do \
	  echo "building $(REGISTRY)/remora-$$image:$(TAG)"; \
	  DOCKER_BUILDKIT=1 $(DOCKER) build -f docker/Dockerfile --target $$image -t $(REGISTRY)/remora-$$image:$(TAG) . || exit 1; \
	  if [ -n "$(PUSH)" ]; then $(DOCKER) push $(REGISTRY)/remora-$$image:$(TAG) || exit 1; fi; \
	done

# The manifests name ghcr.io/remora-mesh/remora-*:<version>; REGISTRY and TAG rewrite every one
# (the injector's image and the proxy/init images it injects) before applying.
deploy:
	$(KUBECTL) kustomize $(DEPLOY) \
	  | sed -e 's#ghcr\.io/remora-mesh/\(remora-[a-z]*\):[A-Za-z0-9._-]*#$(REGISTRY)/\1:$(TAG)#g' \
	  | $(KUBECTL) apply -f -
	$(KUBECTL) -n remora-system rollout status deployment/remora-injector --timeout=180s
	$(KUBECTL) -n remora-system rollout status deployment/remora-control --timeout=180s

# The webhook registration goes first: with failurePolicy Fail, pods in opted-in namespaces
# could not be created between the injector's removal and the registration's.
undeploy:
	$(KUBECTL) delete mutatingwebhookconfiguration remora-injector --ignore-not-found
	$(KUBECTL) delete -k $(DEPLOY) --ignore-not-found
