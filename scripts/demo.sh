#!/usr/bin/env bash
# make demo: the whole remora chain on one machine, no cluster.
#   injector (HTTPS, throwaway certificate) -> AdmissionReview for scripts/demo/pod.json
#   -> JSON patch applied with `kubectl patch --local` -> remora-init and remora-proxy run with
#   exactly the args the patched pod carries, in a pod built from network namespaces
#   -> traffic both ways -> what the proxy saw, from its /metrics.
# With remora-control built: remora-control --objects serves a Service whose three endpoints are
#   three more namespaces ("pods"); one keep-alive client and one HTTP/2 client spread their
#   requests over all three, an endpoint removed from the file stops getting requests, and the
#   control plane stopped leaves traffic flowing. Then a canary: an HTTPRoute on that Service sends
#   `x-canary: 1` to a second version, echo-v2, and splits the rest 90/10; the observed split is
#   printed, and checked.
# With the identity parts built: remora-control also signs workload certificates (the demo CA,
#   a static token file standing in for TokenReview), a second meshed pod, secure-0
#   (inbound-mtls: strict, allow-from the demo pod), gets requests over mTLS: the veth to it is
#   captured and shows only TLS records, its proxy counts the client's identity, and a plaintext
#   client is refused while the pod's own probe still answers.
# Only 198.18.0.0/15 and 2001:2::/48 are used, inside namespaces this script creates and deletes.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "make demo needs root (network namespaces, iptables inside them). Run: sudo make demo" >&2
  exit 1
fi

cd "$(dirname "$0")/.."
root=$PWD
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what is missing, building"
scripts/install-deps.sh demo
make --no-print-directory build
# Where cargo put them (CARGO_TARGET_DIR or build.target-dir, if set).
bin=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug

id=$$
pod=rmdemo$id-pod
remote=rmdemo$id-remote
api=rmdemo$id-api
endpoints=(rmdemo$id-ep1 rmdemo$id-ep2 rmdemo$id-ep3)
canary=rmdemo$id-v2
secure=rmdemo$id-secure
work=$(mktemp -d /tmp/remora-demo.XXXXXX)
POD_V4=198.18.10.1 REMOTE_V4=198.18.10.2 POD_V6=2001:2:0:10::1 REMOTE_V6=2001:2:0:10::2
# The Service: a ClusterIP no host has, and its endpoints' network behind the remote host.
CLUSTER_IP=198.18.20.10 ENDPOINTS_NET=198.18.11 CONTROL_NAME=remora-control.remora-system.svc
# The canary's Service echo-v2 and its one pod, on the same network as echo's.
CANARY_CLUSTER_IP=198.18.20.11 CANARY_N=4
# The mTLS part's Service secure and its one meshed pod secure-0 (strict), on the same network.
SECURE_CLUSTER_IP=198.18.20.12 SECURE_N=5

# The Service part needs remora-control, and an injector and a proxy that know about it.
service=0
injector_help=$("$bin/remora-injector" serve --help 2>/dev/null || true)
proxy_help=$("$bin/remora-proxy" --help 2>/dev/null || true)
if [ -x "$bin/remora-control" ] && grep -q -- '--control-addr' <<<"$injector_help" &&
  grep -q -- '--control ' <<<"$proxy_help"; then
  service=1
else
  echo "note: remora-control, or --control in the injector or the proxy, is not built: the Service part is skipped" >&2
fi

# mTLS between two meshed pods needs the identity parts: the control plane's CA and token file,
# the proxy's certificate and its inbound mTLS.
mtls=0
control_help=$("$bin/remora-control" serve --help 2>/dev/null || true)
if [ "$service" = 1 ] && grep -q -- '--identity-tokens' <<<"$control_help" &&
  grep -q -- '--inbound-mtls' <<<"$proxy_help"; then
  mtls=1
elif [ "$service" = 1 ]; then
  echo "note: the identity flags are not built into remora-control or remora-proxy: the mTLS part is skipped" >&2
fi

cleanup() {
  local status=${1:-$?}
  trap - EXIT INT TERM
  disown -a # the namespaces' processes are killed below: no "Killed" notice for each
  for ns in "$pod" "$remote" "$api" "${endpoints[@]}" "$canary" "$secure"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
  echo "cleaned up: namespaces $pod, $remote, $api, ${endpoints[*]}, $canary, $secure and $work removed"
  exit "$status"
}
trap cleanup EXIT
trap 'cleanup 130' INT
trap 'cleanup 143' TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

# Waits for a TCP listener: wait_port NS HOST PORT
wait_port() {
  for _ in $(seq 1 100); do
    if in_ns "$1" bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on $2:$3 in $1" >&2
  return 1
}

say "the API server's side: remora-injector serve with a throwaway certificate"
ip netns add "$api"
in_ns "$api" ip link set lo up
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -keyout "$work/tls.key" -out "$work/tls.crt" \
  -subj "/CN=remora-injector.remora-system.svc" \
  -addext "subjectAltName=DNS:remora-injector.remora-system.svc,IP:127.0.0.1" 2>/dev/null
control_flags=()
if [ "$service" = 1 ]; then
  # A throwaway CA and remora-control's serving certificate from it: the injector hands the CA
  # to the proxy (REMORA_TRUST_ANCHORS), which checks the control plane's name against it.
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -keyout "$work/control-ca.key" -out "$work/control-ca.crt" -subj "/CN=remora demo CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$work/control.key" -out "$work/control.csr" -subj "/CN=$CONTROL_NAME" 2>/dev/null
  printf 'subjectAltName=DNS:%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' \
    "$CONTROL_NAME" >"$work/control.ext"
  openssl x509 -req -in "$work/control.csr" -CA "$work/control-ca.crt" -CAkey "$work/control-ca.key" \
    -CAcreateserial -days 1 -extfile "$work/control.ext" -out "$work/control.crt" 2>/dev/null
  # In a cluster: remora-control.remora-system.svc:8090. Here: the remote host.
  control_flags=(--control-addr "$REMOTE_V4:8090" --trust-anchors "$work/control-ca.crt")
fi
in_ns "$api" "$bin/remora-injector" serve --listen 127.0.0.1:8443 \
  --tls-cert "$work/tls.crt" --tls-key "$work/tls.key" --log-format plain "${control_flags[@]}" \
  2>"$work/injector.log" &
disown
wait_port "$api" 127.0.0.1 8443

# inject POD_JSON NAME: the pod through the webhook, as the API server sends it; the patch it
# answers, applied with kubectl patch --local, lands in $work/NAME.patched.json.
inject() {
  local pod_json=$1 name=$2
  python3 - "$pod_json" >"$work/$name.review.json" <<'PY'
import json, sys
pod = json.load(open(sys.argv[1]))
print(json.dumps({
    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
    "request": {
        "uid": "0d3e6f1c-demo-0000-0000-000000000001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": pod["metadata"]["namespace"], "operation": "CREATE",
        "userInfo": {"username": "demo"}, "object": pod, "dryRun": False,
    },
}))
PY
  echo "POST https://127.0.0.1:8443/inject  (pod $name from ${pod_json#"$root/"})"
  in_ns "$api" curl -sS --max-time 5 --cacert "$work/tls.crt" -H 'Content-Type: application/json' \
    --data-binary @"$work/$name.review.json" https://127.0.0.1:8443/inject >"$work/$name.response.json"
  python3 - "$work/$name.response.json" >"$work/$name.patch.json" <<'PY'
import base64, json, sys
response = json.load(open(sys.argv[1]))["response"]
if not response.get("allowed") or "patch" not in response:
    sys.exit(f"the injector did not inject: {json.dumps(response)}")
for warning in response.get("warnings", []):
    print(f"warning: {warning}", file=sys.stderr)
print(base64.b64decode(response["patch"]).decode())
PY
  echo "the injector answered allowed with a $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$work/$name.patch.json")-operation JSON patch"
  kubectl patch --local --type=json -f "$pod_json" --patch-file "$work/$name.patch.json" -o json \
    >"$work/$name.patched.json"
}
args_of() { # args_of NAME CONTAINER: the container's args in the patched pod NAME, one per line
  python3 - "$work/$1.patched.json" "$2" <<'PY'
import json, sys
pod = json.load(open(sys.argv[1]))
for c in pod["spec"].get("initContainers", []):
    if c["name"] == sys.argv[2]:
        print("\n".join(c.get("args", [])))
        break
else:
    sys.exit(f"no init container {sys.argv[2]} in the patched pod")
PY
}
env_of() { # env_of NAME: the proxy's literal env values (REMORA_TRUST_ANCHORS), NUL-separated
  python3 - "$work/$1.patched.json" <<'PY'
import json, sys
pod = json.load(open(sys.argv[1]))
c = next(c for c in pod["spec"]["initContainers"] if c["name"] == "remora-proxy")
for var in c.get("env", []):
    if "value" in var:
        sys.stdout.write(f"{var['name']}={var['value']}\0")
PY
}
identity_of() { # identity_of NAME: the identity the injector wrote into remora.io/status
  python3 -c 'import json, sys
pod = json.load(open(sys.argv[1]))
print(json.loads(pod["metadata"]["annotations"]["remora.io/status"]).get("identity", ""))' "$work/$1.patched.json"
}
inject "$root/scripts/demo/pod.json" demo-app
mapfile -t init_args < <(args_of demo-app remora-init)
mapfile -t proxy_args < <(args_of demo-app remora-proxy)
# The proxy's literal env values (REMORA_TRUST_ANCHORS); POD_* come from the downward API, below.
mapfile -d '' -t proxy_env < <(env_of demo-app)
proxy_uid=$(python3 -c '
import json, sys
pod = json.load(open(sys.argv[1]))
c = next(c for c in pod["spec"]["initContainers"] if c["name"] == "remora-proxy")
print(c["securityContext"]["runAsUser"])' "$work/demo-app.patched.json")
echo "patched pod: initContainers = $(python3 -c 'import json,sys; print([c["name"] for c in json.load(open(sys.argv[1]))["spec"]["initContainers"]])' "$work/demo-app.patched.json")"
echo "  remora-init  ${init_args[*]}"
echo "  remora-proxy ${proxy_args[*]}   (as uid $proxy_uid)"
for var in "${proxy_env[@]}"; do echo "    env ${var%%=*} ($(printf '%s' "${var#*=}" | wc -c) bytes)"; done

say "the pod: network namespaces $pod and $remote joined by a veth pair"
ip netns add "$pod"
ip netns add "$remote"
ip -n "$pod" link add eth0 type veth peer name eth0 netns "$remote"
for spec in "$pod $POD_V4 $POD_V6" "$remote $REMOTE_V4 $REMOTE_V6"; do
  set -- $spec
  ip -n "$1" link set lo up
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" addr add "$3/64" dev eth0 nodad
  ip -n "$1" link set eth0 up
done
echo "pod $POD_V4 $POD_V6    remote $REMOTE_V4 $REMOTE_V6"

if [ "$service" = 1 ]; then
  say "three more pods, ${endpoints[*]}: the endpoints of a Service, behind the remote host"
  # The remote host routes between the pod's network and theirs, as a node and its CNI would.
  in_ns "$remote" sysctl -qw net.ipv4.ip_forward=1
  ip -n "$remote" link add br0 type bridge
  ip -n "$remote" addr add "$ENDPOINTS_NET.254/24" dev br0
  ip -n "$remote" link set br0 up
  # add_echo_pod NS N NAME: the pod NAME, namespace NS at $ENDPOINTS_NET.N on the bridge, where
  # remora-echo answers every request, HTTP/1.1 or HTTP/2, with NAME.
  add_echo_pod() {
    local ns=$1 n=$2 name=$3
    ip netns add "$ns"
    ip -n "$remote" link add "ep$n" type veth peer name eth0 netns "$ns"
    ip -n "$remote" link set "ep$n" master br0 up
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$ENDPOINTS_NET.$n/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" route add default via "$ENDPOINTS_NET.254"
    in_ns "$ns" "$bin/remora-echo" "$ENDPOINTS_NET.$n:8080" "$name" >/dev/null 2>&1 &
    disown
    echo "pod $name: $ENDPOINTS_NET.$n:8080 in namespace $ns"
  }
  for n in 1 2 3; do add_echo_pod "${endpoints[$((n - 1))]}" "$n" "echo-$n"; done
  # Like any pod, ours has a default route (the ClusterIP is reached only through it).
  ip -n "$pod" route add default via "$REMOTE_V4"
  for n in 1 2 3; do wait_port "$remote" "$ENDPOINTS_NET.$n" 8080; done

  objects() { # objects ENDPOINT_NUMBER...: the Service and its EndpointSlice, as the API stores them
    cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: $CLUSTER_IP
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-6xq2m
  namespace: demo
  labels: {kubernetes.io/service-name: echo}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
EOF
    for n in "$@"; do
      echo "- {addresses: [\"$ENDPOINTS_NET.$n\"], conditions: {ready: true}, targetRef: {kind: Pod, namespace: demo, name: echo-$n}}"
    done
  }
  # Written whole and renamed into place, as a ConfigMap volume changes.
  write_objects() { objects "$@" >"$work/echo.yaml.new" && mv "$work/echo.yaml.new" "$work/objects/echo.yaml"; }
  mkdir -p "$work/objects"
  write_objects 1 2 3

  say "remora-control serve --objects (on the remote host, TLS with the demo CA's certificate)"
  identity_flags=()
  if [ "$mtls" = 1 ]; then
    # The demo CA signs the workload certificates too, so the proxies' REMORA_TRUST_ANCHORS
    # verifies both the control plane and their peers. Without a cluster there is no
    # TokenReview: a static token file (kube-apiserver's format) says whose each token is. In a
    # pod the kubelet mounts the projected token at /var/run/secrets/remora.io/identity/token;
    # here each proxy is given a file of its own (readable by the proxy uid).
    chmod 711 "$work"
    mkdir -m 755 "$work/tokens"
    printf '%s\n' "demo-app-token,system:serviceaccount:demo:default,uid-demo-app" \
      "secure-0-token,system:serviceaccount:demo:secure,uid-secure-0" >"$work/identity-tokens.csv"
    for name in demo-app secure-0; do
      echo "$name-token" >"$work/tokens/$name" && chmod 644 "$work/tokens/$name"
    done
    identity_flags=(--ca-cert "$work/control-ca.crt" --ca-key "$work/control-ca.key"
      --identity-tokens "$work/identity-tokens.csv")
  fi
  start_control() {
    # ip netns exec, not in_ns: a function run in the background is a shell of its own, and
    # $! would be that shell, not remora-control.
    ip netns exec "$remote" "$bin/remora-control" serve --listen "$REMOTE_V4:8090" --admin-listen "$REMOTE_V4:9990" \
      --tls-cert "$work/control.crt" --tls-key "$work/control.key" --objects "$work/objects" \
      "${identity_flags[@]}" --log-format plain 2>>"$work/control.log" &
    control_pid=$!
    wait_port "$remote" "$REMOTE_V4" 9990
    echo "remora-control (pid $control_pid) /ready: $(in_ns "$remote" curl -sS --max-time 2 "http://$REMOTE_V4:9990/ready")"
  }
  start_control
  echo "Service demo/echo: ClusterIP $CLUSTER_IP port 80 -> endpoints $ENDPOINTS_NET.{1,2,3}:8080 ($work/objects/echo.yaml)"
fi

say "remora-init (as root, like the init container)"
in_ns "$pod" "$bin/remora-init" "${init_args[@]}"

if [ "$mtls" = 1 ]; then proxy_args+=(--identity-token "$work/tokens/demo-app"); fi
say "remora-proxy (uid $proxy_uid, like the native sidecar)"
ip netns exec "$pod" env POD_NAME=demo-app POD_NAMESPACE=demo POD_IP=$POD_V4 "${proxy_env[@]}" \
  setpriv --reuid="$proxy_uid" --regid="$proxy_uid" --clear-groups \
  "$bin/remora-proxy" "${proxy_args[@]}" 2>"$work/proxy.log" &
proxy_pid=$! # ip netns exec and setpriv exec in place: this is remora-proxy itself
wait_port "$pod" 127.0.0.1 15020
echo "/ready: $(in_ns "$pod" curl -sS --max-time 2 http://127.0.0.1:15020/ready)"

say "the app in the pod and a server on the remote host"
mkdir -p "$work/app" "$work/remote"
echo "hello from the app in the pod" >"$work/app/index.html"
echo "hello from the remote host" >"$work/remote/index.html"
(cd "$work/app" && exec ip netns exec "$pod" python3 -m http.server 8080 --bind "$POD_V4" >/dev/null 2>&1) &
disown
(cd "$work/remote" && exec ip netns exec "$remote" python3 -m http.server 80 --bind :: >/dev/null 2>&1) &
disown
(cd "$work/remote" && exec ip netns exec "$remote" python3 -m http.server 9999 --bind "$REMOTE_V4" >/dev/null 2>&1) &
disown
wait_port "$pod" "$POD_V4" 8080
wait_port "$remote" "$REMOTE_V4" 80
wait_port "$remote" "$REMOTE_V4" 9999

say "traffic"
show() { printf '%-58s -> %s\n' "$1" "$2"; }
show "pod -> http://$REMOTE_V4/ (outbound, IPv4)" \
  "$(in_ns "$pod" curl -sS --max-time 5 "http://$REMOTE_V4/")"
show "pod -> http://[$REMOTE_V6]/ (outbound, IPv6)" \
  "$(in_ns "$pod" curl -sS --max-time 5 "http://[$REMOTE_V6]/")"
show "pod -> http://$REMOTE_V4:9999/ (excluded port: direct)" \
  "$(in_ns "$pod" curl -sS --max-time 5 "http://$REMOTE_V4:9999/")"
show "pod -> http://$REMOTE_V4:81/ (nobody listens)" \
  "$(in_ns "$pod" curl -sS --max-time 5 -o /dev/null -w 'HTTP %{http_code}' "http://$REMOTE_V4:81/")"
for i in 1 2 3; do
  show "remote -> http://$POD_V4:8080/ (inbound #$i)" \
    "$(in_ns "$remote" curl -sS --max-time 5 "http://$POD_V4:8080/")"
done

metric() { # metric SERIES: its value on the proxy's /metrics (0 when absent)
  in_ns "$pod" curl -sS --max-time 2 http://127.0.0.1:15020/metrics |
    awk -v series="$1" '$1 == series { value = $2 } END { print value + 0 }'
}

if [ "$service" = 1 ]; then
  outbound='remora_proxy_tcp_connections_total{direction="outbound",tls="false",client_id=""}'
  # spread COMMAND...: one client run in the pod, its answers counted per endpoint, and the
  # client connections it made.
  spread() {
    local before after
    before=$(metric "$outbound")
    in_ns "$pod" timeout 20 "$@" | sort | uniq -c | awk '{ printf "  %-8s %3d requests\n", $2, $1 }'
    after=$(metric "$outbound")
    echo "  client connections the proxy accepted: $((after - before))"
  }

  urls() { for i in $(seq "$2"); do echo "http://$CLUSTER_IP/$1/$i"; done; }

  say "one keep-alive HTTP/1.1 client: curl, 30 requests on one connection to http://$CLUSTER_IP/"
  spread curl -sS "http://$CLUSTER_IP/keep-alive/[1-30]"

  # nghttp, not curl: curl 7.88 (Debian 12) cannot reuse a prior-knowledge connection (curl#10634).
  say "one HTTP/2 client: nghttp (h2c prior knowledge), 30 requests multiplexed on one connection"
  spread nghttp $(urls h2 30)

  say "echo-3 removed from the EndpointSlice file"
  write_objects 1 2
  sleep 1.5
  echo "the proxy now knows $(metric 'remora_proxy_balancer_endpoints{namespace="demo",service="echo",port="80"}') ready endpoints"
  spread curl -sS "http://$CLUSTER_IP/after-removal/[1-30]"

  # The canary: a second version of echo, echo-v2, with a Service of its own, and an HTTPRoute on
  # echo that gives it the requests marked x-canary: 1 and a tenth of the rest.
  canary_objects() {
    cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: demo}
spec:
  clusterIP: $CANARY_CLUSTER_IP
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v2-r8k4t
  namespace: demo
  labels: {kubernetes.io/service-name: echo-v2}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["$ENDPOINTS_NET.$CANARY_N"], conditions: {ready: true}, targetRef: {kind: Pod, namespace: demo, name: echo-v2}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-canary, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs:
    - {name: echo, port: 80, weight: 90}
    - {name: echo-v2, port: 80, weight: 10}
EOF
  }
  # answered_by CURL_ARGS...: the pod that answers one request to echo (empty when none does).
  answered_by() { in_ns "$pod" curl -sS --max-time 2 "$@" "http://$CLUSTER_IP/probe" 2>/dev/null || true; }
  # wait_for_answer PATTERN CURL_ARGS...: one request every 0.1 s, for at most 5 s, until one is
  # answered by a pod whose name matches PATTERN; prints how long it took.
  wait_for_answer() {
    local pattern=$1 start=$EPOCHREALTIME
    shift
    for _ in $(seq 1 50); do
      if [[ $(answered_by "$@") =~ ^$pattern$ ]]; then
        awk -v start="$start" -v now="$EPOCHREALTIME" 'BEGIN { printf "%.2f s", now - start }'
        return 0
      fi
      sleep 0.1
    done
    return 1
  }
  # tally COUNT CURL_ARGS...: COUNT requests to echo on one keep-alive connection; prints how
  # many echo (v1: echo-1, echo-2) and echo-v2 answered, and how many got something else.
  tally() {
    local count=$1
    shift
    in_ns "$pod" timeout 20 curl -sS "$@" "http://$CLUSTER_IP/canary/[1-$count]" |
      awk '$1 == "echo-v2" { v2++; next } $1 ~ /^echo-[0-9]+$/ { v1++; next } { other++ }
        END { print v1 + 0, v2 + 0, other + 0 }'
  }
  percent() { awk -v part="$1" -v whole="$2" 'BEGIN { printf "%.1f%%", 100 * part / whole }'; }

  say "a canary: Service echo-v2, and an HTTPRoute on echo that sends it x-canary: 1 and 10%"
  add_echo_pod "$canary" "$CANARY_N" echo-v2
  wait_port "$remote" "$ENDPOINTS_NET.$CANARY_N" 8080
  canary_objects >"$work/canary.yaml.new" && mv "$work/canary.yaml.new" "$work/objects/canary.yaml"
  echo "Service demo/echo-v2: ClusterIP $CANARY_CLUSTER_IP port 80 -> endpoint $ENDPOINTS_NET.$CANARY_N:8080"
  echo "HTTPRoute demo/echo-canary, parentRefs Service echo port 80 ($work/objects/canary.yaml):"
  echo "  header x-canary: 1  -> echo-v2"
  echo "  everything else     -> echo (weight 90), echo-v2 (weight 10)"
  if ! took=$(wait_for_answer echo-v2 -H 'x-canary: 1'); then
    echo "FAIL: the route did not take effect within 5 s (no x-canary: 1 request reached echo-v2)" >&2
    exit 1
  fi
  echo "in effect $took after the file was written (an x-canary: 1 request answered by echo-v2)"

  read -r v1 v2 other < <(tally 200)
  echo "200 requests without x-canary (one keep-alive connection):"
  echo "  v1 (echo: echo-1, echo-2) $(printf '%3d' "$v1") ($(percent "$v1" 200))"
  echo "  v2 (echo-v2)              $(printf '%3d' "$v2") ($(percent "$v2" 200))"
  read -r canary_v1 canary_v2 canary_other < <(tally 20 -H 'x-canary: 1')
  echo "20 requests with x-canary: 1: v2 $canary_v2, v1 $canary_v1"
  # 90% of 200 gives 180 ± 4 (one standard deviation): 160-196 is far outside chance.
  problems=()
  ((other == 0)) || problems+=("$other of the 200 requests were not answered by echo or echo-v2")
  ((v1 >= 160 && v1 <= 196)) || problems+=("v1 took $(percent "$v1" 200) of the split, not 80-98%")
  ((canary_v1 == 0)) || problems+=("$canary_v1 x-canary: 1 requests reached v1")
  ((canary_v2 == 20)) || problems+=("only $canary_v2 of the 20 x-canary: 1 requests reached v2")
  if ((${#problems[@]} > 0)); then
    printf 'FAIL: %s\n' "${problems[@]}" >&2
    exit 1
  fi
  echo "as the route says: about 90/10, and every x-canary: 1 request on v2"

  say "the canary removed (its file deleted): echo's requests go to echo alone again"
  rm "$work/objects/canary.yaml"
  if ! took=$(wait_for_answer 'echo-[0-9]+' -H 'x-canary: 1'); then
    echo "FAIL: the route was still in effect 5 s after its file was deleted" >&2
    exit 1
  fi
  echo "route gone $took after the file was deleted (an x-canary: 1 request answered by echo)"

  if [ "$mtls" = 1 ]; then
    say "mTLS: a second meshed pod, secure-0 (ServiceAccount secure, remora.io/inbound-mtls: strict)"
    inject "$root/scripts/demo/secure-pod.json" secure-0
    mapfile -t secure_init_args < <(args_of secure-0 remora-init)
    mapfile -t secure_proxy_args < <(args_of secure-0 remora-proxy)
    mapfile -d '' -t secure_env < <(env_of secure-0)
    echo "  remora-proxy ${secure_proxy_args[*]}"
    echo "  identities in remora.io/status: demo-app $(identity_of demo-app), secure-0 $(identity_of secure-0)"
    add_echo_pod "$secure" "$SECURE_N" secure-0
    in_ns "$secure" "$bin/remora-init" "${secure_init_args[@]}" >/dev/null
    ip netns exec "$secure" env POD_NAME=secure-0 POD_NAMESPACE=demo POD_IP="$ENDPOINTS_NET.$SECURE_N" \
      "${secure_env[@]}" setpriv --reuid="$proxy_uid" --regid="$proxy_uid" --clear-groups \
      "$bin/remora-proxy" "${secure_proxy_args[@]}" --identity-token "$work/tokens/secure-0" \
      2>"$work/secure-proxy.log" &
    disown
    # The Service, and the pod as the API stores it: its remora.io/status names its identity,
    # which remora-control hands to the clients of its endpoints.
    cat >"$work/secure.yaml.new" <<YAML
apiVersion: v1
kind: Service
metadata: {name: secure, namespace: demo}
spec:
  clusterIP: $SECURE_CLUSTER_IP
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: secure-k2v9d
  namespace: demo
  labels: {kubernetes.io/service-name: secure}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- {addresses: ["$ENDPOINTS_NET.$SECURE_N"], conditions: {ready: true}, targetRef: {kind: Pod, namespace: demo, name: secure-0}}
---
$(python3 -c 'import json, sys
pod = json.load(open(sys.argv[1]))
print(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": pod["metadata"],
    "spec": {"serviceAccountName": pod["spec"]["serviceAccountName"], "containers": pod["spec"]["containers"]},
    "status": {"podIP": sys.argv[2], "podIPs": [{"ip": sys.argv[2]}]}}))' "$work/secure-0.patched.json" "$ENDPOINTS_NET.$SECURE_N")
YAML
    mv "$work/secure.yaml.new" "$work/objects/secure.yaml"
    secure_metrics() { in_ns "$remote" curl -sS --max-time 2 "http://$ENDPOINTS_NET.$SECURE_N:15020/metrics"; }
    expiry() { awk '$1 == "remora_proxy_identity_expiration_timestamp_seconds" { print $2 + 0 }'; }
    for _ in $(seq 1 50); do
      [ "$(secure_metrics 2>/dev/null | expiry)" ] && [ "$(secure_metrics | expiry)" != 0 ] && break
      sleep 0.1
    done
    for who in demo-app secure-0; do
      if [ "$who" = demo-app ]; then seconds=$(metric remora_proxy_identity_expiration_timestamp_seconds)
      else seconds=$(secure_metrics | expiry); fi
      if [ "${seconds:-0}" = 0 ]; then
        echo "FAIL: $who's proxy has no workload certificate" >&2
        sed 's/^/  /' "$work/control.log" >&2
        exit 1
      fi
      echo "$who's proxy holds a certificate until $(date -u -d "@${seconds%.*}" '+%F %T') UTC"
    done

    say "demo-app -> http://$SECURE_CLUSTER_IP/ (Service secure), the veth to secure-0 captured"
    # ip netns exec, not in_ns: $! must be tcpdump itself, to stop it with SIGINT below.
    ip netns exec "$remote" tcpdump -i "ep$SECURE_N" --immediate-mode -U -Z root -n -s 0 -w "$work/mtls.pcap" tcp port 8080 2>"$work/tcpdump.log" &
    tcpdump_pid=$!
    for _ in $(seq 1 50); do grep -q 'listening on' "$work/tcpdump.log" && break; sleep 0.1; done
    wait_for_answer_at() { # the first answer from URL within 5 s
      for _ in $(seq 1 50); do
        if answer=$(in_ns "$pod" curl -sSf --max-time 2 -H 'x-secret: sardine-7f3a' "$1" 2>/dev/null); then
          echo "$answer"; return 0
        fi
        sleep 0.1
      done
      return 1
    }
    show "demo-app -> http://$SECURE_CLUSTER_IP/secret-path" "$(wait_for_answer_at "http://$SECURE_CLUSTER_IP/secret-path" || echo 'no answer')"
    sleep 0.3
    kill -INT "$tcpdump_pid"; wait "$tcpdump_pid" 2>/dev/null || true
    # What crossed the wire: each data segment's first bytes, and whether a byte of the request
    # (its path, its x-secret header) or of the answer (secure-0) is there in clear.
    python3 - "$work/mtls.pcap" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
linktype = struct.unpack("<I", data[20:24])[0]
pos, segments, payloads = 24, 0, b""
kinds = {20: "ChangeCipherSpec", 21: "Alert", 22: "Handshake", 23: "ApplicationData"}
while pos + 16 <= len(data):
    incl = struct.unpack("<I", data[pos + 8:pos + 12])[0]
    frame = data[pos + 16:pos + 16 + incl]
    pos += 16 + incl
    ip = frame[14:] if linktype == 1 else frame[16:]
    if not ip or ip[0] >> 4 != 4:
        continue
    ihl = (ip[0] & 15) * 4
    tcp = ip[ihl:]
    payload = tcp[(tcp[12] >> 4) * 4:]
    if not payload:
        continue
    segments += 1
    payloads += payload
    sport, dport = struct.unpack(">HH", tcp[:4])
    kind = kinds.get(payload[0], "not TLS") if len(payload) >= 5 and payload[1] == 3 else "not TLS"
    if segments <= 6:
        print(f"  {sport:>5} -> {dport:<5} {len(payload):>5} bytes  {payload[:5].hex(' ')}  TLS record: {kind}")
clear = [mark for mark in (b"secret-path", b"sardine-7f3a", b"secure-0") if mark in payloads]
print(f"  {segments} data segments captured; application bytes in clear: {', '.join(m.decode() for m in clear) or 'none'}")
sys.exit(1 if clear or segments == 0 else 0)
PY
    echo "secure-0's proxy counts the request with its client's identity:"
    secure_metrics | grep -E '^remora_proxy_(requests_total|tcp_connections_total)\{direction="inbound"' | grep 'client_id="spiffe' | sed 's/^/  /'

    say "a plaintext client (the remote host, not meshed) -> secure-0, which is strict"
    plain=$(in_ns "$remote" curl -sS --max-time 3 -w ' [HTTP %{http_code}]' "http://$ENDPOINTS_NET.$SECURE_N:8080/" 2>&1 | tr -d '\n' || true)
    show "remote -> http://$ENDPOINTS_NET.$SECURE_N:8080/ (plaintext)" "${plain:-refused}"
    probe=$(in_ns "$remote" curl -sS --max-time 3 -o /dev/null -w 'HTTP %{http_code}' "http://$ENDPOINTS_NET.$SECURE_N:8080/healthz" 2>&1 || true)
    show "remote -> http://$ENDPOINTS_NET.$SECURE_N:8080/healthz (its kubelet probe)" "$probe"
    if [[ $plain == *"HTTP 200"* ]] || [[ $probe != "HTTP 200" ]]; then
      echo "FAIL: a strict pod must refuse plaintext but answer its own probe" >&2
      exit 1
    fi
  fi

  say "the control plane stopped (SIGKILL): the proxy keeps its last snapshot"
  kill -KILL "$control_pid"
  wait "$control_pid" 2>/dev/null || true
  sleep 0.5
  echo "remora_proxy_control_connected: $(metric remora_proxy_control_connected)"
  spread curl -sS "http://$CLUSTER_IP/control-down/[1-20]"
  spread nghttp $(urls control-down-h2 20)
fi

say "what remora-proxy saw (its /metrics)"
in_ns "$pod" curl -sS --max-time 2 http://127.0.0.1:15020/metrics |
  grep -E '^remora_proxy_(requests_total|route_requests_total|tcp_connections_total|tcp_bytes_total|connect_errors_total|balancer_endpoints|control_connected)' |
  grep -v ' 0$'

say "SIGTERM to remora-proxy (what the kubelet sends when the pod stops)"
kill -TERM "$proxy_pid"
echo "/ready right after: $(in_ns "$pod" curl -s --max-time 2 http://127.0.0.1:15020/ready || echo '(admin closed)')"
status=0
wait "$proxy_pid" || status=$?
echo "remora-proxy exited with status $status; its log:"
sed 's/^/  /' "$work/proxy.log"
say "done"
