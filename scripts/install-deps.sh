#!/usr/bin/env bash
# Installs the Debian packages a make target needs, only those that are missing.
#   scripts/install-deps.sh test|demo|bench|fuzz
# Each program is checked by name first, so a machine that has everything installs nothing.
set -euo pipefail

want=()
need() { # need PROGRAM PACKAGE
  command -v "$1" >/dev/null 2>&1 || want+=("$2")
}

case "${1:-test}" in
  test | demo)
    need ip iproute2
    need iptables iptables
    need iptables-legacy iptables
    need iptables-nft iptables
    need setpriv util-linux
    need curl curl
    need openssl openssl
    need python3 python3
    # The mTLS tests and the demo capture the wire between two meshed pods.
    need tcpdump tcpdump
    ;;&
  test)
    need pip3 python3-pip
    ;;
  demo)
    # The demo's HTTP/2 client (curl 7.88 cannot reuse a prior-knowledge connection).
    need nghttp nghttp2-client
    ;;
  fuzz) ;;
  bench)
    need ip iproute2
    need iptables iptables
    need setpriv util-linux
    need curl curl
    need haproxy haproxy
    need nginx nginx-light
    need wrk wrk
    need h2load nghttp2-client
    ;;
  *)
    echo "usage: $0 test|demo|bench|fuzz" >&2
    exit 2
    ;;
esac

if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${want[*]} (run as root to install them: apt-get install -y ${want[*]})" >&2
    exit 1
  fi
  echo "installing: ${want[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

# kubectl applies the injector's patches in the tests and the demo, as the API server would.
if ! command -v kubectl >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "kubectl is missing (run as root to install it)" >&2
    exit 1
  fi
  echo "installing: kubectl"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq kubectl >/dev/null 2>&1 || apt-get install -y -qq kubernetes-client >/dev/null
fi

# The Service tests' gRPC client and server (tests/grpc_echo.py) are Python grpcio: pip first (the
# python3 on PATH may not be Debian's), then Debian's package for Debian's own python3.
case "${1:-test}" in
  test)
    if ! python3 -c 'import grpc' >/dev/null 2>&1; then
      echo "installing: grpcio (Python)"
      python3 -m pip install --quiet grpcio >/dev/null 2>&1 ||
        { [ "$(id -u)" = 0 ] && apt-get install -y -qq python3-grpcio >/dev/null 2>&1; } ||
        python3 -m pip install --quiet --break-system-packages grpcio
      python3 -c 'import grpc' || { echo "grpcio is still missing for $(command -v python3)" >&2; exit 1; }
    fi
    ;;
esac

# The fuzz targets (`make fuzz`, and their smoke run in `make test`) build with cargo-fuzz, from
# crates.io like the project's crates; building it takes a few minutes, once.
case "${1:-test}" in
  test | fuzz)
    if ! command -v cargo-fuzz >/dev/null 2>&1; then
      echo "installing: cargo-fuzz"
      cargo install cargo-fuzz --locked
    fi
    ;;
esac
