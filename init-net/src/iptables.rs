//! Talks to iptables: picks the backend, reads the `nat` table, applies one restore per family.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use tracing::{info, warn};

use crate::config::{Backend, InitConfig, Ipv6Mode};
use crate::rules::{self, Family, NatTable, RemoraRules};

/// How long iptables waits for the xtables lock (held by any other iptables user on the node's
/// `/run`, or the pod's) before giving up.
const LOCK_WAIT_SECONDS: u32 = 30;

/// Where the kernel lists the interface addresses of the current network namespace.
const IF_INET6: &str = "/proc/net/if_inet6";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "`{binary}` was not found in PATH: install iptables (Debian/Ubuntu: apt-get install iptables) \
         or choose another --backend"
    )]
    MissingBinary { binary: String },
    #[error(
        "`{binary}`: permission denied — remora-init needs root with CAP_NET_ADMIN and CAP_NET_RAW \
         in the pod's network namespace ({detail})"
    )]
    PermissionDenied { binary: String, detail: String },
    #[error("running `{binary}`: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("reading {path} to decide --ipv6 auto: {source}")]
    ReadAddresses {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("writing the dry-run output: {0}")]
    Output(std::io::Error),
}

/// An iptables implementation, after `--backend auto` has been decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implementation {
    Nft,
    Legacy,
}

impl Implementation {
    fn name(self) -> &'static str {
        match self {
            Self::Nft => "nft",
            Self::Legacy => "legacy",
        }
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The save and restore commands of one implementation for one family.
#[derive(Debug, Clone, Copy)]
pub struct Iptables {
    pub implementation: Implementation,
    pub family: Family,
}

impl Iptables {
    pub fn new(implementation: Implementation, family: Family) -> Self {
        Self {
            implementation,
            family,
        }
    }

    /// `iptables-nft-save`, `ip6tables-legacy-restore`, …: named explicitly, so what runs never
    /// depends on where the image's `iptables` alternative points.
    pub fn binary(&self, tool: &str) -> String {
        format!(
            "{}-{}-{tool}",
            self.family.command(),
            self.implementation.name()
        )
    }

    /// The current `nat` table.
    pub fn save(&self) -> Result<NatTable, Error> {
        let binary = self.binary("save");
        let stdout = execute(Command::new(&binary).args(["-t", "nat"]), &binary, None)?;
        Ok(NatTable::parse(&stdout))
    }

    /// Applies `input` with one `iptables-restore --noflush`: all of it or none of it.
    pub fn restore(&self, input: &str) -> Result<(), Error> {
        let binary = self.binary("restore");
        execute(
            Command::new(&binary)
                .arg("--noflush")
                .arg(format!("--wait={LOCK_WAIT_SECONDS}")),
            &binary,
            Some(input),
        )
        .map(drop)
    }
}

/// Runs `cmd`, feeding it `stdin`, and returns its stdout; failures are told apart by cause.
fn execute(cmd: &mut Command, binary: &str, stdin: Option<&str>) -> Result<String, Error> {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingBinary {
                binary: binary.to_string(),
            },
            _ => Error::Spawn {
                binary: binary.to_string(),
                source,
            },
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error means the child exited early; its status and stderr say why.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        binary: binary.to_string(),
        source,
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    if stderr.contains("Permission denied") || stderr.contains("Operation not permitted") {
        return Err(Error::PermissionDenied {
            binary: binary.to_string(),
            detail: stderr,
        });
    }
    Err(Error::Failed {
        command: format!("{cmd:?}").replace('"', ""),
        status: out.status,
        stderr,
    })
}

/// Whether `/proc/net/if_inet6` text lists a global-scope address (scope field `00`).
pub fn has_global_ipv6(if_inet6: &str) -> bool {
    if_inet6
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3))
        .any(|scope| scope == "00")
}

/// The families to write rules for. `--ipv6 auto` looks at the pod's own addresses: a kernel
/// without IPv6 has no `if_inet6` at all, which means IPv4 only. `--cleanup` with `auto` takes
/// IPv6 whenever the kernel has it, so rules written while the pod had a global address still go.
pub fn families(mode: Ipv6Mode, cleanup: bool) -> Result<Vec<Family>, Error> {
    let v6 = match mode {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => match std::fs::read_to_string(IF_INET6) {
            Ok(text) => cleanup || has_global_ipv6(&text),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => false,
            Err(source) => {
                return Err(Error::ReadAddresses {
                    path: IF_INET6,
                    source,
                })
            }
        },
    };
    info!(ipv6 = v6, mode = ?mode, "address families");
    Ok(if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    })
}

/// Resolves `--backend`. `auto` does what kube-proxy's detection does: legacy only when the
/// legacy `nat` table of some family already holds rules or chains, else nft. The `nat` table,
/// not `filter`: it is the one kube-proxy and remora write. No legacy tools, or a kernel without
/// the legacy nat table, means nft.
pub fn choose_backend(requested: Backend, families: &[Family]) -> Result<Implementation, Error> {
    let chosen = match requested {
        Backend::Nft => (Implementation::Nft, "asked for"),
        Backend::Legacy => (Implementation::Legacy, "asked for"),
        Backend::Auto => {
            let mut legacy_in_use = false;
            for &family in families {
                match Iptables::new(Implementation::Legacy, family).save() {
                    Ok(table) if table.in_use() => legacy_in_use = true,
                    Ok(_) => {}
                    Err(Error::MissingBinary { binary }) => {
                        info!(%binary, "no legacy iptables here");
                    }
                    // A kernel without the legacy nat module: nothing can be in use there.
                    Err(err @ Error::Failed { .. }) => {
                        info!(%family, "the legacy nat table cannot be read, so it is not in use: {err}");
                    }
                    Err(err) => return Err(err),
                }
            }
            if legacy_in_use {
                (
                    Implementation::Legacy,
                    "the legacy nat table already holds rules",
                )
            } else {
                (Implementation::Nft, "the legacy nat table is empty")
            }
        }
    };
    info!(backend = %chosen.0, reason = chosen.1, "iptables backend chosen");
    Ok(chosen.0)
}

/// What one family's run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Unchanged,
}

/// Writes (or, with `cleanup`, removes) the remora rules of one family. Returns what it did.
pub fn apply(config: &InitConfig, iptables: Iptables) -> Result<Outcome, Error> {
    let started = Instant::now();
    let wanted = wanted(config, iptables.family);
    let current = iptables.save()?.remora();
    let outcome = match rules::restore_input(&current, &wanted) {
        Some(input) => {
            iptables.restore(&input)?;
            Outcome::Applied
        }
        None => Outcome::Unchanged,
    };
    let elapsed_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    let action = match (outcome, config.cleanup) {
        (Outcome::Unchanged, _) => "unchanged",
        (Outcome::Applied, false) => "applied",
        (Outcome::Applied, true) => "cleaned up",
    };
    info!(
        family = %iptables.family,
        backend = %iptables.implementation,
        rules = if config.cleanup { current.rule_count() } else { wanted.rule_count() },
        elapsed_ms,
        "{action}"
    );
    Ok(outcome)
}

/// What the run wants in the table: the rendered rules, or nothing for `--cleanup`.
fn wanted(config: &InitConfig, family: Family) -> RemoraRules {
    if config.cleanup {
        RemoraRules::default()
    } else {
        rules::render(config, family)
    }
}

/// Writes to `out` the exact restore input each family would get, touching nothing. Where the
/// current table cannot be read (no iptables, no permission), the input is shown as for a table
/// without remora rules, and a warning says so.
pub fn dry_run(
    config: &InitConfig,
    implementation: Implementation,
    families: &[Family],
    out: &mut impl Write,
) -> Result<(), Error> {
    for &family in families {
        let iptables = Iptables::new(implementation, family);
        let current = match iptables.save() {
            Ok(table) => table.remora(),
            Err(err) => {
                warn!(%family, "cannot read the current nat table, showing the input for an empty one: {err}");
                RemoraRules::default()
            }
        };
        let restore = format!("{} --noflush", iptables.binary("restore"));
        let text = match rules::restore_input(&current, &wanted(config, family)) {
            Some(input) => format!("# {family}: {restore}\n{input}"),
            None => format!("# {family}: unchanged, nothing to apply\n"),
        };
        out.write_all(text.as_bytes()).map_err(Error::Output)?;
        info!(%family, backend = %implementation, "dry run: printed, nothing applied");
    }
    Ok(())
}

/// The whole run after the flags are validated: families, backend, then each family in turn.
pub fn run(config: &InitConfig, out: &mut impl Write) -> Result<(), Error> {
    let families = families(config.ipv6, config.cleanup)?;
    if config.dry_run {
        let implementation = match choose_backend(config.backend, &families) {
            Ok(implementation) => implementation,
            Err(err) => {
                warn!("cannot detect the backend, showing nft: {err}");
                Implementation::Nft
            }
        };
        return dry_run(config, implementation, &families, out);
    }
    let implementation = choose_backend(config.backend, &families)?;
    for family in families {
        apply(config, Iptables::new(implementation, family))?;
    }
    warn_about_the_other_backend(implementation);
    Ok(())
}

/// Rules in both backends would both run; after a backend switch the old ones must go by hand.
fn warn_about_the_other_backend(used: Implementation) {
    let other = match used {
        Implementation::Nft => Implementation::Legacy,
        Implementation::Legacy => Implementation::Nft,
    };
    if let Ok(table) = Iptables::new(other, Family::V4).save() {
        if !table.remora().is_empty() {
            warn!(
                "the {other} backend holds REMORA_ rules too; remove them with \
                 `remora-init --cleanup --backend {other}`"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_ipv6_is_scope_zero() {
        let link_local_and_loopback = "\
00000000000000000000000000000001 01 80 10 80       lo
fe800000000000000000000000000001 02 40 20 80     eth0
";
        assert!(!has_global_ipv6(link_local_and_loopback));
        let global = format!(
            "{link_local_and_loopback}20010002000000000000000000000001 02 40 00 80     eth0\n"
        );
        assert!(has_global_ipv6(&global));
        assert!(!has_global_ipv6(""));
    }

    #[test]
    fn binaries_are_named_per_family_and_backend() {
        assert_eq!(
            Iptables::new(Implementation::Nft, Family::V4).binary("save"),
            "iptables-nft-save"
        );
        assert_eq!(
            Iptables::new(Implementation::Legacy, Family::V6).binary("restore"),
            "ip6tables-legacy-restore"
        );
    }

    #[test]
    fn a_missing_binary_is_named() {
        let err = execute(
            &mut Command::new("remora-no-such-iptables"),
            "remora-no-such-iptables",
            None,
        )
        .unwrap_err();
        assert!(matches!(err, Error::MissingBinary { .. }));
        assert!(
            err.to_string().contains("`remora-no-such-iptables`"),
            "{err}"
        );
    }
}
