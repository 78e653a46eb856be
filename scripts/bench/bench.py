#!/usr/bin/env python3
"""`make bench`: remora-proxy against the direct path and HAProxy in the same seat, plus the
injector and remora-init, in throwaway network namespaces. Writes results/bench-<time>.{json,md}.

Knobs (environment):
  BENCH_ROUNDS=3       rounds; the seats run interleaved and in a rotated order in each round
  BENCH_SECONDS=10     length of each timed load
  BENCH_SEATS=direct,haproxy,remora   also haproxy-lb and remora-svc: a Service's ClusterIP balanced
                       over three endpoints (HAProxy leastconn; remora-proxy --control); haproxy-acl
                       and remora-route: the same behind 10 routing rules (HAProxy ACLs; an HTTPRoute)
                       remora-svc-off: the Service path with its resilience policy off
  BENCH_PARTS=proxy,injector,init     also rss: remora-proxy's RSS with 10,000 Services in
                       remora-control and traffic to 10 of them; retry: 30 % injected 503s
                       behind remora-proxy (retry-on 5xx) and HAProxy (retry-on 503, retries 2);
                       issuance: BENCH_ISSUE_PROXIES (1000) proxies asking remora-control for
                       certificates at once
  BENCH_SEATS also remora-pair, remora-mtls, haproxy-pair, haproxy-mtls: two proxies, client
                       pod to server pod, plaintext or mTLS between them (BENCH_REMORA_ARGS_pair)
  BENCH_LOADS=throughput,latency,newconn,h2   the proxy loads
  BENCH_REMORA_ARGS_X, BENCH_REMORA_BIN_X     flags / binary of a `remora@X` seat
  BENCH_LAYOUT=flat    or `pod`: client, proxy seat and nginx each in a CPU cgroup weighted like
                       a container with the CPU request in BENCH_POD_MILLICPU
  BENCH_POD_MILLICPU=client=1000,proxy=100,server=1000   (proxy: the injector's default request)
  BENCH_BIN_DIR=target/release
  BENCH_RESULTS=results
  BENCH_TRACE_SCRIPT=scripts/bench/latency.bt, BENCH_TRACE_RAW=1   trace mode: script, raw copies
Quick smoke run: BENCH_ROUNDS=1 BENCH_SECONDS=3 make bench
"""

import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
SEATS = [s for s in os.environ.get("BENCH_SEATS", "direct,haproxy,remora").split(",") if s]
PARTS = [p for p in os.environ.get("BENCH_PARTS", "proxy,injector,init").split(",") if p]
BIN_DIR = Path(os.environ.get("BENCH_BIN_DIR", ROOT / "target" / "release"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "results"))

# Only benchmarking-range addresses (RFC 2544 / RFC 5180), as in tests/src/lib.rs.
POD_V4, REMOTE_V4 = "198.18.0.1", "198.18.0.2"
POD_V6, REMOTE_V6 = "2001:2::1", "2001:2::2"
PROXY_UID = 1337
H1_PORT, H2_PORT = 80, 81
OUTBOUND_PORT, ADMIN_PORT = 15001, 15020
CLK_TCK = os.sysconf("SC_CLK_TCK")

SEAT_NAMES = {"direct": "direct", "haproxy": "HAProxy", "remora": "remora-proxy",
              "haproxy-lb": "HAProxy (Service)", "remora-svc": "remora-proxy (Service)",
              "haproxy-acl": "HAProxy (ACL)", "remora-route": "remora-proxy (route)",
              "remora-svc-off": "remora-proxy (Service, policy off)",
              "haproxy-retry": "HAProxy (retry-on 503)"}
# Seats of the `retry` part only: not for BENCH_SEATS.
PART_SEATS = ("haproxy-retry",)

# The Service seats: the client sends to a ClusterIP that no host has, and the seat balances
# each request over the Service's endpoints (nginx on three addresses of the remote namespace).
# HAProxy lists the endpoints statically (`balance leastconn`, its best case); remora-proxy
# learns them from remora-control (`--control`), which runs on the pod's loopback.
SERVICE_SEATS = ("haproxy-lb", "remora-svc", "haproxy-acl", "remora-route", "remora-svc-off")
CLUSTER_IP = "198.18.0.100"
# The route seats (issue 24): the same endpoints, ports and loads as the Service seats, behind
# 10 routing rules of which the loads' requests match only the last in precedence, which sets a
# request header. remora-proxy gets them as two HTTPRoutes (one per Service port) on a second
# Service with the same endpoints, so remora-control serves the routed and the plain Service at
# once and both seats run in one `make bench`, each measuring its own path; HAProxy gets the
# same rules as ACLs (haproxy-acl.cfg.in).
ROUTE_SEATS = ("haproxy-acl", "remora-route")
# The seats of remora-proxy with --control (remora-control runs for them).
CONTROL_SEATS = ("remora-svc", "remora-route", "remora-svc-off")
ROUTE_CLUSTER_IP = "198.18.0.101"
# The resilience seat (issue 25): remora-svc's path to a third Service with the same ports and
# endpoints whose annotations turn the policy off (`failure-accrual: off`, `queue: 0,0`; no
# `retry-on`, as by default): what the default policy costs remora-svc, in the same run.
POLICY_OFF_CLUSTER_IP = "198.18.0.102"
POLICY_OFF_SERVICE_NAME = "nginx-policy-off"
POLICY_OFF = {"remora.io/failure-accrual": "off", "remora.io/queue": "0,0"}
# Its client's source address: as POD_SERVICE_SRC_V4 keeps the Service seats' clients off the
# passthrough seats' TIME_WAIT sockets, this keeps remora-svc-off's off remora-svc's (the proxy
# accepts both on one address; with one source, the new-connection load through the second ran
# at 936 requests a second against 13,851).
POD_POLICY_OFF_SRC_V4 = "198.18.0.253"
# The route seats' client source address, for the same reason: from remora-svc's, their
# new-connection loads ran at 736 (remora-route) and 3,938 (haproxy-acl) requests a second
# against remora-svc's 17,001.
POD_ROUTE_SRC_V4 = "198.18.0.252"
# The `retry` part (issue 25): nginx fails 30 % of the requests to FLAKY_PORT with 503 (drawn
# per request, so each retry draws again) and logs each one; remora-proxy reaches it as the
# Service RETRY_SERVICE_NAME with `retry-on: 5xx` (default budget, 2 attempts), HAProxy with
# `retry-on 503` and `retries 2` (haproxy-retry.cfg.in). The client sends at a fixed rate.
FLAKY_PORT = 82
RETRY_CLUSTER_IP = "198.18.0.103"
RETRY_SERVICE_NAME = "nginx-flaky"
RETRY_RATE = 1000
ROUTE_SERVICE_NAME = "nginx-routed"
# The request header the last rule sets, and its value. nginx echoes it as `X-Seen` on one path
# only (ROUTE_CHECK_PATH, which the same rule matches), so the loads' responses stay the same
# bytes as through the Service seats.
ROUTE_MARK, ROUTE_MARK_VALUE = "x-route-mark", "bench"
ROUTE_CHECK_PATH = "/route-check"
# The HTTPRoute of each Service port: its name is the `route` label of the proxy's
# remora_proxy_route_requests_total.
ROUTE_NAMES = {H1_PORT: "bench-http", H2_PORT: "bench-h2"}
# The remote namespace's addresses nginx listens on when a Service seat or the rss part runs:
# the first three are the benchmarked Service's endpoints, all ten those of the rss part's
# Services. REMOTE_V4 is the first, so the passthrough seats reach the same server.
REAL_ENDPOINTS = [f"198.18.0.{i}" for i in range(2, 12)]
SERVICE_ENDPOINTS = REAL_ENDPOINTS[:3]
CONTROL_LISTEN, CONTROL_ADMIN = "127.0.0.1:8090", "127.0.0.1:9990"
# Who the proxy's pod is, as the downward API would tell it (env POD_NAMESPACE, POD_NAME).
POD_IDENTITY = {"POD_NAMESPACE": "bench-client", "POD_NAME": "bench-client-0"}
SERVICE_NS, SERVICE_NAME = "bench", "nginx"
# The pod's source address toward the ClusterIPs. The proxy's accepted sockets linger in
# TIME_WAIT for 60 s, keyed by the client's address and port; a new SYN that lands on one is
# accepted only if its TCP timestamp is newer (PAWS), and the kernel offsets a connection's
# timestamps by a hash of its source and destination. A client port last used toward REMOTE_V4
# (passthrough seats) and now toward a ClusterIP then had its SYN dropped about half the time:
# 1 s retransmits and a new-connection load at a tenth of its rate, depending on the seats'
# order. From an address of their own, the Service seats' clients never meet those sockets.
POD_SERVICE_SRC_V4 = "198.18.0.254"


def seat_label(seat):
    """`remora@w1` is remora-proxy with the flags in BENCH_REMORA_ARGS_w1: a variant to compare
    with the defaults in the same interleaved run."""
    base, _, variant = seat.partition("@")
    return SEAT_NAMES[base] + (f" ({variant})" if variant else "")


def seat_known(seat):
    base, _, variant = seat.partition("@")
    return base in SEAT_NAMES and base not in PART_SEATS \
        and (not variant or (base == "remora" and variant.isidentifier()))

KNOWN_PARTS = {"proxy", "injector", "init", "rss", "retry"}
KNOWN_LOADS = ["throughput", "latency", "newconn", "h2"]
LOADS = [x for x in os.environ.get("BENCH_LOADS", ",".join(KNOWN_LOADS)).split(",") if x]

PREFIX = f"rmb{os.getpid()}"
# The namespace nginx runs in (made by `make_pod`).
REMOTE_NS = f"{PREFIX}-remote"

LAYOUTS = ("flat", "pod")
LAYOUT = os.environ.get("BENCH_LAYOUT", "flat")
POD_ROLES = ("client", "proxy", "server")


def pod_millicpu():
    """BENCH_POD_MILLICPU as {role: millicores}; every role needs a positive figure."""
    text = os.environ.get("BENCH_POD_MILLICPU", "client=1000,proxy=100,server=1000")
    out = {}
    for item in text.split(","):
        role, _, value = item.partition("=")
        if role not in POD_ROLES or not value.isdigit() or int(value) < 1:
            sys.exit(f"BENCH_POD_MILLICPU: bad entry {item!r} (expected role=millicores, "
                     f"roles {', '.join(POD_ROLES)}, e.g. client=1000,proxy=100,server=1000)")
        out[role] = int(value)
    missing = [r for r in POD_ROLES if r not in out]
    if missing:
        sys.exit(f"BENCH_POD_MILLICPU: no figure for {', '.join(missing)}")
    return out


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Only a build with tracing's "log" feature holds this log target (tracing's span activity).
LOG_BRIDGE_MARK = b"tracing::span::active"
CHECKED_BUILDS = set()


def check_own_build(binary):
    """Stops on (or, for any binary but the one `make release` leaves in BIN_DIR, warns of) a
    remora-proxy built in one Cargo build with remora-injector: it then carries kube-client's
    `tracing/log`, and measures about 4% more instructions per HTTP/2 request than the proxy
    users get."""
    if binary in CHECKED_BUILDS:
        return
    CHECKED_BUILDS.add(binary)
    if LOG_BRIDGE_MARK not in Path(binary).read_bytes():
        return
    what = (f"{binary} was built together with remora-injector (it has tracing's \"log\" "
            "feature); `make release` builds remora-proxy on its own, as users get it")
    if Path(binary) == BIN_DIR / "remora-proxy":
        raise BenchError(what)
    log(f"warning: {what}")


class BenchError(Exception):
    pass


class RouteCheckError(BenchError):
    """A route seat that did not apply its rules, or not over the three endpoints: its figures
    would be another path's, so the run fails (after writing its results)."""


# ---------------------------------------------------------------------------------------------
# Things to clean up: every process we start and every namespace we make, also on Ctrl-C.


class Janitor:
    def __init__(self):
        self.procs = []
        self.namespaces = []

    def spawn(self, argv, log_path=None, **kw):
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, grace=5.0):
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def netns(self, name):
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        return name

    def delete_netns(self, name):
        # Kill whatever still runs inside first: a namespace with processes lingers.
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in out.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        if name in self.namespaces:
            self.namespaces.remove(name)

    def cleanup(self):
        for proc in list(self.procs):
            try:
                self.stop(proc, signal.SIGKILL, grace=2)
            except Exception:
                pass
        for name in list(self.namespaces):
            self.delete_netns(name)
        CGROUPS.cleanup()


class CpuGroups:
    """BENCH_LAYOUT=pod: the client, the proxy seat and nginx each run in their own CPU cgroup,
    weighted the way the kubelet weights a container by its CPU request (cgroup v1 cpu.shares =
    millicores * 1024 / 1000; v2 cpu.weight from those shares by the kubelet's formula). In a pod
    the proxy is alone in its container's cgroup, so it competes with the app as one light group,
    not as threads beside the app's: the flat layout (one cgroup for all) leaves that out."""

    def __init__(self):
        self.root, self.v2, self.dirs, self.millicpu = None, False, {}, {}

    def setup(self):
        if LAYOUT not in LAYOUTS:
            raise BenchError(f"BENCH_LAYOUT={LAYOUT!r}: expected {' or '.join(LAYOUTS)}")
        if LAYOUT != "pod" or self.dirs:
            return
        unified = Path("/sys/fs/cgroup/cgroup.controllers")
        if unified.exists():
            if "cpu" not in unified.read_text().split():
                raise BenchError("BENCH_LAYOUT=pod: the cgroup v2 root offers no cpu controller")
            self.root, self.v2 = Path("/sys/fs/cgroup"), True
            try:
                (self.root / "cgroup.subtree_control").write_text("+cpu")
            except OSError as e:
                raise BenchError(f"BENCH_LAYOUT=pod: enabling the cpu controller: {e}") from e
        elif Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
            self.root = Path("/sys/fs/cgroup/cpu")
        else:
            raise BenchError("BENCH_LAYOUT=pod needs a cpu cgroup controller (v2, or v1 mounted "
                             "on /sys/fs/cgroup/cpu)")
        self.millicpu = pod_millicpu()
        for role, millicpu in self.millicpu.items():
            shares = max(2, millicpu * 1024 // 1000)
            path = self.root / f"{PREFIX}-{role}"
            path.mkdir()
            self.dirs[role] = path
            if self.v2:
                (path / "cpu.weight").write_text(str(1 + (shares - 2) * 9999 // 262142))
            else:
                (path / "cpu.shares").write_text(str(shares))

    def describe(self):
        if LAYOUT != "pod":
            return "flat (every process in the bench's own cgroup)"
        knob = "cpu.weight" if self.v2 else "cpu.shares"
        weights = ", ".join(f"{role} {(path / knob).read_text().strip()}"
                            for role, path in self.dirs.items())
        return (f"pod (one CPU cgroup each, {knob}: {weights}; from "
                f"{', '.join(f'{r} {m}m' for r, m in self.millicpu.items())})")

    def wrap(self, role, argv):
        """`argv` started inside `role`'s cgroup; the pid stays the same (sh execs in place)."""
        path = self.dirs.get(role)
        argv = [str(a) for a in argv]
        if path is None:
            return argv
        return ["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec "$@"', "sh"] + argv

    def cleanup(self):
        for path in list(self.dirs.values()):
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    try:
                        (self.root / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
                path.rmdir()
            except OSError as e:
                log(f"could not remove cgroup {path}: {e}")
        self.dirs = {}


CGROUPS = CpuGroups()
JANITOR = Janitor()


def run(argv, timeout=60, check=True, **kw):
    try:
        if "input" not in kw:
            kw["stdin"] = subprocess.DEVNULL
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(map(str, argv))}: still running after {timeout}s") from e
    if check and out.returncode != 0:
        raise BenchError(f"{' '.join(map(str, argv))} failed ({out.returncode}): "
                         f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return out


def in_ns(ns, argv, uid=None):
    prefix = ["ip", "netns", "exec", ns]
    if uid is not None:
        prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return prefix + [str(a) for a in argv]


# ---------------------------------------------------------------------------------------------
# /proc readings of the process in the proxy's seat.


def proc_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


def proc_cpu_times(pid):
    """A process's (user, system) CPU time so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: the fields after its closing parenthesis are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid):
    return sum(proc_cpu_times(pid))


def proc_user_seconds(pid):
    return proc_cpu_times(pid)[0]


def host_ticks():
    """This VM's CPU time so far, from the first line of /proc/stat, in clock ticks: the time
    its CPUs were busy (every process and the kernel, the hypervisor's share left out), the time
    the hypervisor ran something else on them (steal), and all of it."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return {"busy": user + nice + system + irq + softirq, "steal": steal, "all": sum(fields)}


def host_share(before, after, requests):
    """What the whole VM spent while a load ran: the CPU seconds of every process on it per
    1000 requests (client, proxy, server and their kernel work), and the share of its CPU time
    the hypervisor took (steal: the VM's CPUs stood still though it had work)."""
    d = {k: after[k] - before[k] for k in before}
    out = {"steal_pct": 100 * d["steal"] / d["all"] if d["all"] else None}
    if requests:
        out["host_cpu_s_per_1k"] = d["busy"] / CLK_TCK / requests * 1000
    return out


def wait_until(limit, check, step=0.05):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(step)
    return check()


def listening(ns, port, addr="127.0.0.1"):
    out = run(in_ns(ns, ["ss", "-Hltn", f"sport = :{port}"]), check=False)
    return addr in out.stdout or (addr == "*" and out.stdout.strip() != "")


# ---------------------------------------------------------------------------------------------
# Parsers for the load generators' output.

UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk_duration(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"wrk printed a latency {text!r} that is not a number with a unit")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(out):
    res = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise BenchError(f"wrk printed no request count:\n{out}")
    res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = wrk_duration(m.group(1)) * 1e3 if m else None
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    res["errors"] = errors
    return res


def parse_oha(out):
    try:
        data = json.loads(out)
    except json.JSONDecodeError as e:
        raise BenchError(f"oha printed no JSON ({e}):\n{out[-2000:]}") from e
    summary = data["summary"]
    pct = data.get("latencyPercentiles", {})
    codes = data.get("statusCodeDistribution", {}) or {}
    ok = sum(n for code, n in codes.items() if str(code).startswith("2"))
    bad = sum(n for code, n in codes.items() if not str(code).startswith("2"))
    # Requests still in flight when -z runs out are cut off by design, not failures.
    errors = sum(n for kind, n in (data.get("errorDistribution") or {}).items()
                 if "deadline" not in kind)
    return {
        "requests": ok,
        "rps": summary.get("requestsPerSec"),
        "p50_ms": pct["p50"] * 1e3 if pct.get("p50") is not None else None,
        "p99_ms": pct["p99"] * 1e3 if pct.get("p99") is not None else None,
        "p999_ms": pct["p99.9"] * 1e3 if pct.get("p99.9") is not None else None,
        "errors": bad + errors,
        "error_kinds": sorted(k for k in (data.get("errorDistribution") or {})
                             if "deadline" not in k)[:3],
    }


def parse_h2load(out):
    m = re.search(r"finished in ([\d.]+)(\w+), ([\d.]+) req/s", out)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    s = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not (m and r and s):
        raise BenchError(f"h2load printed no summary:\n{out[-2000:]}")
    bad_status = int(s.group(3)) + int(s.group(4))
    return {"requests": int(s.group(1)), "rps": float(m.group(3)),
            "errors": int(r.group(5)) + int(r.group(6)) + int(r.group(7)) + bad_status}


# ---------------------------------------------------------------------------------------------
# The pod: two namespaces joined by a veth pair, the remote host runs nginx.


def wants_endpoints():
    """Whether this run needs the Service endpoints' addresses on the remote host."""
    seats = SEATS
    if os.environ.get("BENCH_MODE") == "count":
        seats = os.environ.get("BENCH_COUNT_SEATS", "remora").split(",")
    if os.environ.get("BENCH_MODE") == "profile":
        seats = os.environ.get("BENCH_PROFILE_SEATS", "haproxy,remora").split(",")
    return any(s in SERVICE_SEATS for s in seats) or "rss" in PARTS or "retry" in PARTS


def server_addrs():
    """The remote addresses nginx listens on: REMOTE_V4 alone, as ever, unless a Service seat
    or the rss part runs."""
    return REAL_ENDPOINTS if wants_endpoints() else [REMOTE_V4]


def make_pod():
    CGROUPS.setup()
    pod, remote = JANITOR.netns(f"{PREFIX}-pod"), JANITOR.netns(REMOTE_NS)
    run(["ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
         "netns", remote])
    for ns, v4, v6 in ((pod, POD_V4, POD_V6), (remote, REMOTE_V4, REMOTE_V6)):
        run(["ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0"])
        run(["ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # A new connection per request leaves many TIME_WAIT sockets behind: reuse them, and
        # use a wide port range (these sysctls are per namespace), minus the proxy's own ports:
        # a client connection still closing on local port 15006 made the next seat's bind fail.
        run(in_ns(ns, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                       "net.ipv4.ip_local_port_range=1024 65000",
                       "net.ipv4.ip_local_reserved_ports=15000-15099"]))
    for addr in server_addrs()[1:]:
        run(["ip", "-n", remote, "addr", "add", f"{addr}/24", "dev", "eth0"])
    if wants_endpoints():
        # See POD_SERVICE_SRC_V4. The rss part's ClusterIPs are in 198.19.0.0/16: a route there
        # too, as a pod's default route would give (without one, connect() fails before the
        # rules redirect it).
        run(["ip", "-n", pod, "addr", "add", f"{POD_SERVICE_SRC_V4}/24", "dev", "eth0"])
        for cluster_ip in (CLUSTER_IP, RETRY_CLUSTER_IP):
            run(["ip", "-n", pod, "route", "add", f"{cluster_ip}/32", "dev", "eth0",
                 "src", POD_SERVICE_SRC_V4])
        for cluster_ip, src in ((POLICY_OFF_CLUSTER_IP, POD_POLICY_OFF_SRC_V4),
                                (ROUTE_CLUSTER_IP, POD_ROUTE_SRC_V4)):
            run(["ip", "-n", pod, "addr", "add", f"{src}/24", "dev", "eth0"])
            run(["ip", "-n", pod, "route", "add", f"{cluster_ip}/32", "dev", "eth0",
                 "src", src])
        run(["ip", "-n", pod, "route", "add", "198.19.0.0/16", "dev", "eth0",
             "src", POD_SERVICE_SRC_V4])
    return pod, remote


def start_nginx(remote, work, addrs=None):
    """nginx in `remote` on `addrs` (server_addrs() unless given), its files in `work`."""
    conf = (HERE / "nginx.conf.in").read_text()
    addrs = addrs or server_addrs()
    listen = lambda port, extra: "\n".join(f"    listen {a}:{port}{extra} reuseport;" for a in addrs)
    conf = conf.replace("@WORK@", str(work)).replace("@LISTEN_H1@", listen(H1_PORT, "")) \
        .replace("@LISTEN_H2@", listen(H2_PORT, " http2")) \
        .replace("@LISTEN_FLAKY@", listen(FLAKY_PORT, ""))
    path = work / "nginx.conf"
    path.write_text(conf)
    proc = JANITOR.spawn(CGROUPS.wrap("server", in_ns(remote, ["nginx", "-c", path, "-g",
                                                               "daemon off;"])),
                         log_path=work / "nginx.log")
    if not wait_until(10, lambda: all(listening(remote, H1_PORT, a) and
                                      listening(remote, H2_PORT, a) for a in addrs)):
        raise BenchError(f"nginx did not start; see {work}/nginx.log and {work}/nginx-error.log")
    return proc


def nat_rules(ns, family=4):
    text = ""
    ip = "ip6tables" if family == 6 else "iptables"
    for save in (f"{ip}-nft-save", f"{ip}-legacy-save"):
        if shutil.which(save):
            text += run(in_ns(ns, [save, "-t", "nat"]), check=False).stdout
    return text


FALLBACK_RULES = f"""*nat
:REMORA_OUTPUT - [0:0]
:REMORA_REDIRECT - [0:0]
-A OUTPUT -p tcp -j REMORA_OUTPUT
-A REMORA_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN
-A REMORA_OUTPUT -m owner --gid-owner {PROXY_UID} -j RETURN
-A REMORA_OUTPUT -d 127.0.0.0/8 -j RETURN
-A REMORA_OUTPUT -j REMORA_REDIRECT
-A REMORA_REDIRECT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}
COMMIT
"""


def apply_rules(pod):
    """remora-init's rules; until it writes any, an equivalent outbound REDIRECT ruleset."""
    init = BIN_DIR / "remora-init"
    note = ""
    if init.exists():
        out = run(in_ns(pod, [init]), check=False, timeout=30)
        if out.returncode == 0 and "REMORA_" in nat_rules(pod):
            return "remora-init"
        note = f"remora-init exited {out.returncode} without REMORA_ rules: {out.stderr.strip()[:200]}"
    else:
        note = f"{init} is missing"
    log(f"{note}; using the equivalent fallback ruleset")
    run(in_ns(pod, ["iptables-restore", "--noflush"]), input=FALLBACK_RULES)
    return "fallback (remora-init not usable yet)"


# ---------------------------------------------------------------------------------------------
# The seats.


class Seat:
    """What sits between the client and nginx: nothing, HAProxy or remora-proxy."""

    # Where nginx runs (the two-hop seats have a server pod of their own).
    server_ns = REMOTE_NS

    def __init__(self, name, pod, work, wrapper=()):
        self.name, self.pod, self.work = name, pod, work
        # Put in front of remora-proxy's command line (count mode: valgrind).
        self.wrapper = list(wrapper)
        self.proc = None

    @property
    def host(self):
        """Where the client sends: the ClusterIP for a Service seat (the routed Service's for a
        route seat), else nginx's address."""
        if self.name in ROUTE_SEATS:
            return ROUTE_CLUSTER_IP
        if self.name == "remora-svc-off":
            return POLICY_OFF_CLUSTER_IP
        return CLUSTER_IP if self.name in SERVICE_SEATS else REMOTE_V4

    @property
    def client_uid(self):
        # The direct path runs the client as the proxy uid: the rules exempt it, so the very
        # same ruleset stays in place for every seat.
        return PROXY_UID if self.name == "direct" else None

    def start(self):
        if self.name == "direct":
            return
        if self.name == "haproxy":
            conf = (HERE / "haproxy.cfg.in").read_text() \
                .replace("@LISTEN@", f"127.0.0.1:{OUTBOUND_PORT}") \
                .replace("@H2_PORT@", str(H2_PORT))
            path = self.work / "haproxy.cfg"
            path.write_text(conf)
            argv = self.wrapper + ["haproxy", "-db", "-f", path]
            ready = lambda: listening(self.pod, OUTBOUND_PORT)
        elif self.name in ("haproxy-lb", "haproxy-acl", "haproxy-retry"):
            servers = lambda port, extra: "\n".join(
                f"  server e{i} {a}:{port}{extra}" for i, a in enumerate(SERVICE_ENDPOINTS))
            conf = (HERE / f"{self.name}.cfg.in").read_text() \
                .replace("@LISTEN@", f"127.0.0.1:{OUTBOUND_PORT}") \
                .replace("@H1_PORT@", str(H1_PORT)) \
                .replace("@H2_PORT@", str(H2_PORT)) \
                .replace("@SERVERS_H1@", servers(H1_PORT, "")) \
                .replace("@SERVERS_H2@", servers(H2_PORT, " proto h2")) \
                .replace("@SERVERS_FLAKY@", servers(FLAKY_PORT, "")) \
                .replace("@MARK@", ROUTE_MARK).replace("@MARK_VALUE@", ROUTE_MARK_VALUE)
            path = self.work / f"{self.name}.cfg"
            path.write_text(conf)
            argv = self.wrapper + ["haproxy", "-db", "-f", path]
            ready = lambda: listening(self.pod, OUTBOUND_PORT)
        else:
            variant = self.name.partition("@")[2]
            # A variant may also be another build (a branch's binary) compared in the same run.
            binary = Path(os.environ.get(f"BENCH_REMORA_BIN_{variant}" if variant else "",
                                         os.environ.get("BENCH_PROFILE_SEAT_BIN",
                                                        BIN_DIR / "remora-proxy")))
            if not binary.exists():
                raise BenchError(f"{binary} is missing (make release)")
            check_own_build(binary)
            flags = os.environ.get(f"BENCH_REMORA_ARGS_{variant}" if variant else "BENCH_REMORA_ARGS", "")
            if self.name in CONTROL_SEATS:
                # The routed seat runs exactly as remora-svc, flags included: only the Service
                # it is sent to differs.
                flags = f"--control {CONTROL_LISTEN} --control-plaintext " + \
                    os.environ.get("BENCH_REMORA_ARGS_svc", "")
            argv = self.wrapper + [binary] + flags.split()
            ready = lambda: listening(self.pod, OUTBOUND_PORT) and run(
                in_ns(self.pod, ["curl", "-sf", "-m", "1",
                                 f"http://127.0.0.1:{ADMIN_PORT}/ready"]), check=False
            ).returncode == 0
        # POD_NAMESPACE and POD_NAME: the pod's identity for remora-control (the others ignore
        # them); `ip netns exec` and setpriv pass the environment on.
        self.proc = JANITOR.spawn(CGROUPS.wrap("proxy", in_ns(self.pod, argv, uid=PROXY_UID)),
                                  log_path=self.work / f"{self.name}.log",
                                  env={**os.environ, **POD_IDENTITY})
        if not wait_until(60 if self.wrapper else 15,
                          lambda: self.proc.poll() is not None or ready()) \
                or self.proc.poll() is not None:
            JANITOR.stop(self.proc)
            tail = (self.work / f"{self.name}.log").read_text(errors="replace")[-600:]
            raise BenchError(f"{seat_label(self.name)} did not become ready "
                             f"(exit {self.proc.returncode}): {tail.strip()}")
        # `ip netns exec` and setpriv exec in place: the pid is the proxy's own.
        time.sleep(0.5)

    def stop(self):
        if self.proc:
            JANITOR.stop(self.proc)
            self.proc = None

    def rss_kib(self, field):
        return proc_status_kib(self.proc.pid, field) if self.proc else None

    def check_load(self, load, res):
        """After each load: that it took the path the seat is named for (see PairSeat)."""

    def cpu(self):
        return proc_cpu_seconds(self.proc.pid) if self.proc else None

    def cpu_user(self):
        """The user-space part of `cpu()`: where the proxy's own code (and its crates) runs."""
        return proc_user_seconds(self.proc.pid) if self.proc else None

    def client(self, argv):
        return CGROUPS.wrap("client", in_ns(self.pod, argv, uid=self.client_uid))


def service_objects(namespace, name, cluster_ip, endpoints, ports, annotations=None):
    """A Service and its EndpointSlice as the API server would store them (remora-control
    reads them with --objects): `ports` as (name, port, targetPort), every endpoint ready."""
    return [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
         "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                  "selector": {"app": name},
                  "ports": [{"name": n, "protocol": "TCP", "port": p, "targetPort": t}
                            for n, p, t in ports]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": f"{name}-abcde", "namespace": namespace,
                      "labels": {"kubernetes.io/service-name": name}},
         "addressType": "IPv4",
         "ports": [{"name": n, "protocol": "TCP", "port": t} for n, _, t in ports],
         "endpoints": [{"addresses": [a],
                        "conditions": {"ready": True, "serving": True, "terminating": False},
                        "targetRef": {"kind": "Pod", "namespace": namespace,
                                      "name": f"{name}-{i}"}}
                       for i, a in enumerate(endpoints)]},
    ]


def bench_service_objects():
    """The Service of the Service seats (ports 80 and 81 on the three endpoints) and, for the
    route seats, a second one with the same ports and endpoints and its two HTTPRoutes. The first
    has no route, so remora-svc measures the Service path alone in the same run."""
    ports = [("http", H1_PORT, H1_PORT), ("h2", H2_PORT, H2_PORT)]
    return service_objects(SERVICE_NS, SERVICE_NAME, CLUSTER_IP, SERVICE_ENDPOINTS, ports) \
        + service_objects(SERVICE_NS, ROUTE_SERVICE_NAME, ROUTE_CLUSTER_IP, SERVICE_ENDPOINTS,
                          ports) \
        + service_objects(SERVICE_NS, POLICY_OFF_SERVICE_NAME, POLICY_OFF_CLUSTER_IP,
                          SERVICE_ENDPOINTS, ports, POLICY_OFF) \
        + [bench_route(port) for port in (H1_PORT, H2_PORT)]


def bench_route(port):
    """The HTTPRoute of the route seats on one port of the routed Service: 10 rules, every one
    sending to that Service port. The loads' requests (GET / with no header or query of note)
    match only the last in the Gateway API's precedence, a bare PathPrefix /, which sets
    ROUTE_MARK; the nine before it are checked and missed on every request: exact paths (one
    with a header), prefixes, a regular expression, a method, headers and a query parameter.
    haproxy-acl.cfg.in holds the same rules as ACLs."""
    path = lambda kind, value: {"path": {"type": kind, "value": value}}
    exact = lambda name, value: {"type": "Exact", "name": name, "value": value}
    misses = [
        {**path("Exact", "/"), "headers": [exact("x-user", "admin")]},
        path("Exact", "/healthz"),
        path("PathPrefix", "/api/v1"),
        path("PathPrefix", "/static"),
        path("RegularExpression", "/v[0-9]+/.*"),
        {**path("PathPrefix", "/"), "method": "POST"},
        {**path("PathPrefix", "/"), "headers": [exact("x-canary", "1")]},
        {**path("PathPrefix", "/"), "headers": [exact("x-tenant", "blue")]},
        {**path("PathPrefix", "/"), "queryParams": [exact("debug", "1")]},
    ]
    backend = [{"group": "", "kind": "Service", "name": ROUTE_SERVICE_NAME, "port": port}]
    rules = [{"matches": [match], "backendRefs": backend} for match in misses]
    rules.append({"matches": [path("PathPrefix", "/")],
                  "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                      "set": [{"name": ROUTE_MARK, "value": ROUTE_MARK_VALUE}]}}],
                  "backendRefs": backend})
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": ROUTE_NAMES[port], "namespace": SERVICE_NS},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": ROUTE_SERVICE_NAME,
                                     "port": port}],
                     "rules": rules}}


def start_control(pod, work, objects, tag, listen=CONTROL_LISTEN, admin=CONTROL_ADMIN,
                  extra=()):
    """remora-control serving `objects` (written as one JSON object a line) on the pod's
    loopback, ready; the seats' proxies are uid 1337, so the rules leave their connections to
    it alone. Runs outside the proxy's CPU accounting: it is idle while the loads run."""
    binary = BIN_DIR / "remora-control"
    if not binary.exists():
        raise BenchError(f"{binary} is missing (make release)")
    directory = work / f"objects-{tag}"
    directory.mkdir(exist_ok=True)
    with open(directory / "objects.json", "w") as f:
        for obj in objects:
            f.write(json.dumps(obj, separators=(",", ":")) + "\n")
    proc = JANITOR.spawn(in_ns(pod, [binary, "serve", "--plaintext", "--log-format", "plain",
                                     "--objects", directory, "--listen", listen,
                                     "--admin-listen", admin, *extra]),
                         log_path=work / f"control-{tag}.log")
    ok = lambda: run(in_ns(pod, ["curl", "-sf", "-m", "1", f"http://{admin}/ready"]),
                     check=False).returncode == 0
    if not wait_until(120, lambda: proc.poll() is not None or ok()) or proc.poll() is not None:
        JANITOR.stop(proc)
        tail = (work / f"control-{tag}.log").read_text(errors="replace")[-600:]
        raise BenchError(f"remora-control did not become ready: {tail.strip()}")
    return proc


def server_spread(port, ns=REMOTE_NS):
    """How nginx's workers share the load's connections to `port`: established connections per
    worker, most first ([8, 2], or [10, 0] when one worker holds them all). With them all on one
    worker, nginx is the bottleneck and every seat's figures move (see the bench README)."""
    workers = {}
    for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
        try:
            if b"worker process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers[pid] = 0
        except OSError:  # gone meanwhile
            continue
    sockets = run(in_ns(ns, ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"]),
                  check=False).stdout
    for pid in re.findall(r"pid=(\d+)", sockets):
        if pid in workers:
            workers[pid] += 1
    return sorted(workers.values(), reverse=True)


def endpoint_spread(port):
    """The Service seats: established connections to `port` per endpoint address, in the order
    of SERVICE_ENDPOINTS (how the seat spread its upstream connections)."""
    sockets = run(in_ns(REMOTE_NS, ["ss", "-tnH", "state", "established",
                                    f"( sport = :{port} )"]), check=False).stdout
    local = [line.split()[2].rpartition(":")[0] for line in sockets.splitlines()
             if len(line.split()) >= 3]
    return [local.count(a) for a in SERVICE_ENDPOINTS]


def service_metrics(seat):
    """remora-proxy's /metrics, as text."""
    return run(in_ns(seat.pod, ["curl", "-sS", "-m", "2",
                                f"http://127.0.0.1:{ADMIN_PORT}/metrics"]), check=False).stdout


def check_balanced(seat):
    """The Service seat of remora-proxy really balances: connected to remora-control, and both
    Service ports known with their three endpoints once a request went to each."""
    run(seat.client(["curl", "-sS", "-m", "5", "--http2-prior-knowledge",
                     f"http://{seat.host}:{H2_PORT}/"]), check=False)
    text = service_metrics(seat)
    service = ROUTE_SERVICE_NAME if seat.name in ROUTE_SEATS else \
        POLICY_OFF_SERVICE_NAME if seat.name == "remora-svc-off" else SERVICE_NAME
    for port in (H1_PORT, H2_PORT):
        series = (f'remora_proxy_balancer_endpoints{{namespace="{SERVICE_NS}",'
                  f'service="{service}",port="{port}"}} {len(SERVICE_ENDPOINTS)}')
        if series not in text:
            raise BenchError(f"{seat_label(seat.name)} does not balance port {port} over the "
                             f"{len(SERVICE_ENDPOINTS)} endpoints; its metrics: "
                             + " ".join(l for l in text.splitlines() if "balancer" in l
                                        or "control" in l)[:600])


def check_route_mark(seat):
    """A route seat applies the routing rules: on both ports, a request that only the last rule
    matches (ROUTE_CHECK_PATH, where nginx echoes ROUTE_MARK as X-Seen) reaches nginx with the
    header that rule sets."""
    for port, h2 in ((H1_PORT, []), (H2_PORT, ["--http2-prior-knowledge"])):
        out = run(seat.client(["curl", "-sS", "-m", "5", "-o", "/dev/null", "-D", "-", *h2,
                               f"http://{seat.host}:{port}{ROUTE_CHECK_PATH}"]), check=False)
        seen = re.search(r"^x-seen:\s*(\S+)", out.stdout, re.M | re.I)
        if not seen or seen.group(1) != ROUTE_MARK_VALUE:
            raise RouteCheckError(f"{seat_label(seat.name)}, port {port}: nginx did not see "
                             f"{ROUTE_MARK}: {ROUTE_MARK_VALUE} (the last rule's filter): "
                             f"{(out.stdout + out.stderr).strip()[:300]}")


def route_requests(seat, port):
    """What remora-proxy's remora_proxy_route_requests_total counted as answered 200 by the
    route of the routed Service's `port`."""
    total = 0
    for line in service_metrics(seat).splitlines():
        if line.startswith("remora_proxy_route_requests_total{") \
                and f'service="{ROUTE_SERVICE_NAME}"' in line \
                and f'route="{ROUTE_NAMES[port]}"' in line and 'status_code="200"' in line:
            total += float(line.split()[-1])
    return total


def measure(seat, argv, parser, timeout, spread_port=None):
    """One load through `seat`: the client's figures, the seat's CPU per request and, with
    `spread_port`, nginx's connections per worker sampled a moment into the load (and, for a
    Service seat, per endpoint)."""
    spread, sampler = [], None
    if spread_port:
        def sample():
            spread.append(server_spread(spread_port, seat.server_ns))
            if seat.name in SERVICE_SEATS:
                spread.append(endpoint_spread(spread_port))
        sampler = threading.Timer(min(2.0, SECONDS / 2), sample)
        sampler.start()
    cpu0, user0, host0 = seat.cpu(), seat.cpu_user(), host_ticks()
    try:
        out = run(seat.client(argv), timeout=timeout, check=False)
    finally:
        if sampler:
            sampler.cancel()
            sampler.join()
    cpu1, user1, host1 = seat.cpu(), seat.cpu_user(), host_ticks()
    if out.returncode != 0:
        raise BenchError(f"{argv[0]} failed ({out.returncode}): {out.stderr[-500:]}{out.stdout[-500:]}")
    res = parser(out.stdout)
    if cpu0 is not None and res.get("requests"):
        res["cpu_s"] = cpu1 - cpu0
        res["cpu_s_per_1k"] = (cpu1 - cpu0) / res["requests"] * 1000
    if user0 is not None and res.get("requests"):
        res["user_cpu_s_per_1k"] = (user1 - user0) / res["requests"] * 1000
    res.update(host_share(host0, host1, res.get("requests")))
    if spread:
        res["server_spread"] = spread[0]
    if len(spread) > 1:
        res["endpoint_spread"] = spread[1]
    return res


def load_argv(load, seconds, host=REMOTE_V4):
    """The client command of one proxy load: the same in the timed run, the profile and the
    trace. `host`: the ClusterIP for the Service seats."""
    url = f"http://{host}:{H1_PORT}/"
    oha = ["oha", "-z", f"{seconds}s", "-c", "10", "--no-tui", "--output-format", "json"]
    return {
        "throughput": ["wrk", "-t2", "-c50", f"-d{seconds}s", "--latency", url],
        "latency": oha + ["-q", "1000", "--latency-correction", url],
        "newconn": oha + ["--disable-keepalive", url],
        "h2": ["h2load", "-D", str(seconds), "-c", "10", "-m", "10", "-t", "1",
               f"http://{host}:{H2_PORT}/"],
    }[load]


# Where each load's result goes in a seat's result, and how its client's output is read.
LOAD_RESULTS = {
    "throughput": ("throughput", parse_wrk),
    "latency": ("latency_1000rps", parse_oha),
    "newconn": ("new_connection", parse_oha),
    "h2": ("h2", parse_h2load),
}

# The nginx port of each keep-alive load, whose connections stay for the whole load: how nginx's
# workers share them is recorded with the load's figures.
SPREAD_PORTS = {"throughput": H1_PORT, "latency": H1_PORT, "h2": H2_PORT}


def check_routed_load(seat, load, res, routed):
    """The routed seat's load really went through the route, and still over all three
    endpoints: every answered request counted by the route of its port, and (for the keep-alive
    loads) upstream connections to each endpoint a moment into the load. The second needs its
    own check: a route's backend has a balancer of its own, which the
    remora_proxy_balancer_endpoints series (the Service's endpoints) does not show."""
    if routed < res["requests"]:
        raise RouteCheckError(f"{seat_label(seat.name)}, {load}: the route counted {routed:,.0f} "
                         f"requests answered 200 of the load's {res['requests']:,}")
    res["route_requests"] = routed
    spread = res.get("endpoint_spread")
    if spread is not None and min(spread) == 0:
        raise RouteCheckError(f"{seat_label(seat.name)}, {load}: upstream connections per endpoint "
                         f"{'/'.join(map(str, spread))}: not balanced over the three")


def run_load(seat, load, into):
    """One load through a fresh process of `seat`, its figures added to `into`: the idle RSS of
    the first process, the peak after the 50-connection load, and the highest peak of any."""
    url = f"http://{seat.host}:{H1_PORT}/"
    key, parser = LOAD_RESULTS[load]
    seat.start()
    try:
        into.setdefault("idle_rss_kib", seat.rss_kib("VmRSS"))
        # One request proves the path (a proxy seat refuses if the proxy is not in it; no host
        # has the ClusterIP, so only a balancing seat answers it).
        # remora-proxy asks remora-control about the ClusterIP on its first connection there
        # and, without an answer within a second, fails open: a few tries, not one.
        for _ in range(5 if seat.name in CONTROL_SEATS else 1):
            check = run(seat.client(["curl", "-sS", "-m", "5", url]), check=False)
            if "hello" in check.stdout:
                break
        if "hello" not in check.stdout:
            raise BenchError(f"no answer through {seat.name}: {check.stderr.strip()}")
        if seat.name in CONTROL_SEATS:
            check_balanced(seat)
        if seat.name in ROUTE_SEATS:
            check_route_mark(seat)
        port = H2_PORT if load == "h2" else H1_PORT
        routed0 = route_requests(seat, port) if seat.name == "remora-route" else None
        try:
            into[key] = measure(seat, load_argv(load, SECONDS, seat.host), parser, SECONDS + 30,
                                spread_port=SPREAD_PORTS.get(load))
        except BenchError as e:
            if load != "h2":
                raise
            into[key] = {"error": str(e)[:300]}
        if routed0 is not None and "error" not in into[key]:
            check_routed_load(seat, load, into[key], route_requests(seat, port) - routed0)
        if "error" not in into[key]:
            seat.check_load(load, into[key])
        peak = seat.rss_kib("VmHWM")
        if load == "throughput":
            into["peak_rss_kib"] = peak
        if peak is not None:
            into["peak_rss_all_kib"] = max(peak, into.get("peak_rss_all_kib") or 0)
        if seat.proc and seat.proc.poll() is not None:
            raise BenchError(f"{seat.name} exited during the {load} load ({seat.proc.returncode})")
    finally:
        seat.stop()


# ---------------------------------------------------------------------------------------------
# Summaries.


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def get(d, path):
    for key in path.split("."):
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# (key, label, path in a seat's result, unit, higher is better)
METRICS = [
    ("rps", "throughput, 50 conns (req/s)", "throughput.rps", "req/s", True),
    ("p50_1000", "p50 at 1000 rps (ms)", "latency_1000rps.p50_ms", "ms", False),
    ("p99_1000", "p99 at 1000 rps (ms)", "latency_1000rps.p99_ms", "ms", False),
    ("cpu_per_1k", "CPU s / 1000 req (wrk)", "throughput.cpu_s_per_1k", "s", False),
    ("user_cpu_per_1k", "of which user space (wrk)", "throughput.user_cpu_s_per_1k", "s", False),
    ("host_cpu_per_1k", "whole VM CPU s / 1000 req (wrk)", "throughput.host_cpu_s_per_1k", "s",
     False),
    ("cpu_per_1k_1000rps", "CPU s / 1000 req (1000 rps)", "latency_1000rps.cpu_s_per_1k", "s",
     False),
    ("newconn_rps", "new conn per request (req/s)", "new_connection.rps", "req/s", True),
    ("newconn_p99", "new conn per request p99 (ms)", "new_connection.p99_ms", "ms", False),
    ("cpu_per_1k_newconn", "CPU s / 1000 req (new conn)", "new_connection.cpu_s_per_1k", "s",
     False),
    ("h2_rps", "HTTP/2, 10 conns x 10 streams (req/s)", "h2.rps", "req/s", True),
    ("cpu_per_1k_h2", "CPU s / 1000 req (h2)", "h2.cpu_s_per_1k", "s", False),
    ("user_cpu_per_1k_h2", "of which user space (h2)", "h2.user_cpu_s_per_1k", "s", False),
    ("idle_rss", "idle RSS (MiB)", "idle_rss_kib", "MiB", False),
    ("peak_rss", "peak RSS, 50 conns (MiB)", "peak_rss_kib", "MiB", False),
    ("peak_rss_all", "peak RSS, all loads (MiB)", "peak_rss_all_kib", "MiB", False),
]


def summarize_proxy(rounds):
    seats = {}
    for seat in SEATS:
        runs = [r[seat] for r in rounds if seat in r and "error" not in r[seat]]
        m = {}
        for key, _, path, unit, _ in METRICS:
            v = median([get(x, path) for x in runs])
            if v is not None and unit == "MiB":
                v = v / 1024
            m[key] = v
        # Added latency: paired with the direct path of the same round, then the median.
        for pct in ("p50", "p99"):
            diffs = []
            for r in rounds:
                a = get(r.get(seat, {}), f"latency_1000rps.{pct}_ms")
                d = get(r.get("direct", {}), f"latency_1000rps.{pct}_ms")
                if a is not None and d is not None:
                    diffs.append(a - d)
            m[f"added_{pct}_1000"] = median(diffs) if seat != "direct" else None
        m["rounds_ok"] = len(runs)
        m["errors"] = [r[seat]["error"] for r in rounds if seat in r and "error" in r[seat]]
        m["load_errors"] = sum((get(x, f"{load}.errors") or 0) for x in runs
                               for load in ("throughput", "latency_1000rps", "new_connection", "h2"))
        seats[seat] = m
    return seats


def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def fmt(v, unit=None):
    if v is None:
        return "n/a"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.4f}"
    if unit == "ms" and abs(v) < 1:
        return f"{v:.3f}"  # added latencies differ by tens of microseconds
    if unit in ("ms", "MiB"):
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def proxy_table(summary):
    labels = [(k, lbl, unit, hib) for k, lbl, _, unit, hib in METRICS]
    labels[3:3] = [("added_p50_1000", "added p50 at 1000 rps (ms)", "ms", False),
                   ("added_p99_1000", "added p99 at 1000 rps (ms)", "ms", False)]
    seats = [s for s in SEATS if s in summary]
    head = ["metric"] + [seat_label(s) for s in seats]
    ratio_cols = []
    if "remora" in seats and "haproxy" in seats:
        ratio_cols.append(("remora", "haproxy", "remora / HAProxy"))
    if "haproxy" in seats and "direct" in seats:
        ratio_cols.append(("haproxy", "direct", "HAProxy / direct"))
    if "remora" in seats and "direct" in seats:
        ratio_cols.append(("remora", "direct", "remora / direct"))
    if "remora-svc" in seats:
        for base in ("haproxy-lb", "remora", "direct"):
            if base in seats:
                ratio_cols.append(("remora-svc", base, f"remora-svc / {seat_label(base)}"))
    if "haproxy-lb" in seats and "direct" in seats:
        ratio_cols.append(("haproxy-lb", "direct", "HAProxy (Service) / direct"))
    if "remora-route" in seats:
        for base in ("remora-svc", "haproxy-acl"):
            if base in seats:
                ratio_cols.append(("remora-route", base, f"remora-route / {seat_label(base)}"))
    if "haproxy-acl" in seats and "haproxy-lb" in seats:
        ratio_cols.append(("haproxy-acl", "haproxy-lb", "HAProxy (ACL) / HAProxy (Service)"))
    if "remora-svc" in seats and "remora-svc-off" in seats:
        ratio_cols.append(("remora-svc", "remora-svc-off", "policy on / policy off (Service)"))
    ratio_cols += pair_ratio_cols(seats)
    for seat in seats:
        if seat.startswith("remora@"):
            for base in ("haproxy", "remora"):
                if base in seats:
                    ratio_cols.append((seat, base, f"{seat} / {seat_label(base)}"))
    head += [c[2] for c in ratio_cols]
    rows = []
    for key, lbl, unit, _ in labels:
        row = [lbl] + [fmt(summary[s].get(key), unit) for s in seats]
        for a, b, _ in ratio_cols:
            r = ratio(summary[a].get(key), summary[b].get(key))
            row.append(f"{r:.2f}x" if r is not None else "")
        rows.append(row)
    return head, rows


def markdown_table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(head, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def targets(summary, injector, init, rss=None):
    """The issue's targets, checked against this run's medians."""
    out = []

    def check(name, value, ok, shown):
        out.append({"target": name, "value": shown,
                    "met": None if value is None or ok is None else bool(ok)})

    r, h, d = summary.get("remora", {}), summary.get("haproxy", {}), summary.get("direct", {})
    if r:
        rh, rd = ratio(r.get("rps"), h.get("rps")), ratio(r.get("rps"), d.get("rps"))
        # Three decimals: 1.0993 is not met, and must not print as 1.10.
        check("throughput >= 1.1x HAProxy", rh, rh is not None and rh >= 1.1, f"{rh:.3f}x"
              if rh is not None else "n/a")
        check("throughput >= 0.4x direct", rd, rd is not None and rd >= 0.4, f"{rd:.3f}x"
              if rd is not None else "n/a")
        for pct in ("p50", "p99"):
            a, b = r.get(f"added_{pct}_1000"), h.get(f"added_{pct}_1000")
            # The ratio too: two figures that print alike may still differ.
            shown = f"{fmt(a, 'ms')} ms vs {fmt(b, 'ms')} ms"
            if ratio(a, b) is not None:
                shown += f" ({ratio(a, b):.3f}x)"
            check(f"added {pct} at 1000 rps <= HAProxy's", a,
                  None if a is None or b is None else a <= b, shown)
        # The issue sets one CPU target; each load that both proxies ran is held to it.
        for key, load in (("cpu_per_1k", "wrk"), ("cpu_per_1k_1000rps", "1000 rps"),
                          ("cpu_per_1k_newconn", "new conn"), ("cpu_per_1k_h2", "h2")):
            a, b = r.get(key), h.get(key)
            if a is None and b is None:
                continue
            check(f"CPU s / 1000 req ({load}) <= HAProxy's", a,
                  None if a is None or b is None else a <= b,
                  f"{fmt(a, 's')} vs {fmt(b, 's')}")
        a = r.get("idle_rss")
        check("idle RSS <= 5 MiB", a, a is not None and a <= 5, f"{fmt(a, 'MiB')} MiB")
        a = r.get("peak_rss")
        check("peak RSS (50 conns) <= 20 MiB", a, a is not None and a <= 20, f"{fmt(a, 'MiB')} MiB")
    sv, hl, rp = summary.get("remora-svc", {}), summary.get("haproxy-lb", {}), summary.get("remora")
    if sv:
        # Issue 23: the Service path against HAProxy balancing the same endpoints, and against
        # remora-proxy's own passthrough.
        rh = ratio(sv.get("rps"), hl.get("rps"))
        check("Service: throughput >= 1.0x HAProxy (Service)", rh,
              None if rh is None else rh >= 1.0, f"{rh:.3f}x" if rh is not None else "n/a")
        if rp is not None:
            rr = ratio(sv.get("rps"), rp.get("rps"))
            check("Service: throughput >= 0.9x remora-proxy passthrough", rr,
                  None if rr is None else rr >= 0.9, f"{rr:.3f}x" if rr is not None else "n/a")
        for pct in ("p50", "p99"):
            a, b = sv.get(f"added_{pct}_1000"), hl.get(f"added_{pct}_1000")
            shown = f"{fmt(a, 'ms')} ms vs {fmt(b, 'ms')} ms"
            if ratio(a, b) is not None:
                shown += f" ({ratio(a, b):.3f}x)"
            check(f"Service: added {pct} at 1000 rps <= HAProxy (Service)'s", a,
                  None if a is None or b is None else a <= b, shown)
        for key, load in (("cpu_per_1k", "wrk"), ("cpu_per_1k_1000rps", "1000 rps"),
                          ("cpu_per_1k_newconn", "new conn"), ("cpu_per_1k_h2", "h2")):
            a, b = sv.get(key), hl.get(key)
            if a is None and b is None:
                continue
            check(f"Service: CPU s / 1000 req ({load}) <= HAProxy (Service)'s", a,
                  None if a is None or b is None else a <= b,
                  f"{fmt(a, 's')} vs {fmt(b, 's')}")
    rt = summary.get("remora-route")
    if rt:
        # Issue 24: a route of 10 rules with a header filter against no route on the same
        # Service path (remora-svc, in the same run), and against HAProxy with the same rules as
        # ACLs. Throughput under wrk and h2load, CPU per request under every load both ran.
        for base, goal in (("remora-svc", 0.95), ("haproxy-acl", 1.0)):
            if base not in summary:
                continue
            b = summary[base]
            for key, load in (("rps", "wrk"), ("h2_rps", "h2")):
                if rt.get(key) is None and b.get(key) is None:
                    continue
                x = ratio(rt.get(key), b.get(key))
                check(f"Route: throughput ({load}) >= {goal:.2f}x {seat_label(base)}", x,
                      None if x is None else x >= goal, f"{x:.3f}x" if x is not None else "n/a")
        b = summary.get("remora-svc")
        for key, load in (("cpu_per_1k", "wrk"), ("cpu_per_1k_1000rps", "1000 rps"),
                          ("cpu_per_1k_newconn", "new conn"), ("cpu_per_1k_h2", "h2")):
            if b is None or (rt.get(key) is None and b.get(key) is None):
                continue
            x = ratio(rt.get(key), b.get(key))
            check(f"Route: CPU s / 1000 req ({load}) <= 1.10x remora-proxy (Service)'s", x,
                  None if x is None else x <= 1.1,
                  f"{fmt(rt.get(key), 's')} vs {fmt(b.get(key), 's')}"
                  + (f" ({x:.3f}x)" if x is not None else ""))
    off = summary.get("remora-svc-off")
    if sv and off:
        # Issue 25: the default resilience policy (failure accrual, the queue) against none, on
        # the same Service path in the same run.
        x = ratio(sv.get("rps"), off.get("rps"))
        check("Resilience: throughput (wrk) >= 0.97x the policy off", x,
              None if x is None else x >= 0.97, f"{x:.3f}x" if x is not None else "n/a")
        for key, load in (("cpu_per_1k", "wrk"), ("cpu_per_1k_1000rps", "1000 rps"),
                          ("cpu_per_1k_newconn", "new conn"), ("cpu_per_1k_h2", "h2")):
            if sv.get(key) is None and off.get(key) is None:
                continue
            x = ratio(sv.get(key), off.get(key))
            check(f"Resilience: CPU s / 1000 req ({load}) <= 1.05x the policy off", x,
                  None if x is None else x <= 1.05,
                  f"{fmt(sv.get(key), 's')} vs {fmt(off.get(key), 's')}"
                  + (f" ({x:.3f}x)" if x is not None else ""))
    if rss and "error" not in rss:
        a = rss.get("growth_over_idle_mib")
        check("RSS with 10,000 Services, 10 used: within 1 MiB of idle (no --control)", a,
              None if a is None else a <= 1.0, f"{a:+.2f} MiB" if a is not None else "n/a")
        a = rss.get("anon_growth_over_idle_mib")
        check("the same, anonymous memory only (heap and stacks)", a,
              None if a is None else a <= 1.0, f"{a:+.2f} MiB" if a is not None else "n/a")
    if injector and "error" not in injector:
        a = injector.get("reviews_per_s")
        check("injector >= 5000 reviews/s", a, a is not None and a >= 5000, fmt(a, "req/s"))
        a = injector.get("p99_1000_ms")
        check("injector p99 at 1000/s <= 1 ms", a, a is not None and a <= 1, f"{fmt(a, 'ms')} ms")
        a = injector.get("pod200_p50_ms")
        check("200-container pod <= 5 ms", a, a is not None and a <= 5, f"{fmt(a, 'ms')} ms (p50)")
    if init and "error" not in init:
        for key, row in init.get("cases", {}).items():
            for family, ms in (row.get("per_family_median_ms") or {}).items():
                check(f"init <= 50 ms per family ({key}, {family})", ms, ms <= 50,
                      f"{fmt(ms, 'ms')} ms")
    return out


# ---------------------------------------------------------------------------------------------
# Injector: reviews over keep-alive TLS.


def admission_review(containers):
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bench", "namespace": "bench", "labels": {"app": "bench"},
                     "annotations": {"remora.io/inject": "true"}},
        "spec": {"containers": [
            {"name": f"app-{i}", "image": "registry.example/app:1.0",
             "ports": [{"containerPort": 8080 + i % 1000}],
             "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}
            for i in range(containers)]},
    }
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "bench", "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": None, "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


# The injector's loads, as keys of each round's result.
INJECTOR_LOADS = ("throughput", "latency_1000", "pod200")


def bench_injector(work):
    binary = BIN_DIR / "remora-injector"
    if not binary.exists():
        return {"error": f"{binary} is missing"}
    ns = JANITOR.netns(f"{PREFIX}-inj")
    cert, key = work / "tls.crt", work / "tls.key"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=remora-injector.bench.svc",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:remora-injector.bench.svc",
         "-keyout", key, "-out", cert])
    args = os.environ.get("BENCH_INJECTOR_ARGS", "serve --tls-cert {cert} --tls-key {key}")
    argv = [binary] + args.format(cert=cert, key=key).split()
    proc = JANITOR.spawn(in_ns(ns, argv), log_path=work / "injector.log")
    url = "https://127.0.0.1:8443"
    ok = lambda: run(in_ns(ns, ["curl", "-skf", "-m", "1", f"{url}/healthz"]),
                     check=False).returncode == 0
    try:
        if not wait_until(15, lambda: proc.poll() is not None or ok()) or proc.poll() is not None:
            tail = (work / "injector.log").read_text(errors="replace")[-500:]
            return {"error": f"remora-injector serve did not become ready: {tail.strip()}"}
        small, big = work / "review-1.json", work / "review-200.json"
        small.write_text(json.dumps(admission_review(1)))
        big.write_text(json.dumps(admission_review(200)))
        # The answer must be an injection: a benchmark of errors or skips would prove nothing.
        for body in (small, big):
            out = run(in_ns(ns, ["curl", "-sk", "-m", "5", "-H", "content-type: application/json",
                                 "--data-binary", f"@{body}", f"{url}/inject"]), check=False)
            if '"patch"' not in out.stdout:
                return {"error": f"{body.name} was not injected: {out.stdout[:300]}"}
        post = ["-m", "POST", "-H", "content-type: application/json", "--insecure", "--no-tui",
                "--output-format", "json"]
        def oha(*args):
            host0 = host_ticks()
            out = parse_oha(run(in_ns(ns, ["oha", *args, *post, f"{url}/inject"]),
                                timeout=SECONDS + 30).stdout)
            out["steal_pct"] = host_share(host0, host_ticks(), None)["steal_pct"]
            return out

        res = {"rss_idle_kib": proc_status_kib(proc.pid, "VmRSS"), "rounds": []}
        # Like the proxy seats, several rounds and their medians: one p99 here swings 5x.
        for _ in range(ROUNDS):
            r = {}
            cpu0 = proc_cpu_seconds(proc.pid)
            r["throughput"] = oha("-z", f"{SECONDS}s", "-c", "10", "-D", small)
            cpu1 = proc_cpu_seconds(proc.pid)
            n = r["throughput"]["requests"]
            r["cpu_s_per_1k"] = (cpu1 - cpu0) / n * 1000 if n else None
            r["latency_1000"] = oha("-z", f"{SECONDS}s", "-c", "10", "-q", "1000",
                                    "--latency-correction", "-D", small)
            r["pod200"] = oha("-n", str(max(100, 50 * SECONDS)), "-c", "1", "-D", big)
            res["rounds"].append(r)
        rs = res["rounds"]
        res["reviews_per_s"] = median([get(r, "throughput.rps") for r in rs])
        res["p50_1000_ms"] = median([get(r, "latency_1000.p50_ms") for r in rs])
        res["p99_1000_ms"] = median([get(r, "latency_1000.p99_ms") for r in rs])
        res["pod200_p50_ms"] = median([get(r, "pod200.p50_ms") for r in rs])
        res["pod200_p99_ms"] = median([get(r, "pod200.p99_ms") for r in rs])
        res["cpu_s_per_1k"] = median([r["cpu_s_per_1k"] for r in rs])
        res["steal_pct"] = {k: median([get(r, f"{k}.steal_pct") for r in rs])
                            for k in INJECTOR_LOADS}
        res["errors"] = sum(get(r, f"{k}.errors") or 0 for r in rs
                            for k in INJECTOR_LOADS)
        res["pod200_body_bytes"] = big.stat().st_size
        res["rss_peak_kib"] = proc_status_kib(proc.pid, "VmHWM")
        return res
    finally:
        JANITOR.stop(proc)
        JANITOR.delete_netns(ns)


# ---------------------------------------------------------------------------------------------
# rss: remora-proxy's memory with a large cluster in remora-control and a pod using 10 Services.

RSS_SERVICES = int(os.environ.get("BENCH_RSS_SERVICES", "10000"))
RSS_ENDPOINTS = 10
RSS_USED = len(REAL_ENDPOINTS)
RSS_REQUESTS = int(os.environ.get("BENCH_RSS_REQUESTS", "2000"))


def rss_cluster_ip(i):
    """Service i's ClusterIP: 198.19.200.1 on, 250 a /24 (10,000 end at 198.19.239.250)."""
    return f"198.19.{200 + i // 250}.{i % 250 + 1}"


def rss_fake_endpoint(k):
    """The k-th endpoint of the Services no one uses: 198.18.16.0 on, no host has them
    (100,000 end at 198.19.150.159, below the ClusterIPs)."""
    n = (198 << 24) + (18 << 16) + (16 << 8) + k
    return ".".join(str((n >> shift) & 255) for shift in (24, 16, 8, 0))


def rss_used():
    """The indices of the Services the pod talks to, spread over the set and its namespaces."""
    if RSS_SERVICES < RSS_USED:
        raise BenchError(f"BENCH_RSS_SERVICES={RSS_SERVICES}: at least {RSS_USED} needed")
    step = RSS_SERVICES // RSS_USED
    return [i * step + i % step for i in range(RSS_USED)]


def rss_objects():
    """RSS_SERVICES Services in 100 namespaces, each with RSS_ENDPOINTS ready endpoints on port
    80; the used ones have the ten addresses nginx listens on, the others addresses no host has."""
    used = set(rss_used())
    objects = []
    for i in range(RSS_SERVICES):
        endpoints = REAL_ENDPOINTS if i in used else \
            [rss_fake_endpoint(i * RSS_ENDPOINTS + j) for j in range(RSS_ENDPOINTS)]
        objects += service_objects(f"team-{i % 100:02d}", f"svc-{i:05d}", rss_cluster_ip(i),
                                   endpoints, [("http", H1_PORT, H1_PORT)])
    return objects


def rss_drive(seat, hosts):
    """RSS_REQUESTS keep-alive HTTP/1.1 requests to each of `hosts` in turn, all answered.
    First one request alone, tried up to five times: remora-proxy asks remora-control about a
    ClusterIP on its first connection there and fails open without an answer within a second
    (no host has these ClusterIPs). Returns how many of those first tries failed."""
    misses = 0
    for host in hosts:
        for _ in range(5):
            check = run(seat.client(["curl", "-sS", "-m", "5", f"http://{host}:{H1_PORT}/"]),
                        check=False)
            if "hello" in check.stdout:
                break
            misses += 1
        else:
            raise BenchError(f"{seat_label(seat.name)}: no answer from {host}: "
                             f"{check.stderr.strip()[:300]}")
        out = run(seat.client(["h2load", "--h1", "-n", str(RSS_REQUESTS), "-c", "4", "-t", "1",
                               f"http://{host}:{H1_PORT}/"]), timeout=120, check=False)
        res = parse_h2load(out.stdout)
        if res["errors"] or res["requests"] != RSS_REQUESTS:
            raise BenchError(f"{seat_label(seat.name)} to {host}: {res['requests']:,} of "
                             f"{RSS_REQUESTS:,} requests answered 2xx")
    return misses


def flaky_tries(work):
    """The requests nginx's flaky port has logged so far: the tries it got."""
    try:
        with open(work / "flaky-access.log", "rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def metric_sum(text, name, service):
    """The sum of the series `name` of Service `service` in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and f'service="{service}"' in line:
            total += float(line.split()[-1])
    return total


def bench_retry(pod, work):
    """Issue 25: RETRY_RATE requests a second for SECONDS (a fixed count, so none is cut off)
    to endpoints that fail 30 % of the requests with 503, through remora-proxy (the Service with
    `retry-on: 5xx`, every other annotation at its default: 2 attempts, budget 20%,10/s) and
    through HAProxy (`retry-on 503`, `retries 2`): the client's success rate and the load
    multiplier, the tries the endpoints logged per client request. Without retries both would
    be 70 % and 1.00; with two retries each and no budget, 97.3 % and 1.39."""
    objects = service_objects(SERVICE_NS, RETRY_SERVICE_NAME, RETRY_CLUSTER_IP,
                              SERVICE_ENDPOINTS, [("http", FLAKY_PORT, FLAKY_PORT)],
                              {"remora.io/retry-on": "5xx"})
    control = start_control(pod, work, objects, "retry")
    url = f"http://{RETRY_CLUSTER_IP}:{FLAKY_PORT}/"
    requests = RETRY_RATE * SECONDS
    argv = ["oha", "-n", str(requests), "-q", str(RETRY_RATE), "-c", "10", "--no-tui",
            "--output-format", "json", url]
    seats = ["remora-svc", "haproxy-retry"]
    rounds = []
    try:
        for r in range(ROUNDS):
            order = seats[r % len(seats):] + seats[:r % len(seats)]
            results = {}
            for name in order:
                seat = Seat(name, pod, work)
                seat.start()
                try:
                    # remora-proxy fails open for a second before its first snapshot.
                    for _ in range(5):
                        check = run(seat.client(["curl", "-sS", "-m", "5", url]), check=False)
                        if "hello" in check.stdout or "injected" in check.stdout:
                            break
                    else:
                        raise BenchError(f"no answer through {seat_label(name)} to {url}: "
                                         f"{check.stderr.strip()[:300]}")
                    metrics0 = service_metrics(seat) if name == "remora-svc" else ""
                    tries0, cpu0 = flaky_tries(work), seat.cpu()
                    out = run(seat.client(argv), timeout=SECONDS + 60, check=False)
                    cpu1 = seat.cpu()
                    if out.returncode != 0:
                        raise BenchError(f"oha failed ({out.returncode}): {out.stderr[-300:]}")
                    time.sleep(0.5)  # nginx writes a request's line once it is answered
                    tries = flaky_tries(work) - tries0
                    codes = json.loads(out.stdout).get("statusCodeDistribution") or {}
                    answered = sum(codes.values())
                    x = {"requests": requests, "answered": answered,
                         "ok": codes.get("200", 0), "tries": tries,
                         "success_pct": 100.0 * codes.get("200", 0) / max(requests, 1),
                         "multiplier": tries / max(answered, 1),
                         "cpu_s_per_1k": (cpu1 - cpu0) / max(answered, 1) * 1000}
                    if name == "remora-svc":
                        metrics1 = service_metrics(seat)
                        for key, series in (("retries", "remora_proxy_retries_total"),
                                            ("budget_exhausted",
                                             "remora_proxy_retry_budget_exhausted_total")):
                            x[key] = metric_sum(metrics1, series, RETRY_SERVICE_NAME) \
                                - metric_sum(metrics0, series, RETRY_SERVICE_NAME)
                    results[name] = x
                    log(f"  retry, {seat_label(name)}: success {x['success_pct']:.1f} %, "
                        f"load multiplier {x['multiplier']:.3f}")
                finally:
                    seat.stop()
            rounds.append(results)
    finally:
        JANITOR.stop(control)
    summary = {}
    for name in seats:
        runs = [r[name] for r in rounds if name in r]
        summary[name] = {key: median([x.get(key) for x in runs])
                         for key in ("success_pct", "multiplier", "cpu_s_per_1k", "retries",
                                     "budget_exhausted", "answered")}
    return {"rounds": rounds, "summary": summary, "rate": RETRY_RATE, "seconds": SECONDS}


def bench_rss(pod, work):
    """remora-proxy's VmRSS, per round in fresh processes: idle without --control; after the
    same traffic to the ten endpoint addresses directly (passthrough); idle with --control; and
    with --control after RSS_REQUESTS requests to each of ten of RSS_SERVICES Services
    (10 endpoints each) that remora-control serves. Lazy discovery should keep the last within
    1 MiB of idle: the proxy holds the ten Services it uses, not the cluster."""
    t0 = time.monotonic()
    control = start_control(pod, work, rss_objects(), "rss")
    res = {"services": RSS_SERVICES, "endpoints_per_service": RSS_ENDPOINTS,
           "services_used": RSS_USED, "requests_per_service": RSS_REQUESTS,
           "control_ready_s": round(time.monotonic() - t0, 1), "rounds": []}
    used = [rss_cluster_ip(i) for i in rss_used()]
    try:
        for _ in range(ROUNDS):
            r = {}
            for name, hosts, prefix in (("remora", REAL_ENDPOINTS, "plain"),
                                        ("remora-svc", used, "control")):
                seat = Seat(name, pod, work)
                seat.start()
                try:
                    time.sleep(0.5)
                    r[f"{prefix}_idle_kib"] = seat.rss_kib("VmRSS")
                    r[f"{prefix}_idle_anon_kib"] = seat.rss_kib("RssAnon")
                    r[f"{prefix}_idle_file_kib"] = seat.rss_kib("RssFile")
                    r[f"{prefix}_first_misses"] = rss_drive(seat, hosts)
                    time.sleep(1)
                    r[f"{prefix}_after_kib"] = seat.rss_kib("VmRSS")
                    # Which part grew: the heap and stacks, or the binary's pages run for the first time.
                    r[f"{prefix}_after_anon_kib"] = seat.rss_kib("RssAnon")
                    r[f"{prefix}_after_file_kib"] = seat.rss_kib("RssFile")
                    r[f"{prefix}_peak_kib"] = seat.rss_kib("VmHWM")
                    if name == "remora-svc":
                        text = service_metrics(seat)
                        known = [l for l in text.splitlines()
                                 if l.startswith("remora_proxy_balancer_endpoints{")]
                        full = [l for l in known if l.split()[-1] == str(len(REAL_ENDPOINTS))]
                        r["services_known"] = len(known)
                        if len(full) != RSS_USED:
                            raise BenchError(f"remora-proxy balances {len(full)} of the "
                                             f"{RSS_USED} Services it used: {known[:3]}")
                    if seat.proc.poll() is not None:
                        raise BenchError(f"{seat_label(name)} exited ({seat.proc.returncode})")
                finally:
                    seat.stop()
            res["rounds"].append(r)
        res["control_rss_kib"] = proc_status_kib(control.pid, "VmRSS")
    finally:
        JANITOR.stop(control)
    keys = [f"{prefix}_{when}{part}_kib" for prefix in ("plain", "control")
            for when in ("idle", "after") for part in ("", "_anon", "_file")] + ["control_peak_kib"]
    for key in keys:
        res[key] = median([r[key] for r in res["rounds"]])
    res["growth_over_idle_mib"] = (res["control_after_kib"] - res["plain_idle_kib"]) / 1024
    res["growth_over_control_idle_mib"] = (res["control_after_kib"] - res["control_idle_kib"]) / 1024
    res["growth_over_passthrough_mib"] = (res["control_after_kib"] - res["plain_after_kib"]) / 1024
    # The heap and stacks are the pod's own memory and what would grow with the cluster; the
    # binary's pages run for the first time are clean, reclaimable and shared by every proxy
    # on the node running the same image.
    res["anon_growth_over_idle_mib"] = (res["control_after_anon_kib"]
                                        - res["plain_idle_anon_kib"]) / 1024
    res["file_growth_over_idle_mib"] = (res["control_after_file_kib"]
                                        - res["plain_idle_file_kib"]) / 1024
    return res


# ---------------------------------------------------------------------------------------------
# remora-init: wall time of one run in a fresh namespace.


def bench_init(work):
    """Per backend, with no exclusions and with 50 per family (the mix of tests/tests/init.rs:
    20 outbound ports, 15 inbound ports, 15 CIDRs): a cleanup before every timed run, so each
    one really applies. Per family: the `elapsed_ms` remora-init logs for its own
    save-diff-restore; whole process: wall time of the run, via nsenter."""
    binary = BIN_DIR / "remora-init"
    if not binary.exists():
        return {"error": f"{binary} is missing"}
    runs = max(5, min(20, ROUNDS * 5))
    fifty = ["--exclude-outbound-ports", ",".join(str(20000 + i * 10) for i in range(20)),
             "--exclude-inbound-ports", ",".join(str(30000 + i * 10) for i in range(15)),
             "--exclude-outbound-cidrs",
             ",".join([f"198.19.{i}.0/24" for i in range(15)]
                      + [f"2001:2:0:{i:x}::/64" for i in range(15)])]
    applied = re.compile(r"\bapplied\b.*?family=(\S+).*?elapsed_ms=([\d.]+)")
    cases = {}
    for backend in ("nft", "legacy"):
        for label, extra in (("0", []), ("50", fifty)):
            args = ["--backend", backend, "--ipv6", "on"] + extra
            ns = JANITOR.netns(f"{PREFIX}-init")
            # nsenter joins the network namespace only: less overhead than `ip netns exec`,
            # which also remounts /sys.
            init = lambda *more: run(["nsenter", f"--net=/run/netns/{ns}", binary, *args, *more],
                                     timeout=30, env={**os.environ, "NO_COLOR": "1"})
            fam, whole = {}, []
            try:
                for _ in range(2):  # module loading and cold caches are not the steady state
                    init()
                    init("--cleanup")
                for _ in range(runs):
                    init("--cleanup")
                    t0 = time.perf_counter()
                    out = init()
                    whole.append((time.perf_counter() - t0) * 1e3)
                    for family, ms in applied.findall(out.stderr + out.stdout):
                        fam.setdefault(family, []).append(float(ms))
                if "REMORA_" not in nat_rules(ns) or "REMORA_" not in nat_rules(ns, 6):
                    raise BenchError("remora-init ran but left no REMORA_ chains in a family")
                rules = nat_rules(ns).count("-A REMORA_")
            except BenchError as e:
                cases[f"{backend}, {label} exclusions"] = {"error": str(e)[:300]}
                continue
            finally:
                JANITOR.delete_netns(ns)
            cases[f"{backend}, {label} exclusions"] = {
                "backend": backend, "exclusions_per_family": int(label), "runs": runs,
                "ipv4_rules": rules,
                "per_family_median_ms": {f: median(v) for f, v in sorted(fam.items())},
                "per_family_max_ms": {f: max(v) for f, v in sorted(fam.items())},
                "whole_process_median_ms": median(whole),
            }
    base = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(["nsenter", "--net=/proc/self/ns/net", "true"])
        base.append((time.perf_counter() - t0) * 1e3)
    return {"cases": cases, "spawn_overhead_ms": median(base)}


# ---------------------------------------------------------------------------------------------
# Two-hop seats (issue 26): the path between two meshed pods. The client runs in the pod
# namespace behind remora-init's rules, as in every seat; the server pod is a namespace of its
# own (SERVER_NS), also behind remora-init's rules (every inbound port to 15006), with nginx on
# its own addresses. A request goes client -> the client pod's proxy (outbound, 15001) -> the
# server pod's proxy (inbound, 15006) -> nginx on the server pod's own address, from the proxy
# uid. The client sends to a Service's ClusterIP, whose one endpoint is the server pod.
#   remora-pair, haproxy-pair: plaintext between the two proxies;
#   remora-mtls, haproxy-mtls: mTLS between them (TLS 1.3, ALPN remora/1).
# remora-proxy learns the endpoint from a remora-control of these seats' own, which marks it
# meshed or not: the server pod has two addresses, SERVER_MESHED_V4 (in its Pod object's
# status.podIPs, the identity in the Pod's remora.io/status annotation, named by the
# EndpointSlice's targetRef) and SERVER_PLAIN_V4 (no Pod behind it), each the endpoint of one
# Service. The same proxies with the same flags (both with a certificate) and the same nginx:
# only the endpoint's marking differs between remora-pair and remora-mtls. HAProxy lists the
# same endpoint statically, with TLS on both sides or none.

PAIR_SEATS = ("remora-pair", "remora-mtls", "haproxy-pair", "haproxy-mtls")
MTLS_SEATS = ("remora-mtls", "haproxy-mtls")
SEAT_NAMES.update({"remora-pair": "remora-proxy pair", "remora-mtls": "remora-proxy pair (mTLS)",
                   "haproxy-pair": "HAProxy pair", "haproxy-mtls": "HAProxy pair (TLS)"})
SERVER_NS = f"{PREFIX}-server"
INBOUND_PORT = 15006
# The client pod's address on its link to the server pod, where the seats' remora-control
# listens (both proxies reach it from the proxy uid, which the rules leave alone).
POD_LINK_V4 = "198.18.1.1"
SERVER_MESHED_V4, SERVER_PLAIN_V4 = "198.18.1.2", "198.18.1.3"
# By mTLS or not: the Service's ClusterIP, and the client's source address toward it (its own
# per ClusterIP, for the reason given at POD_SERVICE_SRC_V4).
PAIR_CLUSTER_IPS = {False: "198.18.0.110", True: "198.18.0.111"}
PAIR_SOURCES = {False: "198.18.1.252", True: "198.18.1.253"}
PAIR_SERVICES = {False: "server-plain", True: "server-mtls"}
PAIR_CONTROL_LISTEN, PAIR_CONTROL_ADMIN = f"{POD_LINK_V4}:8091", "127.0.0.1:9991"
TRUST_DOMAIN = "cluster.local"
ALPN = "remora/1"
# The two pods as the downward API and the token file name them: (namespace, pod,
# ServiceAccount).
CLIENT_POD = (POD_IDENTITY["POD_NAMESPACE"], POD_IDENTITY["POD_NAME"], "client")
SERVER_POD = ("bench", "bench-server-0", "server")
KNOWN_PARTS.add("issuance")


def spiffe(namespace, sa):
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"


HELP_TEXTS = {}


def supports(argv, flag):
    """Whether a binary's --help names `flag`: the identity flags come with issue 26's merge,
    and a build without them still runs the plaintext seats."""
    key = tuple(map(str, argv))
    if key not in HELP_TEXTS:
        out = run(list(key) + ["--help"], check=False)
        HELP_TEXTS[key] = out.stdout + out.stderr
    return flag in HELP_TEXTS[key]


def make_ca(directory):
    """A throwaway CA (ECDSA P-256, PKCS#8 key) in `directory`: ca.crt, ca.key."""
    directory.mkdir(parents=True, exist_ok=True)
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/O=remora bench/CN=remora bench identity CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", directory / "ca.key", "-out", directory / "ca.crt"])
    return directory / "ca.crt", directory / "ca.key"


def make_leaf(directory, name, uri):
    """A certificate for `uri` (its only SAN) signed by the CA in `directory`, with its key in
    one PEM file as HAProxy's `crt` takes it: name.pem."""
    key, csr, crt = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName=URI:{uri}\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n")
    run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-subj", f"/CN={name}", "-keyout", key, "-out", csr])
    run(["openssl", "x509", "-req", "-in", csr, "-CA", directory / "ca.crt", "-CAkey",
         directory / "ca.key", "-CAcreateserial", "-days", "1", "-extfile", ext, "-out", crt])
    pem = directory / f"{name}.pem"
    pem.write_text(crt.read_text() + key.read_text())
    os.chmod(pem, 0o644)  # read by HAProxy as the proxy uid, in a throwaway directory
    return pem


def meshed_pod(namespace, name, sa, ips):
    """A Pod as the API server would store an injected one: its identity in remora.io/status."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "annotations": {
                "remora.io/status": json.dumps({"identity": spiffe(namespace, sa)})}},
            "spec": {"serviceAccountName": sa, "containers": []},
            "status": {"podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]} if ips else {}}


def pair_objects():
    """The two Services of the two-hop seats, one endpoint each on the server pod: the meshed
    one's names the server Pod (targetRef), the plaintext one's names no Pod (a Service without
    a selector, say); and the two Pods."""
    ports = [("http", H1_PORT, H1_PORT), ("h2", H2_PORT, H2_PORT)]
    plain = service_objects(SERVICE_NS, PAIR_SERVICES[False], PAIR_CLUSTER_IPS[False],
                            [SERVER_PLAIN_V4], ports)
    meshed = service_objects(SERVICE_NS, PAIR_SERVICES[True], PAIR_CLUSTER_IPS[True],
                             [SERVER_MESHED_V4], ports)
    del plain[1]["endpoints"][0]["targetRef"]
    meshed[1]["endpoints"][0]["targetRef"].update(namespace=SERVER_POD[0], name=SERVER_POD[1])
    return plain + meshed + [meshed_pod(*SERVER_POD, [SERVER_MESHED_V4]),
                             meshed_pod(*CLIENT_POD, [POD_V4])]


class PairSetup:
    """What the two-hop seats share for a whole run: the server pod (namespace, rules, nginx),
    the identity files and their remora-control."""

    def __init__(self, pod, work):
        self.dir = work / "pair"
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        ns = JANITOR.netns(SERVER_NS)
        run(["ip", "-n", pod, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0",
             "netns", ns])
        run(["ip", "-n", pod, "addr", "add", f"{POD_LINK_V4}/24", "dev", "eth1"])
        for addr in PAIR_SOURCES.values():
            run(["ip", "-n", pod, "addr", "add", f"{addr}/24", "dev", "eth1"])
        for addr in (SERVER_MESHED_V4, SERVER_PLAIN_V4):
            run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
        for name, dev in ((pod, "eth1"), (ns, "eth0")):
            run(["ip", "-n", name, "link", "set", dev, "up"])
        run(in_ns(ns, ["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                       "net.ipv4.ip_local_port_range=1024 65000",
                       "net.ipv4.ip_local_reserved_ports=15000-15099"]))
        for mtls, cluster_ip in PAIR_CLUSTER_IPS.items():
            run(["ip", "-n", pod, "route", "add", f"{cluster_ip}/32", "dev", "eth1",
                 "src", PAIR_SOURCES[mtls]])
        self.rules = apply_rules(ns)
        self.nginx = self.start_nginx(ns)
        exempt_control_port(pod)
        # Identity: a CA for remora-control (and for HAProxy's certificates), the two pods'
        # tokens in kube-apiserver's static token file format.
        self.ca_cert, self.ca_key = make_ca(self.dir)
        self.tokens = self.dir / "tokens.csv"
        self.token_files = {}
        lines = []
        for namespace, pod_name, sa in (CLIENT_POD, SERVER_POD):
            token = f"bench-{sa}-token"
            lines.append(f"{token},system:serviceaccount:{namespace}:{sa},uid-{sa}")
            path = self.dir / f"{sa}.token"
            path.write_text(token + "\n")
            os.chmod(path, 0o644)
            self.token_files[pod_name] = path
        self.tokens.write_text("\n".join(lines) + "\n")
        self.haproxy_pems = {sa: make_leaf(self.dir, sa, spiffe(namespace, sa))
                             for namespace, _, sa in (CLIENT_POD, SERVER_POD)}
        self.control = None
        if any(s.startswith("remora-") for s in SEATS if s in PAIR_SEATS):
            binary = BIN_DIR / "remora-control"
            extra = []
            if supports([binary, "serve"], "--identity-tokens"):
                extra = ["--ca-cert", self.ca_cert, "--ca-key", self.ca_key,
                         "--identity-tokens", self.tokens]
            elif "remora-mtls" in SEATS:
                log("remora-control has no --identity-tokens: no certificates, so remora-mtls "
                    "will fail (remora-pair runs)")
            self.control = start_control(pod, work, pair_objects(), "pair",
                                         listen=PAIR_CONTROL_LISTEN, admin=PAIR_CONTROL_ADMIN,
                                         extra=extra)

    def start_nginx(self, ns):
        """nginx in the server pod, on both its addresses."""
        directory = self.dir / "nginx"
        directory.mkdir()
        os.chmod(directory, 0o755)
        return start_nginx(ns, directory, addrs=[SERVER_MESHED_V4, SERVER_PLAIN_V4])


def exempt_control_port(pod):
    """The seats' remora-control stands for a control plane in a pod of its own, but runs in the
    client pod's namespace: keep that pod's inbound rules (everything to 15006) off its port, or
    the server pod's proxy would reach it only through the client pod's proxy. One rule ahead
    of remora-init's jump, in the iptables backend remora-init wrote to."""
    host, port = PAIR_CONTROL_LISTEN.rsplit(":", 1)
    for backend in ("nft", "legacy"):
        save, binary = f"iptables-{backend}-save", f"iptables-{backend}"
        if shutil.which(save) and shutil.which(binary) \
                and "REMORA_" in run(in_ns(pod, [save, "-t", "nat"]), check=False).stdout:
            run(in_ns(pod, [binary, "-t", "nat", "-I", "PREROUTING", "1", "-p", "tcp", "-d",
                            host, "--dport", port, "-j", "ACCEPT"]))
            return
    raise BenchError("no REMORA_ rules in the pod namespace to put the control port ahead of")


PAIR = None  # the PairSetup of this run, once made


def start_pair(pod, work):
    global PAIR
    PAIR = PairSetup(pod, work)
    return PAIR


def admin_get(ns, path):
    return run(in_ns(ns, ["curl", "-sS", "-m", "2", f"http://127.0.0.1:{ADMIN_PORT}{path}"]),
               check=False)


def metric_sum(text, name, *labels):
    """The sum of `name`'s series whose labels include every one of `labels` (`key="value"`)."""
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(label in line for label in labels):
                total = (total or 0) + float(line.split()[-1])
    return total


class PairSeat(Seat):
    """Two proxies in one seat: the client pod's (outbound) and the server pod's (inbound). CPU
    and RSS are both processes' together."""

    server_ns = SERVER_NS

    def __init__(self, name, pod, work):
        super().__init__(name, pod, work)
        self.mtls = name in MTLS_SEATS
        self.server = None

    @property
    def host(self):
        return PAIR_CLUSTER_IPS[self.mtls]

    def start(self):
        # run_load stops a seat only once it started: a seat that fails half-way must not leave
        # a proxy holding the next seat's ports.
        try:
            self.start_both()
        except BaseException:
            self.stop()
            raise
        time.sleep(0.5)

    def start_both(self):
        endpoint = SERVER_MESHED_V4 if self.mtls else SERVER_PLAIN_V4
        if self.name.startswith("haproxy"):
            tls = lambda sa: (f"ssl crt {PAIR.haproxy_pems[sa]} ca-file {PAIR.ca_cert} verify "
                              f"required alpn {ALPN} ssl-min-ver TLSv1.3") if self.mtls else ""
            server = self.haproxy_conf("server", listen=f"0.0.0.0:{INBOUND_PORT}",
                                       tls=tls(SERVER_POD[2]))
            client = self.haproxy_conf("client", listen=f"127.0.0.1:{OUTBOUND_PORT}",
                                       tls=tls(CLIENT_POD[2]), server=endpoint)
            self.server = self.spawn(SERVER_NS, ["haproxy", "-db", "-f", server], "server",
                                     lambda: listening(SERVER_NS, INBOUND_PORT, "0.0.0.0"))
            self.proc = self.spawn(self.pod, ["haproxy", "-db", "-f", client], "client",
                                   lambda: listening(self.pod, OUTBOUND_PORT))
        else:
            binary = BIN_DIR / "remora-proxy"
            if not binary.exists():
                raise BenchError(f"{binary} is missing (make release)")
            check_own_build(binary)

            def argv(pod_name):
                flags = ["--control", PAIR_CONTROL_LISTEN, "--control-plaintext"]
                if supports([binary], "--identity-token"):
                    flags += ["--identity-token", PAIR.token_files[pod_name]]
                return [binary] + flags + os.environ.get("BENCH_REMORA_ARGS_pair", "").split()

            ready = lambda ns, port, addr: listening(ns, port, addr) and run(
                in_ns(ns, ["curl", "-sf", "-m", "1", f"http://127.0.0.1:{ADMIN_PORT}/ready"]),
                check=False).returncode == 0
            self.server = self.spawn(SERVER_NS, argv(SERVER_POD[1]), "server",
                                     lambda: ready(SERVER_NS, INBOUND_PORT, "0.0.0.0"),
                                     env={"POD_NAMESPACE": SERVER_POD[0],
                                          "POD_NAME": SERVER_POD[1]})
            self.proc = self.spawn(self.pod, argv(CLIENT_POD[1]), "client",
                                   lambda: ready(self.pod, OUTBOUND_PORT, "127.0.0.1"),
                                   env={"POD_NAMESPACE": CLIENT_POD[0],
                                        "POD_NAME": CLIENT_POD[1]})
            if self.mtls:
                self.wait_for_certificates()

    def haproxy_conf(self, role, listen, tls, server=""):
        conf = (HERE / f"haproxy-pair-{role}.cfg.in").read_text() \
            .replace("@LISTEN@", listen).replace("@TLS@", tls).replace("@SERVER@", server) \
            .replace("@H1_PORT@", str(H1_PORT)).replace("@H2_PORT@", str(H2_PORT))
        path = self.work / f"{self.name}-{role}.cfg"
        path.write_text(conf)
        return path

    def spawn(self, ns, argv, role, ready, env=None):
        """One of the seat's two proxies, as the proxy uid in `ns`, ready."""
        log_path = self.work / f"{self.name}-{role}.log"
        proc = JANITOR.spawn(CGROUPS.wrap("proxy", in_ns(ns, argv, uid=PROXY_UID)),
                             log_path=log_path, env={**os.environ, **(env or {})})
        if not wait_until(15, lambda: proc.poll() is not None or ready()) \
                or proc.poll() is not None:
            JANITOR.stop(proc)
            tail = log_path.read_text(errors="replace")[-600:]
            raise BenchError(f"{seat_label(self.name)}: the {role} pod's proxy did not become "
                             f"ready (exit {proc.returncode}): {tail.strip()}")
        return proc

    def wait_for_certificates(self):
        """Both proxies hold a workload certificate (the identity gauge above 0), or the seat
        fails: without one they would talk plaintext and the figures would be remora-pair's."""
        def expiry(ns):
            return metric_sum(admin_get(ns, "/metrics").stdout,
                              "remora_proxy_identity_expiration_timestamp_seconds") or 0
        if not wait_until(20, lambda: expiry(SERVER_NS) > 0 and expiry(self.pod) > 0, step=0.2):
            logs = " | ".join(f"{role}: " + (self.work / f"{self.name}-{role}.log")
                              .read_text(errors="replace")[-300:].strip()
                              for role in ("client", "server"))
            raise BenchError(f"{seat_label(self.name)}: no workload certificate within 20 s "
                             f"(remora_proxy_identity_expiration_timestamp_seconds: client "
                             f"{expiry(self.pod)}, server {expiry(SERVER_NS)}); logs: {logs}")

    def check_load(self, load, res):
        """After a load through remora-proxy: the server pod's proxy took every inbound
        connection over mTLS (remora-mtls) or none (remora-pair), by the `tls` label of
        remora_proxy_tcp_connections_total."""
        if not self.name.startswith("remora"):
            return
        text = admin_get(SERVER_NS, "/metrics").stdout
        name = "remora_proxy_tcp_connections_total"
        counts = {tls: metric_sum(text, name, 'direction="inbound"', f'tls="{tls}"')
                  for tls in ("true", "false")}
        res["inbound_connections_by_tls"] = counts
        if self.mtls and not (counts["true"] and not counts["false"]):
            raise BenchError(f"{seat_label(self.name)}, {load}: the server pod's proxy counted "
                             f"inbound connections tls=true {counts['true']}, tls=false "
                             f"{counts['false']}: not (only) mTLS")
        if not self.mtls and counts["true"]:
            raise BenchError(f"{seat_label(self.name)}, {load}: {counts['true']:.0f} inbound "
                             "connections over mTLS to an endpoint not marked meshed")

    def stop(self):
        super().stop()
        if self.server:
            JANITOR.stop(self.server)
            self.server = None

    def rss_kib(self, field):
        if not (self.proc and self.server):
            return None
        return proc_status_kib(self.proc.pid, field) + proc_status_kib(self.server.pid, field)

    def cpu(self):
        if not (self.proc and self.server):
            return None
        return proc_cpu_seconds(self.proc.pid) + proc_cpu_seconds(self.server.pid)

    def cpu_user(self):
        if not (self.proc and self.server):
            return None
        return proc_user_seconds(self.proc.pid) + proc_user_seconds(self.server.pid)


def make_seat(name, pod, work):
    return PairSeat(name, pod, work) if name in PAIR_SEATS else Seat(name, pod, work)


def pair_ratio_cols(seats):
    """The proxy table's ratio columns for the two-hop seats."""
    cols = []
    for a, b in (("remora-mtls", "remora-pair"), ("remora-mtls", "haproxy-mtls"),
                 ("haproxy-mtls", "haproxy-pair"), ("remora-pair", "haproxy-pair")):
        if a in seats and b in seats:
            cols.append((a, b, f"{seat_label(a)} / {seat_label(b)}"))
    return cols


# What the two-hop section compares: (key in a seat's summary, label, unit).
PAIR_METRICS = [
    ("rps", "throughput, wrk 50 connections (req/s)", "req/s"),
    ("h2_rps", "HTTP/2, h2load 10 x 10 (req/s)", "req/s"),
    ("newconn_rps", "new connection per request (req/s)", "req/s"),
    ("p50_1000", "p50 at 1000 rps (ms)", "ms"),
    ("p99_1000", "p99 at 1000 rps (ms)", "ms"),
    ("cpu_per_1k", "CPU s / 1000 req, both proxies (wrk)", "s"),
    ("cpu_per_1k_1000rps", "CPU s / 1000 req, both proxies (1000 rps)", "s"),
    ("cpu_per_1k_newconn", "CPU s / 1000 req, both proxies (new conn)", "s"),
    ("cpu_per_1k_h2", "CPU s / 1000 req, both proxies (h2)", "s"),
    ("peak_rss_all", "peak RSS, both proxies, all loads (MiB)", "MiB"),
]
PAIR_COMPARISONS = (("remora-mtls", "remora-pair"), ("haproxy-mtls", "haproxy-pair"),
                    ("remora-mtls", "haproxy-mtls"), ("remora-pair", "haproxy-pair"))


def summarize_pair(summary, rounds):
    """Each comparison of two two-hop seats that both ran: the medians side by side, their
    ratio, and the latency one adds over the other at 1000 rps, paired per round."""
    out = {}
    for a, b in PAIR_COMPARISONS:
        if a not in summary or b not in summary:
            continue
        row = {key: {"a": summary[a].get(key), "b": summary[b].get(key),
                     "ratio": ratio(summary[a].get(key), summary[b].get(key))}
               for key, _, _ in PAIR_METRICS}
        for pct in ("p50", "p99"):
            diffs = [x - y for r in rounds
                     if (x := get(r.get(a, {}), f"latency_1000rps.{pct}_ms")) is not None
                     and (y := get(r.get(b, {}), f"latency_1000rps.{pct}_ms")) is not None]
            row[f"added_{pct}_1000"] = median(diffs)
        out[f"{a} / {b}"] = {"a": a, "b": b, "rows": row}
    return out


def pair_targets(pair):
    """Issue 26's targets: mTLS against plaintext through remora-proxy, and against HAProxy with
    TLS on both sides in the same seats."""
    out = []

    def check(name, value, ok, shown):
        out.append({"target": name, "value": shown,
                    "met": None if value is None or ok is None else bool(ok)})

    shown_ratio = lambda x: f"{x:.3f}x" if x is not None else "n/a"
    plain = (pair or {}).get("remora-mtls / remora-pair")
    if plain:
        rows = plain["rows"]
        for key, load, goal in (("rps", "keep-alive HTTP/1, wrk", 0.8), ("h2_rps", "HTTP/2", 0.8),
                                ("newconn_rps", "new connection per request", 0.5)):
            x = rows[key]["ratio"]
            check(f"mTLS: throughput ({load}) >= {goal}x plaintext", x,
                  None if x is None else x >= goal, shown_ratio(x))
        a = rows["added_p50_1000"]
        check("mTLS: added p50 at 1000 rps <= +0.1 ms over plaintext", a,
              None if a is None else a <= 0.1, f"{a:+.3f} ms" if a is not None else "n/a")
    haproxy = (pair or {}).get("remora-mtls / haproxy-mtls")
    if haproxy:
        rows = haproxy["rows"]
        for key, load in (("rps", "wrk"), ("h2_rps", "HTTP/2")):
            x = rows[key]["ratio"]
            check(f"mTLS: throughput ({load}) >= 1.0x HAProxy (TLS both sides)", x,
                  None if x is None else x >= 1.0, shown_ratio(x))
        for key, load in (("cpu_per_1k", "wrk"), ("cpu_per_1k_1000rps", "1000 rps"),
                          ("cpu_per_1k_newconn", "new conn"), ("cpu_per_1k_h2", "h2")):
            a, b = rows[key]["a"], rows[key]["b"]
            if a is None and b is None:
                continue
            check(f"mTLS: CPU s / 1000 req, both proxies ({load}) <= HAProxy (TLS)'s", a,
                  None if a is None or b is None else a <= b,
                  f"{fmt(a, 's')} vs {fmt(b, 's')}" + (f" ({a / b:.3f}x)" if a and b else ""))
    return out


def render_pair(pair):
    """The two-hop section: each comparison as `a / b` with both figures."""
    if not pair:
        return []
    head = ["metric"] + [f"{seat_label(c['a'])} / {seat_label(c['b'])}" for c in pair.values()]
    rows = []
    for key, label, unit in PAIR_METRICS:
        row = [label]
        for c in pair.values():
            x = c["rows"][key]
            row.append(f"{x['ratio']:.2f}x ({fmt(x['a'], unit)} / {fmt(x['b'], unit)})"
                       if x["ratio"] is not None else "n/a")
        rows.append(row)
    for pct in ("p50", "p99"):
        rows.append([f"added {pct} at 1000 rps, paired per round (ms)"]
                    + [f"{v:+.3f}" if (v := c["rows"][f"added_{pct}_1000"]) is not None
                       else "n/a" for c in pair.values()])
    return ["## Two-hop seats: mTLS between meshed pods (issue 26)", "",
            "Client pod (remora-init's rules, outbound proxy) -> server pod (remora-init's rules, "
            "inbound proxy) -> nginx on the server pod's address, through a Service's ClusterIP. "
            "Pair: plaintext between the proxies; mTLS / TLS: TLS 1.3, ALPN remora/1, client "
            "certificates (remora-proxy's from remora-control; HAProxy's made with openssl, "
            "chain verified, no identity check). CPU and RSS: both proxies together. Ratios "
            "are a / b of the medians; added: a minus b.", "",
            markdown_table(head, rows), ""]


# ---------------------------------------------------------------------------------------------
# issuance: N proxies asking remora-control for their certificates at once (issue 26).

ISSUE_PROXIES = int(os.environ.get("BENCH_ISSUE_PROXIES", "1000"))
ISSUE_LISTEN, ISSUE_ADMIN = "127.0.0.1:8090", "127.0.0.1:9990"


def bench_issuance(work):
    """remora-control with a CA and ISSUE_PROXIES tokens (100 ServiceAccounts over 10
    namespaces, one meshed Pod each), in a namespace of its own; per round, certify_burst.py
    sends every proxy's Certify at once (keys and connections made first) and times until the
    last certificate arrived, checking each."""
    binary = BIN_DIR / "remora-control"
    if not binary.exists():
        return {"error": f"{binary} is missing"}
    if not supports([binary, "serve"], "--identity-tokens"):
        return {"error": "this remora-control has no --identity-tokens (no identity service)"}
    directory = work / "issuance"
    ca_cert, ca_key = make_ca(directory)
    proxies = [(f"burst-{i % 10}", f"sa-{i % 100}", i) for i in range(ISSUE_PROXIES)]
    tokens = directory / "tokens.csv"
    tokens.write_text("".join(f"burst-token-{i},system:serviceaccount:{ns}:{sa},uid-{i}\n"
                              for ns, sa, i in proxies))
    pods = [meshed_pod(ns, f"{sa}-pod-{i}", sa, []) for ns, sa, i in proxies]
    ns = JANITOR.netns(f"{PREFIX}-ca")
    control = None
    try:
        control = start_control(ns, work, pods, "issuance", listen=ISSUE_LISTEN,
                                admin=ISSUE_ADMIN, extra=["--ca-cert", ca_cert, "--ca-key", ca_key,
                                                          "--identity-tokens", tokens])
        issued = lambda: metric_sum(run(in_ns(ns, ["curl", "-sS", "-m", "2",
                                                   f"http://{ISSUE_ADMIN}/metrics"]),
                                        check=False).stdout,
                                    "remora_control_certificates_issued_total")
        res = {"proxies": ISSUE_PROXIES, "rounds": []}
        for _ in range(ROUNDS):
            cpu0, issued0 = proc_cpu_seconds(control.pid), issued()
            out = run(in_ns(ns, [sys.executable, HERE / "certify_burst.py", "--target",
                                 ISSUE_LISTEN, "--tokens", tokens, "--count", ISSUE_PROXIES]),
                      timeout=600, check=False)
            if out.returncode != 0:
                raise BenchError(f"certify_burst.py failed ({out.returncode}): "
                                 f"{out.stderr.strip()[-500:]}")
            r = json.loads(out.stdout)
            r["control_cpu_s"] = proc_cpu_seconds(control.pid) - cpu0
            issued1 = issued()
            r["issued_counted"] = None if issued1 is None else issued1 - (issued0 or 0)
            res["rounds"].append(r)
            log(f"  {r['certified']:,} of {r['proxies']:,} certified in "
                f"{fmt(r['last_answer_s'] * 1e3, 'ms')} ms (p50 {fmt(r['p50_ms'], 'ms')} ms, "
                f"control CPU {r['control_cpu_s']:.2f} s)")
        res["control_rss_kib"] = proc_status_kib(control.pid, "VmRSS")
        rs = res["rounds"]
        for key in ("all_certified_s", "last_answer_s", "p50_ms", "p99_ms", "max_ms",
                    "control_cpu_s", "connect_s", "issued_counted"):
            res[key] = median([r.get(key) for r in rs])
        res["errors"] = sum(r["errors"] for r in rs)
        res["first_errors"] = next((r["first_errors"] for r in rs if r["errors"]), [])
        return res
    finally:
        if control:
            JANITOR.stop(control)
        JANITOR.delete_netns(ns)


def render_issuance(res):
    if not res:
        return []
    md = ["## Certificate issuance (issue 26)", ""]
    if "error" in res:
        return md + [f"not measured: {res['error']}", ""]
    all_s = res.get("all_certified_s")
    return md + [
        "| metric | value |", "|---|---|",
        f"| proxies asking at once | {res['proxies']:,} |",
        f"| time until all have certificates (ms) | "
        f"{fmt(all_s * 1e3, 'ms') if all_s is not None else 'not all: see errors'} |",
        f"| one call p50 / p99 / max (ms) | {fmt(res['p50_ms'], 'ms')} / "
        f"{fmt(res['p99_ms'], 'ms')} / {fmt(res['max_ms'], 'ms')} |",
        f"| remora-control CPU for the burst (s) | {fmt(res['control_cpu_s'])} |",
        f"| its remora_control_certificates_issued_total grew by | "
        f"{fmt(res.get('issued_counted'), 'req/s')} |",
        f"| remora-control RSS after (MiB) | {fmt(res['control_rss_kib'] / 1024, 'MiB')} |",
        f"| failed or wrong answers | {res['errors']} {'; '.join(res['first_errors'])} |",
        "", f"Medians over {len(res['rounds'])} round(s). Each simulated proxy has its own P-256 "
        "key, CSR, token and gRPC connection (made before the burst, not timed: connecting took "
        f"{fmt(res['connect_s'])} s); every answer is checked (identity, URI SAN, this proxy's "
        "key). The client is Python (scripts/bench/certify_burst.py): its own time is in the "
        "figure.", ""]


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Profile mode: where remora-proxy's CPU goes under the wrk load, next to HAProxy's counters.


def fold_stacks(script_text):
    """`perf script` output to folded stacks (`frame;frame;leaf count`), for flamegraph tools."""
    folded, stack = {}, []
    for line in script_text.splitlines():
        if not line.strip():
            if stack:
                key = ";".join(reversed(stack))
                folded[key] = folded.get(key, 0) + 1
            stack = []
        elif line.startswith((" ", "\t")):
            parts = line.strip().split(None, 1)
            sym = parts[1] if len(parts) > 1 else parts[0]
            sym = re.sub(r"\+0x[0-9a-f]+ \(", " (", sym)
            stack.append(re.sub(r" \(.*\)$", "", sym) or "?")
        else:
            stack = []
    return folded


TCP_COUNTERS = ("Tcp:OutSegs", "Tcp:InSegs", "Tcp:RetransSegs", "TcpExt:DelayedACKs",
                "TcpExt:TCPPureAcks", "TcpExt:TCPHPAcks", "TcpExt:TCPAutoCorking")


def tcp_counters(ns):
    """The namespace's TCP counters (`/proc/net/snmp` and `/proc/net/netstat`) by `Group:Name`."""
    text = run(in_ns(ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"])).stdout
    lines, counters = text.splitlines(), {}
    for names, values in zip(lines[::2], lines[1::2]):
        group, *keys = names.split()
        for key, value in zip(keys, values.split()[1:]):
            counters[group + key] = int(value)
    return counters


def switch_counts(pid):
    """The process's context switches so far, summed over its threads: voluntary (it blocked)
    and involuntary (it was preempted), from /proc/<pid>/task/*/status."""
    counts = {"voluntary switches": 0, "involuntary switches": 0}
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key == "voluntary_ctxt_switches":
                counts["voluntary switches"] += int(value)
            elif key == "nonvoluntary_ctxt_switches":
                counts["involuntary switches"] += int(value)
    return counts


def perf_stat(seat, name, work, argv, parser, s):
    """Runs one load while `perf stat` counts the seat's process; counters per request, the
    process's voluntary and involuntary context switches, and the pod namespace's TCP segment
    counters per request."""
    events = "task-clock,context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter"
    log_path = work / f"{name}.stat"
    before = tcp_counters(seat.pod)
    switches = switch_counts(seat.proc.pid)
    stat = JANITOR.spawn(["perf", "stat", "-x", ",", "-e", events, "-p", str(seat.proc.pid),
                          "--", "sleep", str(s)], log_path=log_path)
    out = parser(run(seat.client(argv), timeout=s + 30).stdout)
    stat.wait(timeout=30)
    after = tcp_counters(seat.pod)
    counters = {}
    for key in TCP_COUNTERS:
        if key in after:
            counters[f"pod {key}"] = after[key] - before.get(key, 0)
    for key, value in switch_counts(seat.proc.pid).items():
        counters[key] = value - switches[key]
    for line in log_path.read_text().splitlines():
        f = line.split(",")
        if len(f) > 3 and f[0].replace(".", "").isdigit():
            counters[f[2]] = float(f[0])
    return out, counters


def strace_counts(seat, name, work, argv, parser, s):
    """Syscalls per request by name (`strace -c`; it slows the proxy, so only counts count)."""
    log_path = work / f"{name}.strace"
    tracer = JANITOR.spawn(["strace", "-c", "-f", "-o", log_path, "-p", str(seat.proc.pid)],
                           log_path=work / f"{name}.strace-log")
    time.sleep(0.5)
    out = parser(run(seat.client(argv), timeout=s + 30).stdout)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    lines = ["syscalls per request (strace -c, a separate run of the same load):", "", "```"]
    for line in log_path.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[3].isdigit():
            lines.append(f"{f[-1]:<16} {int(f[3]) / max(out['requests'], 1):8.3f}")
    return lines + ["```", ""]


def perf_record(seat, name, work, argv, s, report, tag):
    """Samples the seat's process with call graphs during one load; reports and folded stacks."""
    data = work / f"perf-{tag}.data"
    rec = JANITOR.spawn(["perf", "record", "-F", "499", "-g", "-o", data, "-p",
                         str(seat.proc.pid), "--", "sleep", str(s)], log_path=work / "record.log")
    run(seat.client(argv), timeout=s + 30)
    rec.wait(timeout=60)
    for title, args, limit in (
        ("self time by symbol", ["--no-children", "--sort", "dso,symbol", "-g", "none",
                                 "--percent-limit", "0.7"], 45),
        ("self time by shared object", ["--no-children", "--sort", "dso", "-g", "none",
                                        "--percent-limit", "0.5"], 15),
        ("inclusive time by symbol", ["--children", "--sort", "symbol", "-g", "none",
                                      "--percent-limit", "3"], 70),
        ("call graph of the hottest self time", ["--no-children", "--sort", "symbol",
                                                 "-g", "caller,2,callee", "--percent-limit", "4"],
         150),
    ):
        rep = run(["perf", "report", "-i", data, "--stdio"] + args, timeout=120).stdout
        lines = [l.rstrip() for l in rep.splitlines() if l.strip() and not l.startswith("#")]
        report += [f"### {seat_label(name)}, {tag}: {title}", "", "```"] + lines[:limit] \
            + ["```", ""]
    folded = fold_stacks(run(["perf", "script", "-i", data], timeout=300).stdout)
    path = RESULTS / f"profile-{PROFILE_STAMP}-{tag}.folded"
    path.write_text("".join(f"{k} {v}\n" for k, v in
                            sorted(folded.items(), key=lambda kv: -kv[1])))
    svg = path.with_suffix(".svg")
    run([sys.executable, HERE / "flamegraph.py", path, "-o", svg], check=False)
    report += [f"Folded stacks: {path}; flame graph: {svg}", ""]


PROFILE_STAMP = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def profile():
    """perf stat of HAProxy and remora-proxy, perf record of remora-proxy, under the keep-alive
    wrk load and the new-connection-per-request load."""
    binary = Path(os.environ.get("BENCH_PROFILE_BIN", BIN_DIR / "remora-proxy"))
    os.environ["BENCH_PROFILE_SEAT_BIN"] = str(binary)
    s = SECONDS
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    os.chmod(work, 0o755)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = [f"# proxy profile, {PROFILE_STAMP} (commit {git_commit()}, remora-proxy {binary})",
              ""]
    # The client command of each load is made per seat: a Service seat's goes to the ClusterIP.
    loads = {
        "keepalive": ("throughput", parse_wrk, "wrk, 50 keep-alive connections"),
        "latency": ("latency", parse_oha, "oha, a fixed 1000 rps over 10 keep-alive connections"),
        "newconn": ("newconn", parse_oha, "oha, a new connection per request, 10 concurrent"),
        "h2": ("h2", parse_h2load, "h2load, prior-knowledge h2c, 10 connections x 10 streams"),
    }
    only = os.environ.get("BENCH_PROFILE_LOADS")
    if only:
        loads = {k: v for k, v in loads.items() if k in only.split(",")}
    seats = os.environ.get("BENCH_PROFILE_SEATS", "haproxy,remora").split(",")
    record = os.environ.get("BENCH_PROFILE_RECORD", "remora").split(",")
    try:
        pod, remote = make_pod()
        start_nginx(remote, work)
        apply_rules(pod)
        if any(name in SERVICE_SEATS for name in seats):
            start_control(pod, work, bench_service_objects(), "service")
        report[0] += f", CPU layout {CGROUPS.describe()}"
        for name in seats:
            seat = Seat(name, pod, work)
            seat.start()
            try:
                for load, (kind, parser, what) in loads.items():
                    argv = load_argv(kind, s, seat.host)
                    out, counters = perf_stat(seat, name, work, argv, parser, s)
                    report += [f"## {seat_label(name)} under {what} ({s} s): "
                               f"{out['rps']:,.0f} req/s", ""]
                    for k, v in counters.items():
                        unit = " ms" if k == "task-clock" else ""
                        report.append(f"- {k}: {v:,.0f}{unit} total, "
                                      f"{v / out['requests']:.4f}{unit} per request")
                    report.append("")
                    if os.environ.get("BENCH_PROFILE_SYSCALLS"):
                        report += strace_counts(seat, name, work, argv, parser, s)
                    if name in record:
                        perf_record(seat, name, work, argv, s, report, f"{name}-{load}")
            finally:
                seat.stop()
    finally:
        JANITOR.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    path = RESULTS / f"profile-{PROFILE_STAMP}.md"
    path.write_text("\n".join(report) + "\n")
    print("\n".join(report))
    log(f"wrote {path}")


def drop_work(work, kept):
    """Deletes a run's temporary directory, unless BENCH_KEEP_WORK asks to keep it (then logs
    `kept`, which says what is there)."""
    if os.environ.get("BENCH_KEEP_WORK"):
        log(kept)
    else:
        shutil.rmtree(work, ignore_errors=True)


# Count mode: instructions per request (callgrind), a figure this noisy VM hardly moves.
COUNT_LOADS = {
    # h2load sends an exact number of requests; --h1 keeps its HTTP/1.1 connections alive.
    "keepalive": ("HTTP/1.1 keep-alive, 4 connections",
                  lambda n, host: ["h2load", "--h1", "-n", str(n), "-c", "4", "-t", "1",
                                   f"http://{host}:{H1_PORT}/"]),
    "h2": ("prior-knowledge h2c, 4 connections x 10 streams",
           lambda n, host: ["h2load", "-n", str(n), "-c", "4", "-m", "10", "-t", "1",
                            f"http://{host}:{H2_PORT}/"]),
}


def callgrind_total(path):
    """The instruction count (Ir) a callgrind output file ends with."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise BenchError(f"{path}: no totals line (did the proxy exit cleanly under valgrind?)")


def count():
    """remora-proxy (or HAProxy, for scale) under valgrind's callgrind, one fresh process per
    run, for a small and a large number of requests: the difference over the difference in
    requests is the user-space instructions each request costs, start-up and shutdown cancelled
    out. Deterministic to a fraction of a percent, so a change too small for the timed loads'
    noise still shows."""
    try:
        small = int(os.environ.get("BENCH_COUNT_SMALL", "2000"))
        large = int(os.environ.get("BENCH_COUNT_LARGE", "22000"))
    except ValueError as e:
        raise BenchError(f"BENCH_COUNT_SMALL and BENCH_COUNT_LARGE take request counts: {e}")
    if not 0 < small < large:
        raise BenchError(f"BENCH_COUNT_SMALL={small}, BENCH_COUNT_LARGE={large}: expected "
                         "0 < small < large")
    seats = os.environ.get("BENCH_COUNT_SEATS", "remora").split(",")
    for name in seats:
        if name not in ("remora", "haproxy", "remora-svc", "remora-route", "remora-svc-off") \
                and not name.startswith("remora@"):
            raise BenchError(f"BENCH_COUNT_SEATS: {name!r} is not remora, remora@LABEL, "
                             "remora-svc, remora-route, remora-svc-off or haproxy")
    loads = os.environ.get("BENCH_COUNT_LOADS", ",".join(COUNT_LOADS)).split(",")
    for load in loads:
        if load not in COUNT_LOADS:
            raise BenchError(f"BENCH_COUNT_LOADS: {load!r} is not one of {', '.join(COUNT_LOADS)}")
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    os.chmod(work, 0o755)
    out_dir = work / "callgrind"
    out_dir.mkdir()
    os.chmod(out_dir, 0o777)  # valgrind writes it as the proxy uid
    RESULTS.mkdir(parents=True, exist_ok=True)
    per_request = {}
    try:
        pod, remote = make_pod()
        start_nginx(remote, work)
        apply_rules(pod)
        if any(name in CONTROL_SEATS for name in seats):
            start_control(pod, work, bench_service_objects(), "service")
        for load in loads:
            what, argv_of = COUNT_LOADS[load]
            for name in seats:
                totals = []
                for n in (small, large):
                    out = out_dir / f"{name}-{load}-{n}.out"
                    seat = Seat(name, pod, work, wrapper=[
                        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
                    seat.start()
                    try:
                        if name in CONTROL_SEATS:
                            # The first connection asks remora-control (see run_load).
                            for _ in range(5):
                                if "hello" in run(seat.client(
                                        ["curl", "-sS", "-m", "5",
                                         f"http://{seat.host}:{H1_PORT}/"]),
                                        check=False).stdout:
                                    break
                        res = parse_h2load(run(seat.client(argv_of(n, seat.host)),
                                               timeout=600).stdout)
                        if res["errors"] or res["requests"] != n:
                            raise BenchError(f"{seat_label(name)}, {load}: {res['requests']:,} "
                                             f"of {n:,} requests answered 2xx")
                    finally:
                        seat.stop()
                    totals.append(callgrind_total(out))
                per_request[(name, load)] = (totals[1] - totals[0]) / (large - small)
                log(f"{seat_label(name)}, {load}: {per_request[(name, load)]:,.0f} "
                    "instructions per request")
    finally:
        JANITOR.cleanup()
        drop_work(work, f"callgrind output kept in {out_dir} (callgrind_annotate reads it)")
    base = seats[0]
    report = [f"# instructions per request, {PROFILE_STAMP} (commit {git_commit()})", "",
              f"callgrind, user space only; ({large:,} - {small:,}) requests per figure, each "
              "count in a fresh proxy process.", ""]
    head = ["load"] + [seat_label(n) for n in seats] + \
        [f"{seat_label(n)} / {seat_label(base)}" for n in seats[1:]]
    rows = [[f"{load} ({COUNT_LOADS[load][0]})"]
            + [f"{per_request[(n, load)]:,.0f}" for n in seats]
            + [f"{per_request[(n, load)] / per_request[(base, load)]:.4f}x" for n in seats[1:]]
            for load in loads]
    report.append(markdown_table(head, rows))
    path = RESULTS / f"count-{PROFILE_STAMP}.md"
    path.write_text("\n".join(report) + "\n")
    print("\n".join(report))
    log(f"wrote {path}")


def lhist_summary(text, name):
    """Median and mean (µs) of a bpftrace `lhist` printed as `@name:` then `[lo, hi) count |...`."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("@"):
            inside = line.startswith(f"@{name}:")
            continue
        m = re.match(r"\[(\d+), (\d+)\)\s+(\d+)", line.strip()) if inside else None
        if m:
            rows.append(((int(m[1]) + int(m[2])) / 2, int(m[3])))
    total = sum(n for _, n in rows)
    if not total:
        return None
    seen = 0
    for mid, n in rows:
        seen += n
        if seen * 2 >= total:
            median = mid
            break
    return {"count": total, "median_us": median,
            "mean_us": sum(mid * n for mid, n in rows) / total}


TRACE_SCRIPT = os.environ.get("BENCH_TRACE_SCRIPT", HERE / "latency.bt")
PARTS_TRACED = ("in", "request", "to_server", "server", "from_server", "upstream", "response",
                "out", "residence")


def trace():
    """bpftrace under the fixed 1000 rps load: where each seat's time per request goes."""
    if not shutil.which("bpftrace"):
        sys.exit("bpftrace is missing: apt-get install -y bpftrace")
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    os.chmod(work, 0o755)
    RESULTS.mkdir(parents=True, exist_ok=True)
    seats = [x for x in os.environ.get("BENCH_TRACE_SEATS", "haproxy,remora").split(",") if x]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rows = {}
    try:
        pod, remote = make_pod()
        start_nginx(remote, work)
        apply_rules(pod)
        for rnd in range(ROUNDS):
            for name in seats[rnd % len(seats):] + seats[:rnd % len(seats)]:
                seat = Seat(name, pod, work)
                seat.start()
                try:
                    out = work / f"{name}-{rnd}.bt"
                    with open(out, "w") as sink:
                        tracer = subprocess.Popen(["bpftrace", TRACE_SCRIPT,
                                                   str(seat.proc.pid)],
                                                  stdout=sink, stderr=subprocess.STDOUT)
                        time.sleep(3)  # bpftrace attaches its probes
                        run(seat.client(load_argv("latency", SECONDS)), timeout=SECONDS + 30)
                        tracer.send_signal(signal.SIGINT)
                        tracer.wait(timeout=30)
                    text = out.read_text()
                    if os.environ.get("BENCH_TRACE_RAW"):
                        shutil.copy(out, RESULTS / f"trace-{stamp}-{name}-{rnd}.txt")
                    for part in PARTS_TRACED:
                        summary = lhist_summary(text, part)
                        if summary:
                            rows.setdefault(name, {}).setdefault(part, []).append(summary)
                    log(f"traced {name} (round {rnd + 1})")
                finally:
                    seat.stop()
    finally:
        JANITOR.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    md = [f"# where the time of a request goes, {stamp} (commit {git_commit()})", "",
          f"oha at a fixed 1000 rps over 10 connections, {SECONDS} s per seat and round, "
          f"{ROUNDS} round(s); bpftrace on syscall tracepoints (scripts/bench/latency.bt). "
          "Medians over rounds of each round's median and mean, in µs (2 µs buckets). "
          "`in`: client write to proxy read; `residence`: proxy read of the request to its write "
          "of the response, the server's time included; `out`: proxy write to client read.", "",
          "`request`, `upstream` and `response` split the residence: client read to upstream "
          "write, upstream write to upstream read (the server and both deliveries), upstream read "
          "to client write; `to_server`, `server` and `from_server` split `upstream` at nginx's read and "
          "write.", "",
          "| seat | " + " | ".join(f"{p} median | {p} mean" for p in PARTS_TRACED) + " |",
          "|---|" + "---|---|" * len(PARTS_TRACED)]
    for name, parts in rows.items():
        cells = []
        for part in PARTS_TRACED:
            got = parts.get(part, [])
            cells += [f"{median([g['median_us'] for g in got]):.0f}" if got else "n/a",
                      f"{median([g['mean_us'] for g in got]):.1f}" if got else "n/a"]
        md.append(f"| {seat_label(name)} | " + " | ".join(cells) + " |")
    path = RESULTS / f"trace-{stamp}.md"
    path.write_text("\n".join(md) + "\n")
    print("\n".join(md))
    log(f"wrote {path}")


def tool_versions():
    v = {}
    for name, argv in (("haproxy", ["haproxy", "-v"]), ("nginx", ["nginx", "-v"]),
                       ("wrk", ["wrk", "-v"]), ("oha", ["oha", "--version"]),
                       ("h2load", ["h2load", "--version"]), ("kernel", ["uname", "-r"])):
        out = subprocess.run(argv, capture_output=True, text=True)
        v[name] = (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"
    return v


def git_commit():
    out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    commit = out.stdout.strip() or "unknown"
    # The binaries are built from the work tree, which may be ahead of the commit.
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "proxy", "injector",
                            "init-net"], capture_output=True, text=True).stdout.strip()
    return commit + (" + uncommitted changes" if dirty else "")


def write_results(report, md):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = report["started"].replace(":", "").replace("-", "")
    for ext, text in (("json", json.dumps(report, indent=2) + "\n"), ("md", md)):
        path = RESULTS / f"bench-{stamp}.{ext}"
        path.write_text(text)
        shutil.copyfile(path, RESULTS / f"latest.{ext}")
    log(f"wrote {RESULTS}/bench-{stamp}.json and .md (also latest.json, latest.md)")


def render_markdown(report, head, rows):
    md = [f"# remora bench, {report['started']}", "",
          f"commit {report['commit']}, {report['rounds']} rounds x {report['seconds']} s per load, "
          f"{os.cpu_count()} CPUs, rules: {report.get('rules', 'n/a')}. Medians over rounds; "
          "each load runs through every seat in turn (a fresh proxy process each), seats rotated each round. "
          f"CPU layout: {report.get('layout', 'n/a')}.", ""]
    if rows:
        md += ["## Proxy seat", "",
               "Client in the pod namespace, nginx (small response) in the remote namespace. "
               "direct: client as uid 1337 (exempt from the rules); HAProxy 2.6 and remora-proxy "
               "on 127.0.0.1:15001 as uid 1337 behind the same REDIRECT rules. Throughput: wrk, "
               "50 keep-alive connections. Latency: oha at a fixed 1000 rps, 10 connections, "
               "--latency-correction; added = seat minus direct, paired per round. New conn: "
               "oha --disable-keepalive, 10 concurrent. HTTP/2: h2load prior-knowledge h2c. "
               "CPU and RSS: the proxy process, from /proc (user space: utime alone)."
               + (" Service seats: the client sends to the ClusterIP " + CLUSTER_IP
                  + ", balanced per request over nginx on " + ", ".join(SERVICE_ENDPOINTS)
                  + " by HAProxy (leastconn, endpoints listed statically) or by remora-proxy "
                  "with --control (remora-control on the pod's loopback, not counted)."
                  if any(s in SERVICE_SEATS for s in SEATS) else "")
               + (" Route seats: the same endpoints and loads through a second ClusterIP, "
                  + ROUTE_CLUSTER_IP + ", behind 10 routing rules of which the loads match only "
                  "the last, which sets the request header " + ROUTE_MARK + ": an HTTPRoute per "
                  "port for remora-proxy (from remora-control, as for remora-svc), the same rules "
                  "as ACLs for HAProxy (haproxy-acl.cfg.in); each run checks that the header "
                  "reaches nginx and that the route counted every request of remora-proxy's loads."
                  if any(s in ROUTE_SEATS for s in SEATS) else ""), "",
               markdown_table(head, rows), ""]
        md += spread_lines(report.get("proxy_rounds", []))
        md += h2_split_lines(report.get("proxy_rounds", []))
        md += steal_lines(report.get("proxy_rounds", []))
        for seat, m in report["proxy"].items():
            if m.get("load_errors"):
                md.append(f"- {seat_label(seat)}: {m['load_errors']} failed requests over all "
                          "loads and rounds (see the JSON for which)")
        errs = {s: m["errors"] for s, m in report["proxy"].items() if m.get("errors")}
        for s, e in errs.items():
            md.append(f"- {seat_label(s)} failed in {len(e)} round(s): {e[0][:300]}")
        md.append("")
    return "\n".join(md + [render_other_parts(report)])


def spread_lines(rounds):
    """Per seat and round, how nginx's two workers shared the connections of the keep-alive
    loads: with all on one worker, that worker may be the bottleneck and the round slower."""
    out = []
    for load in SPREAD_PORTS:
        key = LOAD_RESULTS[load][0]
        cells = []
        for seat in SEATS:
            spreads = ["/".join(map(str, s)) for r in rounds
                       if (s := get(r.get(seat, {}), f"{key}.server_spread"))]
            if spreads:
                cells.append(f"{seat_label(seat)} {', '.join(spreads)}")
        if cells:
            out.append(f"- nginx's connections per worker under the {load} load, by round: "
                       + "; ".join(cells))
        cells = []
        for seat in SERVICE_SEATS:
            spreads = ["/".join(map(str, s)) for r in rounds
                       if (s := get(r.get(seat, {}), f"{key}.endpoint_spread"))]
            if spreads:
                cells.append(f"{seat_label(seat)} {', '.join(spreads)}")
        if cells:
            out.append(f"- upstream connections per Service endpoint ({', '.join(SERVICE_ENDPOINTS)}) "
                       f"under the {load} load, by round: " + "; ".join(cells))
    return out


def h2_split_lines(rounds):
    """remora-proxy's HTTP/2 CPU per request against HAProxy's, round by round, kept apart by
    where HAProxy's two upstream connections landed. With both on one nginx worker (2/0), that
    worker's queue makes each of HAProxy's requests dearer (0.0068 against 0.0055 s per 1000 on
    the earlier VM), so a median over such rounds flatters remora-proxy; the split rounds (1/1)
    are the matched comparison."""
    split, lopsided = [], []
    for r in rounds:
        spread = get(r.get("haproxy", {}), "h2.server_spread")
        ours = get(r.get("remora", {}), "h2.cpu_s_per_1k")
        theirs = get(r.get("haproxy", {}), "h2.cpu_s_per_1k")
        if not spread or not ours or not theirs:
            continue
        (lopsided if min(spread) == 0 else split).append(ours / theirs)
    if not split and not lopsided:
        return []
    def shown(ratios):
        return ", ".join(f"{x:.2f}x" for x in ratios) or "none"
    return [f"- CPU s / 1000 req (h2), remora-proxy / HAProxy per round: with HAProxy's upstream "
            f"connections split over nginx's workers {shown(split)}; with both on one worker "
            f"(HAProxy's dear mode) {shown(lopsided)}"]


def max_steal(result):
    """The highest host steal of any load in one seat's result of one round."""
    return max((v for key, _ in LOAD_RESULTS.values()
                if (v := get(result, f"{key}.steal_pct")) is not None), default=None)


def steal_lines(rounds):
    """Per load, the median share of the VM's CPU time the hypervisor took while each seat ran
    it, and the highest of any round: a seat whose rounds ran while the host was busy lost time
    it did not spend."""
    cells = []
    for load, (key, _) in LOAD_RESULTS.items():
        per_seat = [(seat, [v for r in rounds
                            if (v := get(r.get(seat, {}), f"{key}.steal_pct")) is not None])
                    for seat in SEATS]
        shown = [f"{seat_label(seat)} {median(v):.1f}" for seat, v in per_seat if v]
        top = max((x for _, v in per_seat for x in v), default=None)
        if shown:
            cells.append(f"{load}: {', '.join(shown)} (highest round {top:.1f})")
    if not cells:
        return []
    return ["- host steal, % of the VM's CPU time taken by the hypervisor during the load "
            "(median per seat): " + "; ".join(cells)]


def render_other_parts(report):
    md = render_pair(report.get("pair")) + render_issuance(report.get("issuance"))
    retry = report.get("retry")
    if retry:
        md += ["## Retries under 30 % injected 503s", ""]
        if "error" in retry:
            md += [f"not measured: {retry['error']}", ""]
        else:
            sm = retry["summary"]
            rem, hap = sm.get("remora-svc", {}), sm.get("haproxy-retry", {})
            row = lambda label, key, unit: (
                f"| {label} | {fmt(rem.get(key), unit)} | {fmt(hap.get(key), unit)} | "
                + (f"{ratio(rem.get(key), hap.get(key)):.2f}x" if ratio(rem.get(key),
                                                                         hap.get(key)) else "")
                + " |")
            md += ["| metric | remora-proxy (retry-on 5xx) | HAProxy (retry-on 503, retries 2) "
                   "| remora / HAProxy |", "|---|---|---|---|",
                   row("client success (%)", "success_pct", None),
                   row("load multiplier (endpoint tries / request)", "multiplier", None),
                   row("CPU s / 1000 requests", "cpu_s_per_1k", "s"),
                   f"| retries / refused by the budget (remora) | {fmt(rem.get('retries'))} / "
                   f"{fmt(rem.get('budget_exhausted'))} | | |", "",
                   f"{retry['rate']} requests a second for {retry['seconds']} s, 10 keep-alive "
                   "connections (oha); nginx fails 30 % of the requests with 503 and logs each "
                   "try. Without retries: 70 % and 1.00; two retries each, no budget: 97.3 % and "
                   f"1.39. Medians over {len(retry['rounds'])} round(s).", ""]
    inj = report.get("injector")
    if inj:
        md += ["## Injector", ""]
        if "error" in inj:
            md += [f"not measured: {inj['error']}", ""]
        else:
            md += ["| metric | value |", "|---|---|",
                   f"| reviews/s, keep-alive TLS, 10 conns | {fmt(inj['reviews_per_s'], 'req/s')} |",
                   f"| p50 / p99 at 1000/s (ms) | {fmt(inj['p50_1000_ms'], 'ms')} / {fmt(inj['p99_1000_ms'], 'ms')} |",
                   f"| 200-container pod p50 / p99 (ms) | {fmt(inj['pod200_p50_ms'], 'ms')} / {fmt(inj['pod200_p99_ms'], 'ms')} |",
                   f"| CPU s / 1000 reviews | {fmt(inj['cpu_s_per_1k'], 's')} |",
                   f"| RSS idle / peak (MiB) | {fmt(inj['rss_idle_kib'] / 1024, 'MiB')} / {fmt(inj['rss_peak_kib'] / 1024, 'MiB')} |",
                   f"| failed requests | {inj['errors']} |",
                   "| host steal during the loads, % (full speed / 1000/s / 200-container) | "
                   + " / ".join(fmt(v) for v in (inj.get("steal_pct") or {}).values()) + " |",
                   "", f"Medians over {len(inj['rounds'])} round(s); the 200-container review is "
                   f"{inj['pod200_body_bytes']:,} bytes, sent one at a time.", ""]
    rss = report.get("rss")
    if rss:
        md += ["## remora-proxy RSS with a large cluster", ""]
        if "error" in rss:
            md += [f"not measured: {rss['error']}", ""]
        else:
            mib = lambda kib: fmt(kib / 1024, "MiB")
            parts = lambda key: " | ".join(mib(rss.get(f"{key}{p}_kib", 0))
                                           for p in ("", "_anon", "_file"))
            md += ["| remora-proxy | VmRSS (MiB) | of which anonymous | of which the binary "
                   "and libraries |", "|---|---|---|---|",
                   f"| idle, without --control | {parts('plain_idle')} |",
                   f"| without --control, after {rss['requests_per_service']:,} requests to each "
                   f"of the {rss['services_used']} endpoint addresses | {parts('plain_after')} |",
                   f"| idle, with --control | {parts('control_idle')} |",
                   f"| with --control, after {rss['requests_per_service']:,} requests to each of "
                   f"{rss['services_used']} of {rss['services']:,} Services (peak "
                   f"{mib(rss['control_peak_kib'])}) | {parts('control_after')} |",
                   "",
                   f"Of the growth over idle without --control, anonymous memory (heap, stacks: "
                   f"the pod's own, and what would grow with the cluster) is "
                   f"{fmt(rss.get('anon_growth_over_idle_mib'), 'MiB')} MiB; the rest is "
                   f"file-backed: the binary's and libc's code run for the first time, clean "
                   f"pages shared by every proxy on the node ("
                   f"{fmt(rss.get('file_growth_over_idle_mib'), 'MiB')} MiB).",
                   "",
                   f"Growth over idle without --control: {fmt(rss['growth_over_idle_mib'], 'MiB')} "
                   f"MiB; over idle with --control: {fmt(rss['growth_over_control_idle_mib'], 'MiB')} "
                   f"MiB; over the passthrough after the same traffic: "
                   f"{fmt(rss['growth_over_passthrough_mib'], 'MiB')} MiB. remora-control with "
                   f"{rss['services']:,} Services x {rss['endpoints_per_service']} endpoints: "
                   f"{mib(rss['control_rss_kib'])} MiB RSS, ready {rss['control_ready_s']} s after "
                   f"its start. Medians over {len(rss['rounds'])} round(s), fresh proxies each.", ""]
    init = report.get("init")
    if init:
        md += ["## remora-init apply time", ""]
        if "error" in init:
            md += [f"not measured: {init['error']}", ""]
        else:
            md += ["| case | IPv4 median ms | IPv6 median ms | whole process (both) median ms | runs |",
                   "|---|---|---|---|---|"]
            for k, c in init["cases"].items():
                if c.get("error"):
                    md.append(f"| {k} | error: {c['error'][:150]} | | | |")
                    continue
                fam = c["per_family_median_ms"]
                md.append(f"| {k} | {fmt(fam.get('IPv4'), 'ms')} | {fmt(fam.get('IPv6'), 'ms')} "
                          f"| {fmt(c['whole_process_median_ms'], 'ms')} | {c['runs']} |")
            md += ["", f"Spawning a process with nsenter alone: {fmt(init['spawn_overhead_ms'], 'ms')} ms.", ""]
    if report.get("targets"):
        md += ["## Targets (issue 6; those marked Service and RSS: issue 23; Route: issue 24; Resilience: issue 25)", "", "| target | this run | met |", "|---|---|---|"]
        for t in report["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            md.append(f"| {t['target']} | {t['value']} | {met} |")
        md.append("")
    md += ["Tools: " + "; ".join(f"{k} {v}" for k, v in report["tools"].items()), ""]
    return "\n".join(md)


def main():
    if os.geteuid() != 0:
        sys.exit("make bench needs root (network namespaces, iptables)")
    bad = [s for s in SEATS if not seat_known(s)] + [p for p in PARTS if p not in KNOWN_PARTS] \
        + [x for x in LOADS if x not in KNOWN_LOADS] \
        + ([LAYOUT] if LAYOUT not in LAYOUTS else [])
    if bad or ROUNDS < 1 or SECONDS < 1:
        sys.exit(f"bad BENCH_SEATS/BENCH_PARTS/BENCH_LOADS/BENCH_LAYOUT/BENCH_ROUNDS/BENCH_SECONDS: "
                 f"{bad or ''} (seats: "
                 f"{','.join(s for s in SEAT_NAMES if s not in PART_SEATS)}, remora@LABEL with "
                 f"BENCH_REMORA_ARGS_LABEL and/or BENCH_REMORA_BIN_LABEL; parts: "
                 f"{','.join(sorted(KNOWN_PARTS))}; loads: {','.join(KNOWN_LOADS)}; layout: "
                 f"{', '.join(LAYOUTS)}; rounds and seconds: positive integers)")
    if LAYOUT == "pod":
        pod_millicpu()  # exits on a bad BENCH_POD_MILLICPU before anything starts
    for tool in ("ip", "setpriv", "nsenter", "curl", "ss", "iptables-restore", "haproxy",
                 "nginx", "wrk", "oha", "h2load", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run scripts/bench.sh (it installs what bench needs)")

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    report = {"started": started, "commit": git_commit(), "rounds": ROUNDS, "seconds": SECONDS,
              "cpus": os.cpu_count(), "seats": SEATS, "tools": tool_versions()}
    work = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
    # The seats run as uid 1337 and read their config from here.
    os.chmod(work, 0o755)
    head, rows = [], []
    route_failures = []
    t_start = time.monotonic()
    try:
        if "proxy" in PARTS or "rss" in PARTS or "retry" in PARTS:
            pod, remote = make_pod()
            nginx = start_nginx(remote, work)
            report["rules"] = apply_rules(pod)
            report["layout"] = CGROUPS.describe()
        if "proxy" in PARTS:
            control = None
            if any(s in CONTROL_SEATS for s in SEATS):
                control = start_control(pod, work, bench_service_objects(), "service")
            if any(s in PAIR_SEATS for s in SEATS):
                report["pair_rules"] = start_pair(pod, work).rules
            rounds = []
            for r in range(ROUNDS):
                order = SEATS[r % len(SEATS):] + SEATS[:r % len(SEATS)]
                log(f"round {r + 1}/{ROUNDS}: {' -> '.join(order)}")
                # Load by load, every seat in turn, each in a fresh process: the seats' runs of
                # one load lie seconds apart, not a whole seat's loads apart, so slow drifts of
                # a shared machine weigh less on their ratios.
                results = {name: {} for name in order}
                for load in LOADS:
                    for name in order:
                        if "error" in results[name]:
                            continue
                        try:
                            run_load(make_seat(name, pod, work), load, results[name])
                        except BenchError as e:
                            log(f"  {seat_label(name)}: {e}")
                            results[name] = {"error": str(e)[:1000]}
                            if isinstance(e, RouteCheckError):
                                route_failures.append(str(e))
                for name in order:
                    x = results[name]
                    if "error" not in x:
                        log(f"  {seat_label(name):13} {fmt(get(x, 'throughput.rps'), 'req/s'):>9} req/s  "
                            f"p99@1000 {fmt(get(x, 'latency_1000rps.p99_ms'), 'ms')} ms  "
                            f"newconn {fmt(get(x, 'new_connection.rps'), 'req/s')} req/s  "
                            f"h2 {fmt(get(x, 'h2.rps'), 'req/s')} req/s  steal (most of any "
                            f"load) {fmt(max_steal(x))}%")
                rounds.append(results)
            report["proxy_rounds"] = rounds
            report["proxy"] = summarize_proxy(rounds)
            head, rows = proxy_table(report["proxy"])
            if PAIR:
                report["pair"] = summarize_pair(report["proxy"], rounds)
            if control:
                JANITOR.stop(control)
        if "rss" in PARTS:
            log(f"rss: remora-proxy with {RSS_SERVICES:,} Services in remora-control")
            try:
                report["rss"] = bench_rss(pod, work)
            except BenchError as e:
                report["rss"] = {"error": str(e)[:1000]}
        if "retry" in PARTS:
            log(f"retry: 30 % injected 503s at {RETRY_RATE}/s, remora-proxy and HAProxy")
            try:
                report["retry"] = bench_retry(pod, work)
            except BenchError as e:
                report["retry"] = {"error": str(e)[:1000]}
        if "proxy" in PARTS or "rss" in PARTS or "retry" in PARTS:
            JANITOR.stop(nginx, signal.SIGQUIT)
        if "injector" in PARTS:
            log("injector")
            try:
                report["injector"] = bench_injector(work)
            except BenchError as e:
                report["injector"] = {"error": str(e)[:1000]}
        if "issuance" in PARTS:
            log(f"issuance: {ISSUE_PROXIES:,} proxies asking remora-control at once")
            try:
                report["issuance"] = bench_issuance(work)
            except BenchError as e:
                report["issuance"] = {"error": str(e)[:1000]}
        if "init" in PARTS:
            log("remora-init")
            try:
                report["init"] = bench_init(work)
            except BenchError as e:
                report["init"] = {"error": str(e)[:1000]}
    finally:
        JANITOR.cleanup()
        drop_work(work, f"logs kept in {work}")
    report["targets"] = targets(report.get("proxy", {}), report.get("injector"), report.get("init"),
                                report.get("rss"))
    report["targets"] += pair_targets(report.get("pair"))
    report["duration_s"] = round(time.monotonic() - t_start, 1)
    md = render_markdown(report, head, rows)
    print()
    if rows:
        print(text_table(head, rows))
        print()
    print(render_other_parts(report))
    write_results(report, md)
    if route_failures:
        raise BenchError(f"{len(route_failures)} run(s) of a route seat did not go through its "
                         f"route: {route_failures[0][:300]}")


def on_term(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


def hold_bench_lock():
    """One benchmark at a time on this machine: two runs at once measure each other. A second
    run waits for the first (bounded), saying so."""
    import fcntl
    f = open("/run/remora-bench.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        log(f"another make bench is running ({f.read().strip() or 'pid unknown'}); waiting for it "
            "(at most 30 min): two at once would measure each other")
        deadline = time.monotonic() + 1800
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    sys.exit("gave up waiting for the other make bench")
                time.sleep(2)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}\n")
    f.flush()
    return f  # the lock lives as long as this file object


if __name__ == "__main__":
    # Ctrl-C must clean up even when the shell started us with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    if os.geteuid() != 0:
        sys.exit("make bench needs root (network namespaces, iptables)")
    try:
        LOCK = hold_bench_lock()
        if os.environ.get("BENCH_MODE") == "profile":
            profile()
        elif os.environ.get("BENCH_MODE") == "trace":
            trace()
        elif os.environ.get("BENCH_MODE") == "count":
            count()
        else:
            main()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping what was started and deleting the namespaces", file=sys.stderr)
        sys.exit(130)
    except BenchError as e:
        sys.exit(f"bench: {e}")
    finally:
        JANITOR.cleanup()
