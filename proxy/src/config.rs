//! The command line of `remora-proxy`, and the derived runtime settings (listeners, worker threads).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use remora_init::config::{ADMIN_PORT, DEFAULT_INBOUND_PORT, DEFAULT_OUTBOUND_PORT};
use remora_init::control_addr::ControlAddr;
use remora_init::mtls::{AllowFrom, InboundMtls, InboundProbes};
use remora_init::rate_limit::InboundRateLimit;
use remora_init::PortList;

use crate::client::connect::Keepalive;
use crate::discover::ControlConfig;

/// Ports carried as plain TCP without detection unless `--opaque-ports` says otherwise: the
/// server-first protocols. The injector's default is this very constant, so a hand-run proxy
/// behaves like an injected one.
pub use remora_init::config::DEFAULT_OPAQUE_PORTS;

/// The listeners' defaults: the ports remora-init redirects to (and leaves open for the
/// kubelet's probes), so the proxy listens where the rules send traffic without a flag.
pub const DEFAULT_OUTBOUND_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), DEFAULT_OUTBOUND_PORT);
pub const DEFAULT_INBOUND_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_INBOUND_PORT);
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ADMIN_PORT);

/// Where the injected patch mounts the projected ServiceAccount token (SPEC: workload identity).
pub const DEFAULT_IDENTITY_TOKEN: &str = "/var/run/secrets/remora.io/identity/token";

/// The most worker threads the proxy starts unless `--workers` says otherwise: a sidecar shares
/// the pod's CPU with the application, and two threads already carry well over what one pod needs.
const DEFAULT_MAX_WORKERS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag}: {value:?} is not a duration (expected e.g. 500ms, 2s or 1m)")]
    Duration { flag: &'static str, value: String },
    #[error("--control: {reason}")]
    ControlAddr { reason: String },
    #[error("--inbound-rate-limit: {reason}")]
    InboundRateLimit { reason: String },
    #[error("--inbound-mtls: {reason}")]
    InboundMtls { reason: String },
    #[error("--allow-from: {reason}")]
    AllowFrom { reason: String },
    #[error("--inbound-probes: {reason}")]
    InboundProbes { reason: String },
    #[error(
        "--tcp-keepalive: {value:?} is not a whole number of seconds from 1s to {max}s, or 0 \
         for off (the kernel counts keepalive in seconds)",
        max = Keepalive::MAX_IDLE.as_secs()
    )]
    Keepalive { value: String },
}

/// The Linux scheduling policy of the proxy's threads (`--sched-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SchedPolicy {
    /// SCHED_OTHER, the kernel's default.
    Normal,
    /// SCHED_BATCH: a woken thread does not preempt the one running on its CPU.
    Batch,
}

/// How a prior-knowledge HTTP/2 connection is carried (`--h2-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum H2Mode {
    /// Each request decoded and sent again on the upstream connection.
    Terminate,
    /// The connection's frames passed on unchanged, read for the metrics and the access log.
    Relay,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Plain,
}

/// remora-proxy: the remora sidecar. Carries the pod's redirected TCP traffic to where it was going.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Listener for the pod's outbound traffic. 127.0.0.1 also listens on [::1] where the pod has IPv6.
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_LISTEN, value_name = "ADDR")]
    pub outbound_listen: SocketAddr,

    /// Listener for the pod's inbound traffic. 0.0.0.0 also listens on [::] (IPv6 only) where the pod has IPv6.
    #[arg(long, default_value_t = DEFAULT_INBOUND_LISTEN, value_name = "ADDR")]
    pub inbound_listen: SocketAddr,

    /// Listener for /live, /ready and /metrics. 0.0.0.0 also listens on [::] where the pod has IPv6.
    #[arg(long, default_value_t = DEFAULT_ADMIN_LISTEN, value_name = "ADDR")]
    pub admin_listen: SocketAddr,

    /// Destination ports carried as plain TCP without protocol detection (e.g. 25,3306,9000-9100).
    #[arg(long, default_value = DEFAULT_OPAQUE_PORTS, value_name = "LIST")]
    pub opaque_ports: PortList,

    /// Log filter: error, warn, info, debug, trace (or a tracing directive). Release builds
    /// leave trace-level events out, so trace shows what debug does there.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,

    #[arg(long, value_enum, default_value = "json")]
    pub log_format: LogFormat,

    /// Log one line per HTTP request: direction, method, authority, path, status, duration, bytes.
    #[arg(long)]
    pub access_log: bool,

    /// How long to wait for a TCP connection to a destination before answering 502 (HTTP) or
    /// resetting the client (opaque). 2s lets one lost SYN be retransmitted (Linux retries after
    /// 1s) yet fails well before a client's own timeouts.
    #[arg(long, default_value = "2s", value_parser = parse_connect_timeout, value_name = "DURATION")]
    pub connect_timeout: Duration,

    /// After SIGTERM, how long in-flight requests and connections may take before the proxy
    /// exits. Native sidecars get SIGTERM only after the app containers have stopped, so 10s is
    /// ample and leaves most of the default 30s grace period unused.
    #[arg(long, default_value = "10s", value_parser = parse_drain_timeout, value_name = "DURATION")]
    pub drain_timeout: Duration,

    /// How long a connection with a peer outside the pod (an inbound client, an outbound
    /// destination) may stay silent before TCP keepalive probes ask whether the peer is still
    /// there. A peer gone without a FIN or reset (its node died, the network split) is found after
    /// four such periods, and a request waiting for it gets a 502, a byte stream a reset, instead
    /// of waiting for ever. A live peer answers the probes however slow its app is. Whole
    /// seconds; 0 turns it off.
    #[arg(long, default_value = "10s", value_parser = parse_tcp_keepalive, value_name = "DURATION")]
    pub tcp_keepalive: Duration,

    /// Worker threads [default: the cgroup CPU limit rounded up, at least 1, at most 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub workers: Option<u16>,

    /// Linux scheduling policy of the proxy's threads. `batch` (SCHED_BATCH) keeps a woken
    /// worker from preempting the task that woke it, so on a quiet node the app, the proxy and a
    /// peer on the same node hand a request along on one CPU instead of waking an idle one: less
    /// latency and CPU per request there. But a woken worker then also waits while the task on
    /// its CPU keeps running: a busy task's time slice on a saturated node (longer tail latency),
    /// or an app's event loop that goes on computing after it writes; hence not the default.
    #[arg(long, value_enum, default_value = "normal", value_name = "POLICY")]
    pub sched_policy: SchedPolicy,

    /// How prior-knowledge HTTP/2 is carried. `relay`: the client's frames go unchanged to an
    /// upstream connection of its own, and back; the proxy reads frame heads and response
    /// statuses (request heads too with --access-log) for the metrics and the log, at far less
    /// CPU per request. Settings, flow control, stream limits, GOAWAY and retries stay with the
    /// two ends, as without the proxy; a connection that fails is reset. `terminate`: the proxy
    /// ends the client's HTTP/2 and sends each request on its own upstream connection: it queues
    /// streams under the upstream's limit, sends a stream the upstream left unprocessed again
    /// when it can, and answers 502 for one that fails. An unreachable destination gets 502s
    /// either way.
    #[arg(long, value_enum, default_value = "relay", value_name = "MODE")]
    pub h2_mode: H2Mode,

    /// The control plane, remora-control, as host:port (a DNS name or an IP literal, IPv6 in
    /// brackets). With it, outbound connections to a Service's ClusterIP are balanced per
    /// request over the Service's ready endpoints; without it, or while it cannot be reached
    /// before a destination's first answer, every connection goes to its original destination.
    #[arg(long, value_name = "ADDR", value_parser = parse_control_addr)]
    pub control: Option<String>,

    /// The name the control plane's certificate must carry.
    #[arg(
        long,
        default_value = "remora-control.remora-system.svc",
        value_name = "NAME"
    )]
    pub control_name: String,

    /// PEM file of the certificate authorities that verify the control plane. Without it, the
    /// environment variable REMORA_TRUST_ANCHORS holds the PEM text itself (the injector sets it).
    #[arg(long, value_name = "FILE")]
    pub trust_anchors: Option<PathBuf>,

    /// Talk to the control plane without TLS (tests, a laptop).
    #[arg(long)]
    pub control_plaintext: bool,

    /// The projected ServiceAccount token (audience remora.io/identity) sent with each request
    /// for the workload certificate, read again at each renewal (the kubelet rotates it).
    /// Without --control or without this file the proxy has no identity and talks plaintext
    /// with every peer.
    #[arg(long, default_value = DEFAULT_IDENTITY_TOKEN, value_name = "FILE")]
    pub identity_token: PathBuf,

    /// How long /ready waits for the first workload certificate; after it the proxy is ready
    /// anyway and talks plaintext with every peer until one comes. 0 does not wait.
    #[arg(long, default_value = "5s", value_parser = parse_identity_wait, value_name = "DURATION")]
    pub identity_wait: Duration,

    /// Inbound HTTP requests let in per second: `N/s` in all, or `N/s,M/s per-client` to hold
    /// each client IP address to M of them too. Each is a token bucket holding one second's
    /// worth; a request over it gets 429 with Retry-After. Opaque TCP is not limited. With it,
    /// inbound HTTP/2 is terminated whatever --h2-mode says: the relay cannot answer a stream.
    #[arg(long, value_name = "RATE", value_parser = parse_inbound_rate_limit)]
    pub inbound_rate_limit: Option<InboundRateLimit>,

    /// Inbound plaintext: `permissive` lets both mTLS and plaintext clients in; `strict` resets
    /// plaintext ones, except on --inbound-probes (the admin port is never redirected).
    #[arg(long, value_name = "MODE", default_value_t = InboundMtls::Permissive, value_parser = parse_inbound_mtls)]
    pub inbound_mtls: InboundMtls,

    /// The identities let in, comma-separated `ns/sa` or `ns/*`; empty lets anyone in. Others,
    /// plaintext clients included (they have no identity), get 403 (HTTP) or a reset (TCP).
    #[arg(long, value_name = "LIST", default_value = "", value_parser = parse_allow_from)]
    pub allow_from: AllowFrom,

    /// The pod's own kubelet probes, which stay plaintext under --inbound-mtls strict or
    /// --allow-from: `PORT` (the whole port) or `PORT:/path` (only HTTP/1 requests for that
    /// path on that port; other requests there get 403), comma-separated.
    #[arg(long, value_name = "LIST", default_value = "", value_parser = parse_inbound_probes)]
    pub inbound_probes: InboundProbes,
}

fn parse_connect_timeout(value: &str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or(ConfigError::Duration {
        flag: "--connect-timeout",
        value: value.to_string(),
    })
}

fn parse_drain_timeout(value: &str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or(ConfigError::Duration {
        flag: "--drain-timeout",
        value: value.to_string(),
    })
}

fn parse_identity_wait(value: &str) -> Result<Duration, ConfigError> {
    parse_duration(value).ok_or(ConfigError::Duration {
        flag: "--identity-wait",
        value: value.to_string(),
    })
}

fn parse_tcp_keepalive(value: &str) -> Result<Duration, ConfigError> {
    parse_duration(value)
        .filter(|idle| idle.subsec_nanos() == 0 && (idle.is_zero() || *idle <= Keepalive::MAX_IDLE))
        .ok_or(ConfigError::Keepalive {
            value: value.to_string(),
        })
}

/// `host:port`: a DNS name, an IPv4 literal or a bracketed IPv6 literal, and a port; parsed as
/// the injector parses what it writes here.
fn parse_control_addr(value: &str) -> Result<String, ConfigError> {
    value
        .parse::<ControlAddr>()
        .map(|addr| addr.to_string())
        .map_err(|reason| ConfigError::ControlAddr { reason })
}

/// Parsed as the injector parses the annotation it renders into this flag.
fn parse_inbound_rate_limit(value: &str) -> Result<InboundRateLimit, ConfigError> {
    value
        .parse()
        .map_err(|reason| ConfigError::InboundRateLimit { reason })
}

/// The mTLS flags are parsed as the injector parses the annotations it renders into them.
fn parse_inbound_mtls(value: &str) -> Result<InboundMtls, ConfigError> {
    value
        .parse()
        .map_err(|reason| ConfigError::InboundMtls { reason })
}

fn parse_allow_from(value: &str) -> Result<AllowFrom, ConfigError> {
    value
        .parse()
        .map_err(|reason| ConfigError::AllowFrom { reason })
}

fn parse_inbound_probes(value: &str) -> Result<InboundProbes, ConfigError> {
    value
        .parse()
        .map_err(|reason| ConfigError::InboundProbes { reason })
}

/// `250ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Why the control plane's settings can't be used.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "--control {addr} needs trust anchors to verify it: --trust-anchors FILE, or the PEM \
         text in the environment variable REMORA_TRUST_ANCHORS (or --control-plaintext)"
    )]
    NoTrustAnchors { addr: String },
    #[error("--trust-anchors {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{source_name}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { source_name: String },
}

impl Args {
    /// How to reach the control plane, `None` without `--control`. `env` reads the process
    /// environment (a parameter so tests need not change it): `REMORA_TRUST_ANCHORS`,
    /// `POD_NAMESPACE`, `POD_NAME`.
    pub fn control_config(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<ControlConfig>, ControlError> {
        let Some(addr) = self.control.clone() else {
            return Ok(None);
        };
        let trust_anchors = if self.control_plaintext {
            None
        } else {
            let (pem, source_name) = match (&self.trust_anchors, env("REMORA_TRUST_ANCHORS")) {
                (Some(path), _) => (
                    std::fs::read(path).map_err(|error| ControlError::Read {
                        path: path.display().to_string(),
                        error,
                    })?,
                    format!("--trust-anchors {}", path.display()),
                ),
                (None, Some(text)) if !text.trim().is_empty() => {
                    (text.into_bytes(), "REMORA_TRUST_ANCHORS".to_string())
                }
                (None, _) => return Err(ControlError::NoTrustAnchors { addr }),
            };
            if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                return Err(ControlError::NoCertificate { source_name });
            }
            Some(pem)
        };
        Ok(Some(ControlConfig {
            addr,
            name: self.control_name.clone(),
            trust_anchors,
            namespace: env("POD_NAMESPACE").unwrap_or_default(),
            pod: env("POD_NAME").unwrap_or_default(),
        }))
    }

    /// The outbound listeners: the flag's address, plus `[::1]` for `127.0.0.1`.
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        with_ipv6_companion(self.outbound_listen)
    }

    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        with_ipv6_companion(self.inbound_listen)
    }

    pub fn admin_addrs(&self) -> Vec<SocketAddr> {
        with_ipv6_companion(self.admin_listen)
    }
}

/// The remora-init rules redirect both families to one port; the IPv6 listener on that same
/// port is derived here so the command line names each listener once.
fn with_ipv6_companion(addr: SocketAddr) -> Vec<SocketAddr> {
    let companion = match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Some(Ipv6Addr::LOCALHOST),
        IpAddr::V4(ip) if ip.is_unspecified() => Some(Ipv6Addr::UNSPECIFIED),
        _ => None,
    };
    let mut addrs = vec![addr];
    addrs.extend(companion.map(|ip| SocketAddr::new(ip.into(), addr.port())));
    addrs
}

/// Worker threads: the CPU limit of the proxy's cgroup (rounded up), else the CPUs it may run
/// on; at least 1 and at most [`DEFAULT_MAX_WORKERS`].
pub fn worker_threads(flag: Option<u16>) -> usize {
    if let Some(n) = flag {
        return usize::from(n);
    }
    let cpus = cgroup_cpu_limit(Path::new("/"))
        .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
        .unwrap_or(1);
    cpus.clamp(1, DEFAULT_MAX_WORKERS)
}

/// The CPU limit from cgroup v2 `cpu.max` (the process's own cgroup, then the mount root as
/// seen inside a container), or cgroup v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`. `root` is `/`
/// except in tests.
fn cgroup_cpu_limit(root: &Path) -> Option<usize> {
    let sys = root.join("sys/fs/cgroup");
    let own = std::fs::read_to_string(root.join("proc/self/cgroup"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::"))
                .map(|path| PathBuf::from(path.trim().trim_start_matches('/')))
        });
    let mut v2 = Vec::new();
    if let Some(own) = &own {
        v2.push(sys.join(own).join("cpu.max"));
    }
    v2.push(sys.join("cpu.max"));
    for path in v2 {
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut fields = text.split_whitespace();
            return match (fields.next(), fields.next()) {
                (Some("max"), _) => None,
                (Some(quota), Some(period)) => cpus_from_quota(quota, period),
                _ => None,
            };
        }
    }
    for dir in ["cpu", "cpu,cpuacct"] {
        let quota = std::fs::read_to_string(sys.join(dir).join("cpu.cfs_quota_us"));
        let period = std::fs::read_to_string(sys.join(dir).join("cpu.cfs_period_us"));
        if let (Ok(quota), Ok(period)) = (quota, period) {
            return cpus_from_quota(quota.trim(), period.trim());
        }
    }
    None
}

/// `quota/period` CPUs rounded up; `-1` (v1's "no limit") and nonsense give `None`.
fn cpus_from_quota(quota: &str, period: &str) -> Option<usize> {
    let quota: u64 = quota.parse().ok()?;
    let period: u64 = period.parse().ok()?;
    if period == 0 || quota == 0 {
        return None;
    }
    usize::try_from(quota.div_ceil(period)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_the_usual_units() {
        for (text, expected) in [
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("1.5s", Duration::from_millis(1500)),
            ("3", Duration::from_secs(3)),
            ("1m", Duration::from_secs(60)),
        ] {
            assert_eq!(parse_duration(text), Some(expected), "{text}");
        }
        for bad in ["", "s", "1h", "-1s", "fast"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn control_takes_host_and_port() {
        for good in [
            "remora-control.remora-system.svc:8090",
            "127.0.0.1:8090",
            "[::1]:8090",
            "[2001:2::5]:443",
            "localhost:1",
        ] {
            let args = Args::try_parse_from(["remora-proxy", "--control", good]).unwrap();
            assert_eq!(args.control.as_deref(), Some(good));
        }
        for bad in [
            "remora-control",
            "host:",
            ":8090",
            "host:0",
            "host:99999",
            "::1:8090",
            "a b:1",
            "x-.svc:1",
            "http://x:1",
        ] {
            let err = Args::try_parse_from(["remora-proxy", "--control", bad]).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("--control") && text.contains("host:port"),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn the_control_plane_needs_trust_anchors_unless_plaintext() {
        let none = |_: &str| None;
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        assert!(args.control_config(none).unwrap().is_none());

        let args = Args::try_parse_from(["remora-proxy", "--control", "c:1"]).unwrap();
        let err = args.control_config(none).unwrap_err().to_string();
        assert!(
            err.contains("REMORA_TRUST_ANCHORS") && err.contains("--trust-anchors"),
            "{err}"
        );

        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let env = |name: &str| match name {
            "REMORA_TRUST_ANCHORS" => Some(pem.to_string()),
            "POD_NAMESPACE" => Some("shop".to_string()),
            "POD_NAME" => Some("web-1".to_string()),
            _ => None,
        };
        let config = args.control_config(env).unwrap().unwrap();
        assert_eq!(config.trust_anchors.as_deref(), Some(pem.as_bytes()));
        assert_eq!(
            (config.namespace.as_str(), config.pod.as_str()),
            ("shop", "web-1")
        );
        assert_eq!(config.name, "remora-control.remora-system.svc");

        let not_pem = |name: &str| (name == "REMORA_TRUST_ANCHORS").then(|| "hello".to_string());
        let err = args.control_config(not_pem).unwrap_err().to_string();
        assert!(
            err.contains("REMORA_TRUST_ANCHORS") && err.contains("BEGIN CERTIFICATE"),
            "{err}"
        );

        let args =
            Args::try_parse_from(["remora-proxy", "--control", "c:1", "--control-plaintext"])
                .unwrap();
        assert!(args
            .control_config(none)
            .unwrap()
            .unwrap()
            .trust_anchors
            .is_none());

        let args = Args::try_parse_from([
            "remora-proxy",
            "--control",
            "c:1",
            "--trust-anchors",
            "/nonexistent/ca.pem",
        ])
        .unwrap();
        let err = args.control_config(none).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn the_mtls_flags_parse_and_bad_values_name_the_flag() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        assert_eq!(args.inbound_mtls, InboundMtls::Permissive);
        assert!(args.allow_from.is_anyone());
        let args = Args::try_parse_from([
            "remora-proxy",
            "--inbound-mtls",
            "strict",
            "--allow-from",
            "shop/web,billing/*",
            "--inbound-probes",
            "8080:/healthz,9000",
        ])
        .unwrap();
        assert_eq!(args.inbound_mtls, InboundMtls::Strict);
        assert_eq!(args.allow_from.to_string(), "shop/web,billing/*");
        assert_eq!(args.inbound_probes, "9000,8080:/healthz".parse().unwrap());
        // The injector's grammar: what its webhook refuses, the proxy refuses too.
        for (flag, bad) in [
            ("--allow-from", "shop"),
            ("--allow-from", "sh.op/web"),
            ("--inbound-probes", "8080:healthz"),
            ("--inbound-probes", "+8080"),
            ("--inbound-probes", "8080:/ready?deep=1"),
            ("--inbound-mtls", "sometimes"),
        ] {
            let err = Args::try_parse_from(["remora-proxy", flag, bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("{flag}: {bad:?}")) && err.contains("(expected "),
                "{flag} {bad}: {err}"
            );
        }
    }

    #[test]
    fn inbound_rate_limit_takes_the_annotations_grammar() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        assert_eq!(args.inbound_rate_limit, None);
        for (good, shown) in [
            ("100/s", "100/s"),
            ("100/s,10/s per-client", "100/s,10/s per-client"),
            (" 100/s , 10/s per-client", "100/s,10/s per-client"),
        ] {
            let args =
                Args::try_parse_from(["remora-proxy", "--inbound-rate-limit", good]).unwrap();
            let limit = args.inbound_rate_limit.map(|limit| limit.to_string());
            assert_eq!(limit.as_deref(), Some(shown), "{good}");
        }
        for bad in ["100", "0/s", "100/s,10/s", "10/s,20/s per-client", "fast"] {
            let err = Args::try_parse_from(["remora-proxy", "--inbound-rate-limit", bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--inbound-rate-limit: ") && err.contains(&format!("{bad:?}")),
                "{bad}: {err}"
            );
            assert!(
                err.contains("e.g. 100/s or 100/s,10/s per-client"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn identity_flags_default_to_the_injected_token_and_a_bounded_wait() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        assert_eq!(args.identity_token, Path::new(DEFAULT_IDENTITY_TOKEN));
        assert_eq!(args.identity_wait, Duration::from_secs(5));
        let args = Args::try_parse_from([
            "remora-proxy",
            "--identity-token",
            "/tmp/token",
            "--identity-wait",
            "250ms",
        ])
        .unwrap();
        assert_eq!(args.identity_token, Path::new("/tmp/token"));
        assert_eq!(args.identity_wait, Duration::from_millis(250));
        let args = Args::try_parse_from(["remora-proxy", "--identity-wait", "0"]).unwrap();
        assert!(args.identity_wait.is_zero());
        let err = Args::try_parse_from(["remora-proxy", "--identity-wait", "soon"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--identity-wait") && err.contains("soon"),
            "{err}"
        );
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for text in [
            "--identity-token <FILE>",
            "[default: /var/run/secrets/remora.io/identity/token]",
            "--identity-wait <DURATION>",
            "[default: 5s]",
        ] {
            assert!(help.contains(text), "{text} missing from\n{help}");
        }
    }

    #[test]
    fn a_bad_duration_names_the_flag() {
        let err = Args::try_parse_from(["remora-proxy", "--connect-timeout", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--connect-timeout"), "{err}");
    }

    #[test]
    fn tcp_keepalive_takes_whole_seconds_or_0_for_off() {
        let keepalive = |argv: &[&str]| {
            let args = Args::try_parse_from([&["remora-proxy"], argv].concat())?;
            Ok::<_, clap::Error>(Keepalive::after(args.tcp_keepalive))
        };
        assert_eq!(
            keepalive(&[]).unwrap(),
            Keepalive::after(Duration::from_secs(10))
        );
        for (text, secs) in [("1s", 1), ("2m", 120), ("30", 30), ("32767s", 32_767)] {
            assert_eq!(
                keepalive(&["--tcp-keepalive", text]).unwrap(),
                Keepalive::after(Duration::from_secs(secs)),
                "{text}"
            );
        }
        assert_eq!(keepalive(&["--tcp-keepalive", "0"]).unwrap(), None);
        for bad in ["1500ms", "500ms", "32768s", "1h", "soon"] {
            let err = keepalive(&["--tcp-keepalive", bad])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--tcp-keepalive") && err.contains(bad) && err.contains("whole"),
                "{err}"
            );
        }
    }

    #[test]
    fn loopback_and_wildcard_listeners_get_an_ipv6_companion() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        let text = |addrs: Vec<SocketAddr>| {
            addrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(text(args.outbound_addrs()), "127.0.0.1:15001 [::1]:15001");
        assert_eq!(text(args.inbound_addrs()), "0.0.0.0:15006 [::]:15006");
        assert_eq!(text(args.admin_addrs()), "0.0.0.0:15020 [::]:15020");
        let args =
            Args::try_parse_from(["remora-proxy", "--outbound-listen", "198.18.0.1:9"]).unwrap();
        assert_eq!(text(args.outbound_addrs()), "198.18.0.1:9");
    }

    #[test]
    fn the_listener_defaults_are_the_ports_remora_init_redirects_to_and_help_shows_them() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        assert_eq!(args.outbound_listen.port(), DEFAULT_OUTBOUND_PORT);
        assert_eq!(args.inbound_listen.port(), DEFAULT_INBOUND_PORT);
        assert_eq!(args.admin_listen.port(), ADMIN_PORT);
        assert!(args.outbound_listen.ip().is_loopback());
        assert!(
            args.inbound_listen.ip().is_unspecified() && args.admin_listen.ip().is_unspecified()
        );
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for default in [
            format!("[default: 127.0.0.1:{DEFAULT_OUTBOUND_PORT}]"),
            format!("[default: 0.0.0.0:{DEFAULT_INBOUND_PORT}]"),
            format!("[default: 0.0.0.0:{ADMIN_PORT}]"),
        ] {
            assert!(help.contains(&default), "{default} missing from\n{help}");
        }
    }

    #[test]
    fn the_default_opaque_ports_are_the_server_first_protocols() {
        let args = Args::try_parse_from(["remora-proxy"]).unwrap();
        assert!(args.opaque_ports.contains(3306) && args.opaque_ports.contains(25));
        assert!(!args.opaque_ports.contains(80));
        let err = Args::try_parse_from(["remora-proxy", "--opaque-ports", "9-1"]).unwrap_err();
        assert!(err.to_string().contains("9-1"), "{err}");
    }

    #[test]
    fn cpu_limits_round_up_and_no_limit_is_none() {
        assert_eq!(cpus_from_quota("50000", "100000"), Some(1));
        assert_eq!(cpus_from_quota("150000", "100000"), Some(2));
        assert_eq!(cpus_from_quota("-1", "100000"), None);
        assert_eq!(cpus_from_quota("100000", "0"), None);
    }

    #[test]
    fn cgroup_v2_cpu_max_of_the_own_cgroup_wins() {
        let root = std::env::temp_dir().join(format!("remora-cg-{}", std::process::id()));
        let own = root.join("sys/fs/cgroup/kubepods/pod1");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::create_dir_all(root.join("proc/self")).unwrap();
        std::fs::write(root.join("proc/self/cgroup"), "0::/kubepods/pod1\n").unwrap();
        std::fs::write(own.join("cpu.max"), "250000 100000\n").unwrap();
        std::fs::write(root.join("sys/fs/cgroup/cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit(&root), Some(3));
        std::fs::write(own.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_cpu_limit(&root), None);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
