//! Helpers for the end-to-end tests: pods built out of real network namespaces.
//!
//! A [`Pod`] is two namespaces joined by a veth pair: `pod` (the meshed pod, `eth0` with
//! 198.18.0.1/24 and 2001:2::1/64) and `remote` (another host, 198.18.0.2/24 and 2001:2::2/64).
//! Only benchmarking-range addresses are used. Namespace names are unique per process and per
//! pod, and both are deleted when the `Pod` is dropped, also when a test panics.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod dns;
pub mod echo;

pub const POD_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// A second remote address (on the remote host's `eth0` too), for exclusion tests.
pub const REMOTE2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

/// The uid and gid remora-proxy runs as.
pub const PROXY_UID: u32 = 1337;

/// Whether the end-to-end tests can run here. They need root (CI runs as root); elsewhere a test
/// calls this first and returns after a loud message.
pub fn can_run() -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    eprintln!(
        "\n!!! SKIPPED: end-to-end tests need root (network namespaces, iptables). Run `make test` as root.\n"
    );
    false
}

/// The directory of the workspace's binaries, built by `cargo build` before the tests run
/// (`make test` does). They sit in the profile directory above the test executable's `deps/`,
/// wherever the target directory is (`CARGO_TARGET_DIR`); `REMORA_BIN_DIR` overrides it, e.g.
/// for a release build.
fn bin_dir() -> PathBuf {
    let beside_tests = || {
        let exe = std::env::current_exe().ok()?;
        let deps = exe.parent().filter(|dir| dir.ends_with("deps"))?;
        deps.parent().map(PathBuf::from)
    };
    std::env::var_os("REMORA_BIN_DIR")
        .map(PathBuf::from)
        .or_else(beside_tests)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// The path of one of the workspace's binaries (see [`bin_dir`]); fails when it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// The path of one of the workspace's binaries, or `None` after a loud message when it has not
/// been built: for tests of a program that may not exist yet in a branch.
pub fn built(name: &str) -> Option<PathBuf> {
    let path = bin_dir().join(name);
    if path.exists() {
        return Some(path);
    }
    eprintln!(
        "\n!!! SKIPPED: {} is missing. Run `cargo build --workspace --bins` first (make test does).\n",
        path.display()
    );
    None
}

/// Runs a command to completion and fails with its stderr if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

/// A network namespace that is deleted (with every process still in it killed) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn create(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs inside the namespace as root.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A command that runs inside the namespace as `uid`/`gid` (no supplementary groups).
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "setpriv"])
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg(program);
        cmd
    }

    /// Runs `argv` inside the namespace as root and fails on a non-zero exit.
    pub fn exec_ok(&self, argv: &[&str]) -> Result<Output> {
        run(self.command(argv[0]).args(&argv[1..]))
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so sockets made in `f`
    /// belong to it. The process's other threads are untouched.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the thread inside {} panicked", self.name))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Kill whatever still runs inside, then delete: a namespace with processes lingers.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique namespace name prefix: `rm<pid>x<n>`, so parallel tests and parallel runs never meet.
pub fn unique_prefix() -> String {
    format!(
        "rm{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A meshed pod's network and the remote host it talks to.
pub struct Pod {
    pub pod: NetNs,
    pub remote: NetNs,
}

impl Pod {
    /// Two namespaces, a veth pair between them, both address families configured and up.
    pub fn new() -> Result<Self> {
        let prefix = unique_prefix();
        let pod = NetNs::create(format!("{prefix}-pod"))?;
        let remote = NetNs::create(format!("{prefix}-remote"))?;
        ip(&[
            "-n",
            pod.name(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            remote.name(),
        ])?;
        for (ns, v4, v6, extra) in [
            (&pod, POD_V4, POD_V6, None),
            (&remote, REMOTE_V4, REMOTE_V6, Some(REMOTE2_V4)),
        ] {
            let n = ns.name();
            ip(&["-n", n, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            if let Some(extra) = extra {
                ip(&[
                    "-n",
                    n,
                    "addr",
                    "add",
                    &format!("{extra}/24"),
                    "dev",
                    "eth0",
                ])?;
            }
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", n, "link", "set", "eth0", "up"])?;
        }
        Ok(Self { pod, remote })
    }
}

/// A child process that is killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it returns true, for at most `limit`.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

/// True once a TCP listener accepts connections at `addr` from inside `ns`.
pub fn wait_for_listener(ns: &NetNs, addr: std::net::SocketAddr, limit: Duration) -> bool {
    wait_until(limit, || {
        ns.run_in(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .unwrap_or(false)
    })
}

/// curl inside `ns`, always bounded in time (5 s).
pub fn curl(ns: &NetNs, args: &[&str]) -> Output {
    ns.command("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawning curl")
}

/// The HTTP status code of a GET of `url` from inside `ns`, or `None` when nothing answers.
pub fn status(ns: &NetNs, url: &str) -> Option<u16> {
    let out = curl(ns, &["-o", "/dev/null", "-w", "%{http_code}", url]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|&code| code != 0)
}

/// The value of one series in Prometheus text, `name{labels}` exactly as exposed; 0 when absent.
pub fn series_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The address family helper for tests that run the same case on both families.
pub fn addr(ip: impl Into<IpAddr>, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::new(ip.into(), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_can_reach_its_remote_on_both_families_and_is_cleaned_up() {
        if !can_run() {
            return;
        }
        let names;
        {
            let pod = Pod::new().unwrap();
            names = (pod.pod.name().to_string(), pod.remote.name().to_string());
            pod.pod
                .exec_ok(&["ping", "-c1", "-W2", &REMOTE_V4.to_string()])
                .or_else(|_| {
                    // ping may be missing: a TCP connect to a listener proves the link too.
                    let listener = pod
                        .remote
                        .run_in(|| std::net::TcpListener::bind((REMOTE_V4, 7000)).unwrap())
                        .unwrap();
                    let ok =
                        wait_for_listener(&pod.pod, addr(REMOTE_V4, 7000), Duration::from_secs(2));
                    drop(listener);
                    if ok {
                        Ok(pod.pod.exec_ok(&["true"]).unwrap())
                    } else {
                        bail!("no route")
                    }
                })
                .unwrap();
            let listener = pod
                .remote
                .run_in(|| std::net::TcpListener::bind((REMOTE_V6, 7001)).unwrap())
                .unwrap();
            assert!(wait_for_listener(
                &pod.pod,
                addr(REMOTE_V6, 7001),
                Duration::from_secs(2)
            ));
            drop(listener);
        }
        let list = String::from_utf8(ip(&["netns", "list"]).unwrap().stdout).unwrap();
        assert!(
            !list.contains(&names.0) && !list.contains(&names.1),
            "{list}"
        );
    }
}
