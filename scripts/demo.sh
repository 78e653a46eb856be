#!/usr/bin/env bash
# make demo: the whole remora chain on one machine, no cluster.
#   injector (HTTPS, throwaway certificate) -> AdmissionReview for scripts/demo/pod.json
#   -> JSON patch applied with `kubectl patch --local` -> remora-init and remora-proxy run with
#   exactly the args the patched pod carries, in a pod built from network namespaces
#   -> traffic both ways -> what the proxy saw, from its /metrics.
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
cargo build --workspace --bins
bin=$root/target/debug

id=$$
pod=rmdemo$id-pod
remote=rmdemo$id-remote
api=rmdemo$id-api
work=$(mktemp -d /tmp/remora-demo.XXXXXX)
POD_V4=198.18.10.1 REMOTE_V4=198.18.10.2 POD_V6=2001:2:0:10::1 REMOTE_V6=2001:2:0:10::2

cleanup() {
  local status=${1:-$?}
  trap - EXIT INT TERM
  for ns in "$pod" "$remote" "$api"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  rm -rf "$work"
  echo "cleaned up: namespaces $pod, $remote, $api and $work removed"
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
in_ns "$api" "$bin/remora-injector" serve --listen 127.0.0.1:8443 \
  --tls-cert "$work/tls.crt" --tls-key "$work/tls.key" --log-format plain 2>"$work/injector.log" &
disown
wait_port "$api" 127.0.0.1 8443

python3 - "$root/scripts/demo/pod.json" >"$work/review.json" <<'PY'
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
echo "POST https://127.0.0.1:8443/inject  (pod ${POD_NAME:-demo-app} from scripts/demo/pod.json)"
in_ns "$api" curl -sS --max-time 5 --cacert "$work/tls.crt" -H 'Content-Type: application/json' \
  --data-binary @"$work/review.json" https://127.0.0.1:8443/inject >"$work/response.json"
python3 - "$work/response.json" >"$work/patch.json" <<'PY'
import base64, json, sys
response = json.load(open(sys.argv[1]))["response"]
if not response.get("allowed") or "patch" not in response:
    sys.exit(f"the injector did not inject: {json.dumps(response)}")
for warning in response.get("warnings", []):
    print(f"warning: {warning}", file=sys.stderr)
print(base64.b64decode(response["patch"]).decode())
PY
echo "the injector answered allowed with a $(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))))' "$work/patch.json")-operation JSON patch"

kubectl patch --local --type=json -f scripts/demo/pod.json --patch-file "$work/patch.json" -o json \
  >"$work/patched.json"
args_of() { # args_of CONTAINER: one arg per line
  python3 - "$work/patched.json" "$1" <<'PY'
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
mapfile -t init_args < <(args_of remora-init)
mapfile -t proxy_args < <(args_of remora-proxy)
proxy_uid=$(python3 -c '
import json, sys
pod = json.load(open(sys.argv[1]))
c = next(c for c in pod["spec"]["initContainers"] if c["name"] == "remora-proxy")
print(c["securityContext"]["runAsUser"])' "$work/patched.json")
echo "patched pod: initContainers = $(python3 -c 'import json,sys; print([c["name"] for c in json.load(open(sys.argv[1]))["spec"]["initContainers"]])' "$work/patched.json")"
echo "  remora-init  ${init_args[*]}"
echo "  remora-proxy ${proxy_args[*]}   (as uid $proxy_uid)"

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

say "remora-init (as root, like the init container)"
in_ns "$pod" "$bin/remora-init" "${init_args[@]}"

say "remora-proxy (uid $proxy_uid, like the native sidecar)"
ip netns exec "$pod" env POD_NAME=demo-app POD_NAMESPACE=demo POD_IP=$POD_V4 \
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

say "what remora-proxy saw (its /metrics)"
in_ns "$pod" curl -sS --max-time 2 http://127.0.0.1:15020/metrics |
  grep -E '^remora_proxy_(requests_total|tcp_connections_total|tcp_bytes_total|connect_errors_total)' |
  grep -v ' 0$'

say "SIGTERM to remora-proxy (what the kubelet sends when the pod stops)"
kill -TERM "$proxy_pid"
echo "/ready right after: $(in_ns "$pod" curl -s --max-time 2 http://127.0.0.1:15020/ready || echo '(admin closed)')"
status=0
wait "$proxy_pid" || status=$?
echo "remora-proxy exited with status $status; its log:"
sed 's/^/  /' "$work/proxy.log"
say "done"
