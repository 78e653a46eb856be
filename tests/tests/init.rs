//! remora-init end to end: real namespaces, real iptables on both backends, real connections.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use remora_e2e::*;

const BACKENDS: [&str; 2] = ["nft", "legacy"];
/// A second remote IPv6 address, added by the tests that exclude a CIDR.
const REMOTE2_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);

/// Runs `remora-init ARGS` as root inside the pod.
fn init(pod: &Pod, args: &[&str]) -> Output {
    pod.pod
        .command(bin("remora-init"))
        .args(args)
        .output()
        .expect("spawning remora-init")
}

/// Runs `remora-init ARGS`, fails the test unless it exits 0, and returns its log (stderr).
fn init_ok(pod: &Pod, args: &[&str]) -> String {
    let out = init(pod, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "remora-init {args:?} failed ({}): {stderr}",
        out.status
    );
    stderr
}

/// `iptables-BACKEND-save -t nat` for one family, with comments (timestamps) dropped and chain
/// counters zeroed, so two saves of the same rules compare equal.
fn save(pod: &Pod, backend: &str, v6: bool) -> String {
    let tool = format!(
        "{}-{backend}-save",
        if v6 { "ip6tables" } else { "iptables" }
    );
    let out = pod.pod.exec_ok(&[&tool, "-t", "nat"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match line.strip_prefix(':') {
            Some(decl) => {
                let mut words = decl.split_whitespace();
                format!(
                    ":{} {}",
                    words.next().unwrap_or_default(),
                    words.next().unwrap_or_default()
                )
            }
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Both families' nat tables of one backend.
fn nat_state(pod: &Pod, backend: &str) -> String {
    format!(
        "{}\n{}",
        save(pod, backend, false),
        save(pod, backend, true)
    )
}

/// Runs an iptables command (`iptables-nft -t nat -A …`) for one family inside the pod.
fn iptables(pod: &Pod, backend: &str, v6: bool, args: &[&str]) {
    let tool = format!("{}-{backend}", if v6 { "ip6tables" } else { "iptables" });
    let mut argv = vec![tool.as_str(), "-w"];
    argv.extend_from_slice(args);
    pod.pod.exec_ok(&argv).unwrap();
}

/// A foreign chain and rules in both families, as another tool (kube-proxy, a CNI) would leave.
fn add_foreign_rules(pod: &Pod, backend: &str) {
    for (v6, dest) in [(false, "198.18.0.9/32"), (true, "2001:2::9/128")] {
        iptables(pod, backend, v6, &["-t", "nat", "-N", "FOREIGN"]);
        iptables(
            pod,
            backend,
            v6,
            &["-t", "nat", "-A", "FOREIGN", "-p", "tcp", "-j", "RETURN"],
        );
        iptables(
            pod,
            backend,
            v6,
            &["-t", "nat", "-A", "OUTPUT", "-d", dest, "-j", "FOREIGN"],
        );
        iptables(
            pod,
            backend,
            v6,
            &["-t", "nat", "-A", "PREROUTING", "-d", dest, "-j", "RETURN"],
        );
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.lines().filter(|line| *line == needle).count()
}

/// Generates one `#[test]` per backend from a `fn(backend: &str)`.
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod nft {
            $(#[test] fn $case() { if remora_e2e::can_run() { super::$case("nft") } })*
        }
        mod legacy {
            $(#[test] fn $case() { if remora_e2e::can_run() { super::$case("legacy") } })*
        }
    };
}

on_both_backends!(
    a_second_run_changes_nothing,
    other_flags_replace_the_rules_with_one_jump_per_hook,
    cleanup_removes_remora_and_leaves_foreign_rules,
    dry_run_prints_the_input_and_touches_nothing,
    traffic_v4,
    traffic_v6,
    traffic_include_lists,
);

fn a_second_run_changes_nothing(backend: &str) {
    let pod = Pod::new().unwrap();
    // `--ipv6 auto`: the pod has a global IPv6 address, so both families get rules.
    let first = init_ok(&pod, &["--backend", backend]);
    assert_eq!(first.matches(" applied ").count(), 2, "{first}");
    let before = nat_state(&pod, backend);
    for v6 in [false, true] {
        let table = save(&pod, backend, v6);
        assert_eq!(count(&table, "-A PREROUTING -p tcp -j REMORA_INBOUND"), 1);
        assert_eq!(count(&table, "-A OUTPUT -p tcp -j REMORA_OUTBOUND"), 1);
        let loopback = if v6 { "::1/128" } else { "127.0.0.0/8" };
        assert_eq!(
            count(
                &table,
                &format!("-A REMORA_OUTBOUND -d {loopback} -j RETURN")
            ),
            1,
            "{table}"
        );
    }
    let second = init_ok(&pod, &["--backend", backend]);
    assert_eq!(second.matches(" unchanged ").count(), 2, "{second}");
    assert!(!second.contains(" applied "), "{second}");
    assert_eq!(nat_state(&pod, backend), before);

    // Every kind of rule must read back from iptables-save exactly as rendered, or a re-run
    // would rewrite the rules each time.
    let every_kind = [
        "--backend",
        backend,
        "--proxy-uid",
        "2102",
        "--proxy-gid",
        "2103",
        "--include-inbound-ports",
        "80,8080-8090",
        "--exclude-inbound-ports",
        "9000-9100,9999",
        "--include-outbound-cidrs",
        "10.0.0.0/8,198.18.0.0/15,fd00::/8,2001:2::/48",
        "--exclude-outbound-cidrs",
        "10.96.0.0/12,198.18.0.9,fd00:10:96::/112,2001:2::9",
        "--exclude-outbound-ports",
        "53,5432-5433",
    ];
    let first = init_ok(&pod, &every_kind);
    assert_eq!(first.matches(" applied ").count(), 2, "{first}");
    let before = nat_state(&pod, backend);
    let second = init_ok(&pod, &every_kind);
    assert_eq!(second.matches(" unchanged ").count(), 2, "{second}");
    assert_eq!(nat_state(&pod, backend), before);
}

fn other_flags_replace_the_rules_with_one_jump_per_hook(backend: &str) {
    let pod = Pod::new().unwrap();
    add_foreign_rules(&pod, backend);
    // A chain from an older remora with a jump into it: the replacement must remove both.
    for v6 in [false, true] {
        iptables(&pod, backend, v6, &["-t", "nat", "-N", "REMORA_OLD"]);
        iptables(
            &pod,
            backend,
            v6,
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REMORA_OLD"],
        );
    }
    init_ok(&pod, &["--backend", backend]);
    let log = init_ok(
        &pod,
        &[
            "--backend",
            backend,
            "--include-inbound-ports",
            "8080",
            "--exclude-outbound-ports",
            "9000",
        ],
    );
    assert_eq!(log.matches(" applied ").count(), 2, "{log}");
    for v6 in [false, true] {
        let table = save(&pod, backend, v6);
        assert_eq!(
            count(&table, "-A PREROUTING -p tcp -j REMORA_INBOUND"),
            1,
            "{table}"
        );
        assert_eq!(
            count(&table, "-A OUTPUT -p tcp -j REMORA_OUTBOUND"),
            1,
            "{table}"
        );
        assert!(!table.contains("REMORA_OLD"), "{table}");
        assert!(
            table.contains(
                "-A REMORA_INBOUND -p tcp -m tcp --dport 8080 -j REMORA_INBOUND_REDIRECT"
            ),
            "{table}"
        );
        assert!(
            !table.contains("-A REMORA_INBOUND -p tcp -j REMORA_INBOUND_REDIRECT"),
            "the old catch-all is gone: {table}"
        );
        assert!(
            table.contains("-A REMORA_OUTBOUND -p tcp -m tcp --dport 9000 -j RETURN"),
            "{table}"
        );
        assert_eq!(count(&table, ":FOREIGN -"), 1, "{table}");
        assert_eq!(
            table.matches("-j FOREIGN").count(),
            1,
            "foreign rules stay: {table}"
        );
    }
    // And the replacement is itself stable.
    let again = init_ok(
        &pod,
        &[
            "--backend",
            backend,
            "--include-inbound-ports",
            "8080",
            "--exclude-outbound-ports",
            "9000",
        ],
    );
    assert_eq!(again.matches(" unchanged ").count(), 2, "{again}");
}

fn cleanup_removes_remora_and_leaves_foreign_rules(backend: &str) {
    let pod = Pod::new().unwrap();
    add_foreign_rules(&pod, backend);
    let foreign_only = nat_state(&pod, backend);
    init_ok(
        &pod,
        &["--backend", backend, "--exclude-outbound-ports", "53"],
    );
    assert!(nat_state(&pod, backend).contains("REMORA_"));
    let log = init_ok(&pod, &["--backend", backend, "--cleanup"]);
    assert_eq!(log.matches(" cleaned up ").count(), 2, "{log}");
    assert_eq!(nat_state(&pod, backend), foreign_only);
    let again = init_ok(&pod, &["--backend", backend, "--cleanup"]);
    assert_eq!(again.matches(" unchanged ").count(), 2, "{again}");
    assert_eq!(nat_state(&pod, backend), foreign_only);
}

fn dry_run_prints_the_input_and_touches_nothing(backend: &str) {
    let pod = Pod::new().unwrap();
    let empty = nat_state(&pod, backend);
    let out = init(&pod, &["--backend", backend, "--dry-run"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.matches("*nat\n").count(),
        2,
        "both families: {stdout}"
    );
    assert!(stdout.contains("-A REMORA_OUTBOUND -d ::1/128 -j RETURN"));
    assert!(stdout.contains("-A OUTPUT -p tcp -j REMORA_OUTBOUND"));
    assert_eq!(nat_state(&pod, backend), empty);

    // Over existing rules it prints the replacement (old jumps deleted) and still changes nothing.
    init_ok(&pod, &["--backend", backend]);
    let applied = nat_state(&pod, backend);
    let out = init(
        &pod,
        &[
            "--backend",
            backend,
            "--ipv6",
            "off",
            "--exclude-inbound-ports",
            "8081",
            "--dry-run",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(!stdout.contains("IPv6"), "--ipv6 off: {stdout}");
    assert!(stdout.contains("-D PREROUTING -p tcp -j REMORA_INBOUND"));
    assert!(stdout.contains("-A REMORA_INBOUND -p tcp -m tcp --dport 8081 -j RETURN"));
    assert_eq!(nat_state(&pod, backend), applied);

    // The printed input is exactly what a real run applies: feeding it by hand gives the same
    // table as running remora-init.
    let out = init(&pod, &["--backend", backend, "--cleanup", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for (v6, section) in stdout.split("# IPv").skip(1).enumerate() {
        let input: String = section.lines().skip(1).map(|l| format!("{l}\n")).collect();
        let tool = format!(
            "{}-{backend}-restore",
            if v6 == 1 { "ip6tables" } else { "iptables" }
        );
        let mut child = pod
            .pod
            .command(&tool)
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{input}");
    }
    assert_eq!(nat_state(&pod, backend), empty);
}

#[test]
fn auto_picks_legacy_only_when_the_legacy_nat_table_is_in_use() {
    if !can_run() {
        return;
    }
    let pod = Pod::new().unwrap();
    let log = init_ok(&pod, &[]);
    assert!(log.contains("backend=nft"), "{log}");
    assert!(save(&pod, "nft", false).contains("REMORA_OUTBOUND"));
    assert!(!save(&pod, "legacy", false).contains("REMORA_"));

    let pod = Pod::new().unwrap();
    // A kube-proxy-like rule in legacy nat (a filter rule would not count).
    iptables(
        &pod,
        "legacy",
        false,
        &["-t", "filter", "-A", "INPUT", "-j", "ACCEPT"],
    );
    init_ok(&pod, &["--dry-run"]);
    let log = init_ok(&pod, &["--cleanup", "--ipv6", "off"]);
    assert!(log.contains("backend=nft"), "filter is not nat: {log}");
    iptables(
        &pod,
        "legacy",
        false,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "198.18.0.0/24",
            "-j",
            "MASQUERADE",
        ],
    );
    let log = init_ok(&pod, &[]);
    assert!(log.contains("backend=legacy"), "{log}");
    assert!(save(&pod, "legacy", false).contains("REMORA_OUTBOUND"));
    assert!(save(&pod, "legacy", true).contains("REMORA_OUTBOUND"));
    assert!(!save(&pod, "nft", false).contains("REMORA_"));
    // Its own legacy rules keep it on legacy next time.
    let again = init_ok(&pod, &[]);
    assert!(
        again.contains("backend=legacy") && again.contains(" unchanged "),
        "{again}"
    );
}

#[test]
fn auto_picks_nft_without_legacy_tools_or_a_legacy_nat_table() {
    if !can_run() {
        return;
    }
    // A PATH with only the nft tools; then one whose legacy save fails as on a kernel without
    // the legacy nat module.
    let dir = std::env::temp_dir().join(format!("{}-path", unique_prefix()));
    std::fs::create_dir_all(&dir).unwrap();
    for tool in [
        "iptables-nft-save",
        "iptables-nft-restore",
        "ip6tables-nft-save",
        "ip6tables-nft-restore",
    ] {
        std::os::unix::fs::symlink(format!("/usr/sbin/{tool}"), dir.join(tool)).unwrap();
    }
    let run = |pod: &Pod| {
        let out = pod
            .pod
            .command("env")
            .arg(format!("PATH={}", dir.display()))
            .arg(bin("remora-init"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let pod = Pod::new().unwrap();
    let log = run(&pod);
    assert!(
        log.contains("no legacy iptables here") && log.contains("backend=nft"),
        "{log}"
    );
    assert!(save(&pod, "nft", false).contains("REMORA_OUTBOUND"));

    let fake = dir.join("iptables-legacy-save");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho \"iptables v1.8.9 (legacy): can't initialize iptables table `nat': \
         Table does not exist (do you need to insmod?)\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pod = Pod::new().unwrap();
    let log = run(&pod);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.contains("cannot be read, so it is not in use") && log.contains("backend=nft"),
        "{log}"
    );
    assert!(save(&pod, "nft", false).contains("REMORA_OUTBOUND"));
}

#[test]
fn bad_flags_exit_2_naming_the_flag_before_touching_anything() {
    if !can_run() {
        return;
    }
    let pod = Pod::new().unwrap();
    let before = nat_state(&pod, "nft");
    for (args, flag) in [
        (&["--inbound-port", "15001"][..], "--inbound-port"),
        (&["--outbound-port", "15020"][..], "--outbound-port"),
        (
            &["--exclude-inbound-ports", "0"][..],
            "--exclude-inbound-ports",
        ),
        (
            &["--exclude-outbound-ports", "70000"][..],
            "--exclude-outbound-ports",
        ),
        (
            &["--include-inbound-ports", "9100-9000"][..],
            "--include-inbound-ports",
        ),
        (
            &["--exclude-outbound-cidrs", "10.0.0.0/33"][..],
            "--exclude-outbound-cidrs",
        ),
        (&["--backend", "ebpf"][..], "--backend"),
    ] {
        let out = init(&pod, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
    assert_eq!(nat_state(&pod, "nft"), before);
}

#[test]
fn a_missing_binary_or_permission_is_named() {
    if !can_run() {
        return;
    }
    let pod = Pod::new().unwrap();
    let out = pod
        .pod
        .command("env")
        .arg("PATH=/nonexistent")
        .arg(bin("remora-init"))
        .args(["--backend", "nft"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`iptables-nft-save` was not found"),
        "{stderr}"
    );

    let out = pod
        .pod
        .command_as(PROXY_UID, PROXY_UID, bin("remora-init"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("permission denied") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );

    // A dry run needs no privilege: it shows the input for a table without remora rules.
    let out = pod
        .pod
        .command_as(PROXY_UID, PROXY_UID, bin("remora-init"))
        .arg("--dry-run")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("permission denied"), "says why: {stderr}");
    assert!(
        stdout.contains("-A OUTPUT -p tcp -j REMORA_OUTBOUND") && !stdout.contains("-D "),
        "{stdout}"
    );
}

#[test]
fn ipv6_auto_follows_the_pods_global_address() {
    if !can_run() {
        return;
    }
    let pod = Pod::new().unwrap();
    pod.pod
        .exec_ok(&["ip", "addr", "del", "2001:2::1/64", "dev", "eth0"])
        .unwrap();
    // Only the link-local address is left: not a reason for IPv6 rules.
    let log = init_ok(&pod, &["--backend", "nft"]);
    assert!(
        log.contains("family=IPv4") && !log.contains("family=IPv6"),
        "{log}"
    );
    assert!(!save(&pod, "nft", true).contains("REMORA_"));
    let log = init_ok(&pod, &["--backend", "nft", "--ipv6", "on"]);
    assert!(log.contains("family=IPv6"), "{log}");
    assert!(save(&pod, "nft", true).contains("REMORA_OUTBOUND"));
    // Cleanup with `auto` still removes IPv6 rules the pod no longer has an address for.
    let log = init_ok(&pod, &["--backend", "nft", "--cleanup"]);
    assert!(log.contains("family=IPv6"), "{log}");
    assert!(!save(&pod, "nft", true).contains("REMORA_"));
}

#[test]
fn rules_left_in_the_other_backend_are_reported() {
    if !can_run() {
        return;
    }
    let pod = Pod::new().unwrap();
    init_ok(&pod, &["--backend", "legacy"]);
    let log = init_ok(&pod, &["--backend", "nft"]);
    assert!(
        log.contains("the legacy backend holds REMORA_ rules too"),
        "{log}"
    );
    init_ok(&pod, &["--backend", "legacy", "--cleanup"]);
    let log = init_ok(&pod, &["--backend", "nft"]);
    assert!(!log.contains("holds REMORA_ rules too"), "{log}");
}

// ---- traffic -------------------------------------------------------------------------------

/// A TCP listener that reports where each accepted connection was originally headed.
struct Probe {
    name: &'static str,
    listener: TcpListener,
}

/// One accepted connection: the address it reached and the one it was sent to.
#[derive(Debug)]
struct Accepted {
    local: SocketAddr,
    original_dst: Option<SocketAddr>,
}

impl Probe {
    /// Listens on `addr` inside `ns` (IPv6 sockets are IPv6 only, so both families can share a port).
    fn bind(ns: &NetNs, name: &'static str, addr: SocketAddr) -> Self {
        let listener = ns
            .run_in(move || -> nix::Result<TcpListener> {
                let family = if addr.is_ipv6() {
                    AddressFamily::Inet6
                } else {
                    AddressFamily::Inet
                };
                let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
                socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
                if addr.is_ipv6() {
                    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
                }
                socket::bind(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    &SockaddrStorage::from(addr),
                )?;
                socket::listen(&fd, socket::Backlog::new(16)?)?;
                let listener = TcpListener::from(fd);
                listener
                    .set_nonblocking(true)
                    .map_err(|_| nix::Error::EINVAL)?;
                Ok(listener)
            })
            .unwrap()
            .unwrap_or_else(|err| panic!("binding {name} on {addr}: {err}"));
        Self { name, listener }
    }

    /// The next connection, waiting at most `limit`.
    fn accept_within(&self, limit: Duration) -> Option<Accepted> {
        let deadline = Instant::now() + limit;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => return Some(accepted(&stream)),
                Err(err) if err.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return None,
            }
        }
    }
}

fn accepted(stream: &TcpStream) -> Accepted {
    let local = stream.local_addr().unwrap();
    // Without NAT there may be no conntrack entry to ask: no original destination then.
    let original_dst = if local.is_ipv6() {
        socket::getsockopt(stream, sockopt::Ip6tOriginalDst)
            .ok()
            .map(|sa| SocketAddr::V6(socket::SockaddrIn6::from(sa).into()))
    } else {
        socket::getsockopt(stream, sockopt::OriginalDst)
            .ok()
            .map(|sa| SocketAddr::V4(socket::SockaddrIn::from(sa).into()))
    };
    Accepted {
        local,
        original_dst,
    }
}

/// Who opens a connection.
#[derive(Debug, Clone, Copy)]
enum Client {
    /// Root in the pod: an application.
    PodRoot,
    /// A process in the pod with this uid and gid.
    PodAs(u32, u32),
    /// Root on the remote host.
    Remote,
}

fn connect(pod: &Pod, client: Client, to: SocketAddr) {
    match client {
        Client::PodRoot | Client::Remote => {
            let ns = if matches!(client, Client::Remote) {
                &pod.remote
            } else {
                &pod.pod
            };
            ns.run_in(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))
                .unwrap()
                .unwrap_or_else(|err| panic!("{client:?} connecting to {to}: {err}"));
        }
        Client::PodAs(uid, gid) => {
            // bash's /dev/tcp: a connect from a process that really runs as that uid and gid.
            let script = format!("exec 3<>/dev/tcp/{}/{}", to.ip(), to.port());
            let out = pod
                .pod
                .command_as(uid, gid, "timeout")
                .args(["5", "bash", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{client:?} connecting to {to}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The addresses of one family in the traffic tests.
struct Net {
    pod: IpAddr,
    remote: IpAddr,
    remote2: IpAddr,
    any: IpAddr,
    loopback: IpAddr,
}

const V4: Net = Net {
    pod: IpAddr::V4(POD_V4),
    remote: IpAddr::V4(REMOTE_V4),
    remote2: IpAddr::V4(REMOTE2_V4),
    any: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    loopback: IpAddr::V4(Ipv4Addr::LOCALHOST),
};

const V6: Net = Net {
    pod: IpAddr::V6(POD_V6),
    remote: IpAddr::V6(REMOTE_V6),
    remote2: IpAddr::V6(REMOTE2_V6),
    any: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    loopback: IpAddr::V6(Ipv6Addr::LOCALHOST),
};

fn traffic_v4(backend: &str) {
    traffic(backend, &V4);
}

fn traffic_v6(backend: &str) {
    traffic(backend, &V6);
}

/// Every redirection decision, checked by which listener a connection reaches and with what
/// original destination.
fn traffic(backend: &str, net: &Net) {
    let pod = Pod::new().unwrap();
    if net.remote2.is_ipv6() {
        pod.remote
            .exec_ok(&["ip", "addr", "add", "2001:2::3/64", "dev", "eth0", "nodad"])
            .unwrap();
    }
    let excluded_cidr = format!("{}", net.remote2);
    init_ok(
        &pod,
        &[
            "--backend",
            backend,
            "--ipv6",
            "on",
            "--exclude-outbound-ports",
            "9000",
            "--exclude-outbound-cidrs",
            &excluded_cidr,
            "--exclude-inbound-ports",
            "8081",
        ],
    );

    let outbound = Probe::bind(&pod.pod, "proxy outbound", addr(net.loopback, 15001));
    let inbound = Probe::bind(&pod.pod, "proxy inbound", addr(net.any, 15006));
    let admin = Probe::bind(&pod.pod, "proxy admin", addr(net.any, 15020));
    let app = Probe::bind(&pod.pod, "app :8080", addr(net.any, 8080));
    let app_excluded = Probe::bind(&pod.pod, "app :8081", addr(net.any, 8081));
    let remote = Probe::bind(&pod.remote, "remote :8080", addr(net.any, 8080));
    let remote_excluded = Probe::bind(&pod.remote, "remote :9000", addr(net.any, 9000));
    let probes = [
        &outbound,
        &inbound,
        &admin,
        &app,
        &app_excluded,
        &remote,
        &remote_excluded,
    ];

    let to = |ip: IpAddr, port: u16| addr(ip, port);
    let proxy = Client::PodAs(PROXY_UID, PROXY_UID);
    // (case, client, destination, listener that must get it, address it must arrive at)
    let cases: Vec<(&str, Client, SocketAddr, &Probe, SocketAddr)> = vec![
        (
            "app to remote: redirected to the outbound port",
            Client::PodRoot,
            to(net.remote, 8080),
            &outbound,
            to(net.loopback, 15001),
        ),
        (
            "proxy uid (other gid) to remote: not redirected",
            Client::PodAs(PROXY_UID, 4242),
            to(net.remote, 8080),
            &remote,
            to(net.remote, 8080),
        ),
        (
            "proxy gid (other uid) to remote: not redirected",
            Client::PodAs(4242, PROXY_UID),
            to(net.remote, 8080),
            &remote,
            to(net.remote, 8080),
        ),
        (
            "other uid to remote: redirected",
            Client::PodAs(4242, 4242),
            to(net.remote, 8080),
            &outbound,
            to(net.loopback, 15001),
        ),
        (
            "excluded outbound port: direct",
            Client::PodRoot,
            to(net.remote, 9000),
            &remote_excluded,
            to(net.remote, 9000),
        ),
        (
            "excluded outbound CIDR: direct",
            Client::PodRoot,
            to(net.remote2, 8080),
            &remote,
            to(net.remote2, 8080),
        ),
        (
            "app to loopback: direct",
            Client::PodRoot,
            to(net.loopback, 8080),
            &app,
            to(net.loopback, 8080),
        ),
        (
            "app to its own pod IP: direct",
            Client::PodRoot,
            to(net.pod, 8080),
            &app,
            to(net.pod, 8080),
        ),
        (
            "proxy forwarding inbound to the pod IP: not redirected again",
            proxy,
            to(net.pod, 8080),
            &app,
            to(net.pod, 8080),
        ),
        (
            "remote to an app port: redirected to the inbound port",
            Client::Remote,
            to(net.pod, 8080),
            &inbound,
            to(net.pod, 15006),
        ),
        (
            "remote to the admin port: never redirected",
            Client::Remote,
            to(net.pod, 15020),
            &admin,
            to(net.pod, 15020),
        ),
        (
            "remote to an excluded inbound port: direct",
            Client::Remote,
            to(net.pod, 8081),
            &app_excluded,
            to(net.pod, 8081),
        ),
    ];
    expect_routes(backend, &pod, &probes, cases);
}

/// With include lists, only the named inbound ports and outbound networks are redirected.
fn traffic_include_lists(backend: &str) {
    let net = &V4;
    let pod = Pod::new().unwrap();
    let included_cidr = format!("{}/32", net.remote);
    init_ok(
        &pod,
        &[
            "--backend",
            backend,
            "--ipv6",
            "off",
            "--include-inbound-ports",
            "8080",
            "--include-outbound-cidrs",
            &included_cidr,
        ],
    );
    let outbound = Probe::bind(&pod.pod, "proxy outbound", addr(net.loopback, 15001));
    let inbound = Probe::bind(&pod.pod, "proxy inbound", addr(net.any, 15006));
    let app = Probe::bind(&pod.pod, "app :8080", addr(net.any, 8080));
    let app_other = Probe::bind(&pod.pod, "app :8081", addr(net.any, 8081));
    let remote = Probe::bind(&pod.remote, "remote :8080", addr(net.any, 8080));
    let probes = [&outbound, &inbound, &app, &app_other, &remote];
    let cases: Vec<(&str, Client, SocketAddr, &Probe, SocketAddr)> = vec![
        (
            "app to an included CIDR: redirected",
            Client::PodRoot,
            addr(net.remote, 8080),
            &outbound,
            addr(net.loopback, 15001),
        ),
        (
            "app to a CIDR not included: direct",
            Client::PodRoot,
            addr(net.remote2, 8080),
            &remote,
            addr(net.remote2, 8080),
        ),
        (
            "remote to an included port: redirected",
            Client::Remote,
            addr(net.pod, 8080),
            &inbound,
            addr(net.pod, 15006),
        ),
        (
            "remote to a port not included: direct",
            Client::Remote,
            addr(net.pod, 8081),
            &app_other,
            addr(net.pod, 8081),
        ),
    ];
    expect_routes(backend, &pod, &probes, cases);
}

/// Opens each case's connection and checks that exactly the expected listener got it, at the
/// expected address (for the proxy's listeners: with the real destination as original).
fn expect_routes(
    backend: &str,
    pod: &Pod,
    probes: &[&Probe],
    cases: Vec<(&str, Client, SocketAddr, &Probe, SocketAddr)>,
) {
    for (case, client, dest, expected, arrives_at) in cases {
        connect(pod, client, dest);
        let got = expected
            .accept_within(Duration::from_secs(3))
            .unwrap_or_else(|| panic!("{backend} {case}: nothing reached {}", expected.name));
        if expected.name.starts_with("proxy outbound") || expected.name.starts_with("proxy inbound")
        {
            // Redirected: the listener sees where the connection was really going.
            assert_eq!(got.original_dst, Some(dest), "{backend} {case}: {got:?}");
            assert_eq!(got.local.port(), arrives_at.port(), "{backend} {case}");
        } else {
            assert_eq!(got.local, arrives_at, "{backend} {case}: {got:?}");
        }
        for other in probes.iter().filter(|p| !std::ptr::eq(**p, expected)) {
            if let Some(stray) = other.accept_within(Duration::ZERO) {
                panic!("{backend} {case}: {} also got {stray:?}", other.name);
            }
        }
    }
}

// ---- measurement ---------------------------------------------------------------------------

/// The `elapsed_ms` of each family's "applied" log line.
fn applied_ms(log: &str) -> Vec<(String, f64)> {
    log.lines()
        .filter(|line| line.contains(" applied "))
        .filter_map(|line| {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name).map(str::to_string))
            };
            Some((field("family=")?, field("elapsed_ms=")?.parse().ok()?))
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// How long one family's apply takes, with no exclusions and with 50 per family, on both
/// backends: 20 runs each (a cleanup before every run, so each one really applies), median.
/// Prints one JSON line (`{"remora_init_apply":[…]}`); the whole-process time includes backend
/// detection, both families and `ip netns exec`. `REMORA_BIN_DIR=target/release` measures a
/// release build. Run: `cargo test -p remora-e2e --test init -- --ignored --nocapture bench`
#[test]
#[ignore = "measurement, not a check: run with --ignored"]
fn bench_apply_time_per_family() {
    if !can_run() {
        return;
    }
    const RUNS: usize = 20;
    let ports: Vec<String> = (0..20).map(|i| (20000 + i * 10).to_string()).collect();
    let inbound: Vec<String> = (0..15).map(|i| (30000 + i * 10).to_string()).collect();
    let v4: Vec<String> = (0..15).map(|i| format!("198.19.{i}.0/24")).collect();
    let v6: Vec<String> = (0..15).map(|i| format!("2001:2:0:{i:x}::/64")).collect();
    let cidrs = [v4, v6].concat().join(",");
    let (ports, inbound) = (ports.join(","), inbound.join(","));
    let fifty: Vec<&str> = vec![
        "--exclude-outbound-ports",
        &ports,
        "--exclude-inbound-ports",
        &inbound,
        "--exclude-outbound-cidrs",
        &cidrs,
    ];
    let mut results = Vec::new();
    for backend in BACKENDS {
        for (label, extra) in [("none", &[][..]), ("50", &fifty[..])] {
            let pod = Pod::new().unwrap();
            let mut args = vec!["--backend", backend, "--ipv6", "on"];
            args.extend_from_slice(extra);
            let mut cleanup = args.clone();
            cleanup.push("--cleanup");
            let (mut v4_ms, mut v6_ms, mut process_ms, mut rules) =
                (Vec::new(), Vec::new(), Vec::new(), 0);
            // Two unmeasured runs first: module loading and cold caches are not the steady state.
            for _ in 0..2 {
                init_ok(&pod, &args);
                init_ok(&pod, &cleanup);
            }
            for _ in 0..RUNS {
                init_ok(&pod, &cleanup);
                let started = Instant::now();
                let log = init_ok(&pod, &args);
                process_ms.push(started.elapsed().as_secs_f64() * 1000.0);
                for (family, ms) in applied_ms(&log) {
                    match family.as_str() {
                        "IPv4" => v4_ms.push(ms),
                        _ => v6_ms.push(ms),
                    }
                }
                rules = save(&pod, backend, false).matches("-A REMORA_").count();
            }
            assert_eq!((v4_ms.len(), v6_ms.len()), (RUNS, RUNS));
            results.push(format!(
                "{{\"backend\":\"{backend}\",\"exclusions\":\"{label}\",\"remora_chain_rules\":{rules},\
                 \"runs\":{RUNS},\"ipv4_median_ms\":{:.1},\"ipv6_median_ms\":{:.1},\
                 \"whole_process_median_ms\":{:.1}}}",
                median(v4_ms),
                median(v6_ms),
                median(process_ms)
            ));
        }
    }
    println!("{{\"remora_init_apply\":[{}]}}", results.join(","));
}
