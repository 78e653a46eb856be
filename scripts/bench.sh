#!/usr/bin/env bash
# `make bench`: installs what the benchmark needs, builds the release binaries once, then runs
# scripts/bench/bench.py (seats interleaved in network namespaces; results under results/).
#   BENCH_ROUNDS=1 BENCH_SECONDS=3 make bench     # quick smoke run
#   BENCH_SEATS=direct,haproxy BENCH_PARTS=proxy make bench
#   scripts/bench.sh profile    # perf counters + perf record of remora-proxy under wrk
#   scripts/bench.sh trace      # bpftrace: where a request's time goes at 1000 rps, per seat
#   scripts/bench.sh count      # callgrind: instructions per request, for small A/B changes
# Needs root: network namespaces and iptables inside them (never the host's own rules).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  ""|profile|trace|count) ;;
  *) echo "scripts/bench.sh: unknown mode '$1' (expected none, profile, trace or count)" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "make bench needs root (network namespaces, iptables inside them)" >&2
  exit 1
fi

scripts/install-deps.sh bench
for tool in nsenter openssl python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing" >&2; exit 1; }
done

case ",${BENCH_PARTS:-}," in
  *,issuance,*)
    # The issuance part's simulated proxies (scripts/bench/certify_burst.py) are Python grpcio.
    if ! python3 -c 'import grpc, cryptography' >/dev/null 2>&1; then
      echo "installing: python3-grpcio, python3-cryptography (the issuance part's client)"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-grpcio python3-cryptography
    fi ;;
esac

export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
if ! command -v oha >/dev/null 2>&1; then
  echo "installing: oha (cargo install, compiles for a few minutes)"
  cargo install oha --locked
fi

if [ -z "${BENCH_NO_BUILD:-}" ]; then
  # The release binaries as users get them: remora-proxy in a build of its own (see `release`).
  make --no-print-directory release
fi

if [ "${1:-}" = profile ]; then
  # The same optimizations, plus symbols and frame pointers for `perf record -g`, built in a
  # target dir of its own so the shared target/release stays as it is; linked statically, as
  # `make release` links it.
  if [ -z "${BENCH_NO_BUILD:-}" ]; then
    RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_STRIP=none \
      CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
      cargo rustc --release -p remora-proxy --bin remora-proxy --target-dir target/bench-profile \
        -- -C target-feature=+crt-static
  fi
  BENCH_MODE=profile BENCH_PROFILE_BIN="${BENCH_PROFILE_BIN:-target/bench-profile/release/remora-proxy}" \
    exec python3 scripts/bench/bench.py
fi

if [ "${1:-}" = count ]; then
  command -v valgrind >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q valgrind
  BENCH_MODE=count exec python3 scripts/bench/bench.py
fi

if [ "${1:-}" = trace ]; then
  command -v bpftrace >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -q bpftrace
  BENCH_MODE=trace exec python3 scripts/bench/bench.py
fi

exec python3 scripts/bench/bench.py
