//! The remora NAT rules as text: rendered from the flags, read back from `iptables-save`, and
//! the one `iptables-restore --noflush` input that turns the current state into the wanted one.
//!
//! Everything here is pure (no processes, no files), so the rules can be tested and golden-filed
//! without a kernel. The rules are written in the exact form `iptables-save` prints them (both
//! backends print the same), so comparing what is there with what is wanted is a string compare.
//!
//! # The chains
//! ```text
//! PREROUTING -p tcp -> REMORA_INBOUND:  admin port 15020 RETURN, excluded inbound ports RETURN,
//!                                       included ports (or all) -> REMORA_INBOUND_REDIRECT
//! REMORA_INBOUND_REDIRECT:              REDIRECT --to-ports <inbound port>
//! OUTPUT -p tcp -> REMORA_OUTBOUND:     proxy uid RETURN, proxy gid RETURN, loopback destination
//!                                       RETURN, out via lo RETURN, excluded ports RETURN, excluded
//!                                       CIDRs RETURN, included CIDRs (or all) -> REMORA_OUTBOUND_REDIRECT
//! REMORA_OUTBOUND_REDIRECT:             REDIRECT --to-ports <outbound port>
//! ```
//!
//! # Decisions on the hard cases
//! - **The proxy's own traffic** (its uid *or* its gid) always returns first, on every interface.
//!   The proxy forwards an inbound connection to its original destination, the pod's own IP, as
//!   that uid over `lo`; matching it before anything else is what keeps it from being redirected
//!   again. Istio instead sends the proxy's `lo` traffic to a non-loopback address back to its
//!   inbound port and breaks the loop with a magic source address (127.0.0.6); remora's proxy
//!   does not bind such an address, so that rule would loop. The cost: an app calling its own
//!   Service passes the proxy once (outbound), not twice.
//! - **An app calling its own pod IP** (traffic leaving through `lo` to a non-loopback address):
//!   returns, not redirected — as in linkerd2-proxy-init. It never leaves the pod, so there is no
//!   peer for the proxy to speak for, and inbound NAT is never consulted for it either (the
//!   connection's NAT was decided in `OUTPUT`). Traffic to `127.0.0.0/8` (`::1/128`) returns by
//!   its own explicit rule, so loopback stays direct even if routing ever changes.
//! - **DNS**: only TCP is ever redirected, so UDP DNS is untouched. TCP DNS goes through the proxy
//!   like any TCP (it is carried as an opaque stream); `--exclude-outbound-ports 53` opts it out.
//! - **The admin port 15020** is always excluded inbound, whatever the include list says, so
//!   kubelet probes reach the proxy directly.
//! - **Per family**: each family gets only its own CIDRs. An include list with no CIDR of a family
//!   redirects nothing of that family (it named no destination there).
//! - **Jumps** are appended to `PREROUTING`/`OUTPUT` (after rules already there), matching only
//!   TCP so other protocols never even enter the remora chains.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{CidrSelection, InitConfig, PortRange, PortSelection, ADMIN_PORT};

/// Every chain remora writes starts with this.
pub const CHAIN_PREFIX: &str = "REMORA_";
pub const INBOUND_CHAIN: &str = "REMORA_INBOUND";
pub const INBOUND_REDIRECT_CHAIN: &str = "REMORA_INBOUND_REDIRECT";
pub const OUTBOUND_CHAIN: &str = "REMORA_OUTBOUND";
pub const OUTBOUND_REDIRECT_CHAIN: &str = "REMORA_OUTBOUND_REDIRECT";

/// The built-in chains of the `nat` table; any other chain is user-defined.
const BUILTIN_NAT_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

/// An IP family: one ruleset, one `iptables-restore` run each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The whole loopback network of the family.
    pub fn loopback(self) -> &'static str {
        match self {
            Self::V4 => "127.0.0.0/8",
            Self::V6 => "::1/128",
        }
    }

    /// The command prefix: `iptables` or `ip6tables`.
    pub fn command(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// The remora part of one family's `nat` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoraRules {
    /// Each `REMORA_` chain with its rules, in order, as `-A CHAIN ...` lines.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Rules in other chains that jump to a `REMORA_` chain, as `-A CHAIN ...` lines.
    pub jumps: Vec<String>,
}

impl RemoraRules {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }

    /// How many rules (`-A` lines) this set holds.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(Vec::len).sum::<usize>() + self.jumps.len()
    }

    /// Whether both hold the same chains, the same rules in each chain in the same order, and
    /// the same jumps (where a jump sits among foreign rules does not matter).
    pub fn same_as(&self, other: &Self) -> bool {
        let sorted = |jumps: &[String]| {
            let mut jumps: Vec<String> = jumps.iter().map(|j| normalize(j)).collect();
            jumps.sort();
            jumps
        };
        let normalized = |chains: &BTreeMap<String, Vec<String>>| {
            chains
                .iter()
                .map(|(name, rules)| (name.clone(), rules.iter().map(|r| normalize(r)).collect()))
                .collect::<BTreeMap<String, Vec<String>>>()
        };
        normalized(&self.chains) == normalized(&other.chains)
            && sorted(&self.jumps) == sorted(&other.jumps)
    }
}

fn normalize(rule: &str) -> String {
    rule.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Adds `rule` (the text after `-A CHAIN`) to `chain`.
fn push(chains: &mut BTreeMap<String, Vec<String>>, chain: &str, rule: impl fmt::Display) {
    chains
        .entry(chain.to_string())
        .or_default()
        .push(format!("-A {chain} {rule}"));
}

/// `--dport 8080` or `--dport 9000:9100`, as iptables-save prints it.
fn dport(range: &PortRange) -> String {
    if range.start == range.end {
        format!("-p tcp -m tcp --dport {}", range.start)
    } else {
        format!("-p tcp -m tcp --dport {}:{}", range.start, range.end)
    }
}

/// `-d NET ` (with the trailing space), or nothing for a `/0` network, which iptables-save omits.
fn destination(net: &ipnet::IpNet) -> String {
    if net.prefix_len() == 0 {
        String::new()
    } else {
        format!("-d {net} ")
    }
}

/// The rules remora wants in one family's `nat` table for these flags.
pub fn render(config: &InitConfig, family: Family) -> RemoraRules {
    let mut chains = BTreeMap::new();

    // Inbound: what arrives at the pod from outside.
    for chain in [INBOUND_CHAIN, INBOUND_REDIRECT_CHAIN] {
        chains.insert(chain.to_string(), Vec::new());
    }
    push(
        &mut chains,
        INBOUND_CHAIN,
        format_args!("{} -j RETURN", dport(&PortRange::single(ADMIN_PORT))),
    );
    for range in config.exclude_inbound_ports.iter() {
        push(
            &mut chains,
            INBOUND_CHAIN,
            format_args!("{} -j RETURN", dport(range)),
        );
    }
    match &config.include_inbound_ports {
        PortSelection::All => push(
            &mut chains,
            INBOUND_CHAIN,
            format_args!("-p tcp -j {INBOUND_REDIRECT_CHAIN}"),
        ),
        PortSelection::List(list) => {
            for range in list.iter() {
                push(
                    &mut chains,
                    INBOUND_CHAIN,
                    format_args!("{} -j {INBOUND_REDIRECT_CHAIN}", dport(range)),
                );
            }
        }
    }
    push(
        &mut chains,
        INBOUND_REDIRECT_CHAIN,
        format_args!("-p tcp -j REDIRECT --to-ports {}", config.inbound_port),
    );

    // Outbound: what processes in the pod send.
    for chain in [OUTBOUND_CHAIN, OUTBOUND_REDIRECT_CHAIN] {
        chains.insert(chain.to_string(), Vec::new());
    }
    push(
        &mut chains,
        OUTBOUND_CHAIN,
        format_args!("-m owner --uid-owner {} -j RETURN", config.proxy_uid),
    );
    push(
        &mut chains,
        OUTBOUND_CHAIN,
        format_args!("-m owner --gid-owner {} -j RETURN", config.proxy_gid()),
    );
    push(
        &mut chains,
        OUTBOUND_CHAIN,
        format_args!("-d {} -j RETURN", family.loopback()),
    );
    push(&mut chains, OUTBOUND_CHAIN, "-o lo -j RETURN");
    for range in config.exclude_outbound_ports.iter() {
        push(
            &mut chains,
            OUTBOUND_CHAIN,
            format_args!("{} -j RETURN", dport(range)),
        );
    }
    for cidr in config
        .exclude_outbound_cidrs
        .iter()
        .filter(|c| family_of(c.0) == family)
    {
        push(
            &mut chains,
            OUTBOUND_CHAIN,
            format_args!("{}-j RETURN", destination(&cidr.0)),
        );
    }
    match &config.include_outbound_cidrs {
        CidrSelection::All => push(
            &mut chains,
            OUTBOUND_CHAIN,
            format_args!("-j {OUTBOUND_REDIRECT_CHAIN}"),
        ),
        CidrSelection::List(list) => {
            for cidr in list.iter().filter(|c| family_of(c.0) == family) {
                push(
                    &mut chains,
                    OUTBOUND_CHAIN,
                    format_args!("{}-j {OUTBOUND_REDIRECT_CHAIN}", destination(&cidr.0)),
                );
            }
        }
    }
    push(
        &mut chains,
        OUTBOUND_REDIRECT_CHAIN,
        format_args!("-p tcp -j REDIRECT --to-ports {}", config.outbound_port),
    );

    RemoraRules {
        chains,
        jumps: vec![
            format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"),
            format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}"),
        ],
    }
}

fn family_of(net: ipnet::IpNet) -> Family {
    match net {
        ipnet::IpNet::V4(_) => Family::V4,
        ipnet::IpNet::V6(_) => Family::V6,
    }
}

/// A `nat` table as `iptables-save -t nat` prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatTable {
    /// Every chain declared, built-in ones included.
    pub chains: Vec<String>,
    /// Every rule, as `-A CHAIN ...` lines.
    pub rules: Vec<String>,
}

impl NatTable {
    /// Reads the `nat` section of `iptables-save` output; other tables and comments are skipped.
    /// Output without a `nat` section (the table was never used) is an empty table.
    pub fn parse(save: &str) -> Self {
        let mut table = Self::default();
        let mut in_nat = false;
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                in_nat = name == "nat";
            } else if line == "COMMIT" {
                in_nat = false;
            } else if !in_nat || line.starts_with('#') {
                continue;
            } else if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    table.chains.push(name.to_string());
                }
            } else if line.starts_with("-A ") {
                table.rules.push(line.to_string());
            }
        }
        table
    }

    /// Whether anything uses this table: a rule or a user-defined chain. An untouched table
    /// shows only the four built-in chains.
    pub fn in_use(&self) -> bool {
        !self.rules.is_empty()
            || self
                .chains
                .iter()
                .any(|c| !BUILTIN_NAT_CHAINS.contains(&c.as_str()))
    }

    /// The remora chains and every jump into them; foreign rules are left out.
    pub fn remora(&self) -> RemoraRules {
        let mut remora = RemoraRules::default();
        for chain in self.chains.iter().filter(|c| c.starts_with(CHAIN_PREFIX)) {
            remora.chains.insert(chain.clone(), Vec::new());
        }
        for rule in &self.rules {
            let chain = rule.split_whitespace().nth(1).unwrap_or_default();
            if chain.starts_with(CHAIN_PREFIX) {
                remora
                    .chains
                    .entry(chain.to_string())
                    .or_default()
                    .push(rule.clone());
            } else if jump_target(rule).is_some_and(|t| t.starts_with(CHAIN_PREFIX)) {
                remora.jumps.push(rule.clone());
            }
        }
        remora
    }
}

/// The chain or target a rule jumps (`-j`) or goes (`-g`) to.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(word) = words.next() {
        if matches!(word, "-j" | "--jump" | "-g" | "--goto") {
            return words.next();
        }
    }
    None
}

/// The `iptables-restore --noflush` input that turns `current` into `wanted`, or `None` when
/// they are already the same. One input does it all, so the kernel sees the old rules or the new
/// ones, never a mix: redeclaring a chain (`:NAME - [0:0]`) under `--noflush` flushes it, the
/// old jumps go by `-D` with their exact saved text, chains no longer wanted go by `-X`, then the
/// new rules and jumps are appended. `wanted` empty is the cleanup.
pub fn restore_input(current: &RemoraRules, wanted: &RemoraRules) -> Option<String> {
    if current.same_as(wanted) {
        return None;
    }
    let stale: Vec<&String> = current
        .chains
        .keys()
        .filter(|c| !wanted.chains.contains_key(*c))
        .collect();
    let mut out = String::from("*nat\n");
    for chain in wanted.chains.keys().chain(stale.iter().copied()) {
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for jump in &current.jumps {
        if let Some(spec) = jump.strip_prefix("-A ") {
            out.push_str(&format!("-D {spec}\n"));
        }
    }
    for chain in &stale {
        out.push_str(&format!("-X {chain}\n"));
    }
    for rule in wanted.chains.values().flatten() {
        out.push_str(rule);
        out.push('\n');
    }
    for jump in &wanted.jumps {
        out.push_str(jump);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn config(args: &[&str]) -> InitConfig {
        use clap::Parser;
        InitConfig::try_parse_from(std::iter::once("remora-init").chain(args.iter().copied()))
            .unwrap()
    }

    fn outbound(rules: &RemoraRules) -> Vec<&str> {
        rules.chains[OUTBOUND_CHAIN]
            .iter()
            .map(String::as_str)
            .collect()
    }

    fn inbound(rules: &RemoraRules) -> Vec<&str> {
        rules.chains[INBOUND_CHAIN]
            .iter()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn default_rules_redirect_everything_but_the_proxy_and_loopback() {
        let rules = render(&InitConfig::default(), Family::V4);
        assert_eq!(
            inbound(&rules),
            [
                "-A REMORA_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A REMORA_INBOUND -p tcp -j REMORA_INBOUND_REDIRECT",
            ]
        );
        assert_eq!(
            outbound(&rules),
            [
                "-A REMORA_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
                "-A REMORA_OUTBOUND -m owner --gid-owner 1337 -j RETURN",
                "-A REMORA_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                "-A REMORA_OUTBOUND -o lo -j RETURN",
                "-A REMORA_OUTBOUND -j REMORA_OUTBOUND_REDIRECT",
            ]
        );
        assert_eq!(
            rules.chains[INBOUND_REDIRECT_CHAIN],
            ["-A REMORA_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15006"]
        );
        assert_eq!(
            rules.chains[OUTBOUND_REDIRECT_CHAIN],
            ["-A REMORA_OUTBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 15001"]
        );
        assert_eq!(
            rules.jumps,
            [
                "-A PREROUTING -p tcp -j REMORA_INBOUND",
                "-A OUTPUT -p tcp -j REMORA_OUTBOUND"
            ]
        );
        assert_eq!(rules.rule_count(), 11);
    }

    #[test]
    fn each_family_gets_only_its_own_cidrs_and_loopback() {
        let config = config(&[
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,fd00::/8",
            "--include-outbound-cidrs",
            "198.18.0.0/15,2001:2::/48",
        ]);
        let v4 = render(&config, Family::V4);
        let v6 = render(&config, Family::V6);
        assert_eq!(
            &outbound(&v4)[2..],
            [
                "-A REMORA_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                "-A REMORA_OUTBOUND -o lo -j RETURN",
                "-A REMORA_OUTBOUND -d 10.0.0.0/8 -j RETURN",
                "-A REMORA_OUTBOUND -d 198.18.0.0/15 -j REMORA_OUTBOUND_REDIRECT",
            ]
        );
        assert_eq!(
            &outbound(&v6)[2..],
            [
                "-A REMORA_OUTBOUND -d ::1/128 -j RETURN",
                "-A REMORA_OUTBOUND -o lo -j RETURN",
                "-A REMORA_OUTBOUND -d fd00::/8 -j RETURN",
                "-A REMORA_OUTBOUND -d 2001:2::/48 -j REMORA_OUTBOUND_REDIRECT",
            ]
        );
    }

    #[test]
    fn an_include_list_without_the_family_redirects_none_of_it() {
        let config = config(&["--include-outbound-cidrs", "10.0.0.0/8"]);
        let v6 = render(&config, Family::V6);
        assert!(
            !outbound(&v6)
                .iter()
                .any(|r| r.contains(OUTBOUND_REDIRECT_CHAIN)),
            "{v6:?}"
        );
    }

    #[test]
    fn ports_ranges_uid_gid_and_listener_ports() {
        let config = config(&[
            "--proxy-uid",
            "2102",
            "--proxy-gid",
            "2103",
            "--inbound-port",
            "16006",
            "--outbound-port",
            "16001",
            "--include-inbound-ports",
            "80,8080-8090",
            "--exclude-inbound-ports",
            "9000-9100",
            "--exclude-outbound-ports",
            "5432,6000-6010",
        ]);
        let rules = render(&config, Family::V4);
        assert_eq!(
            inbound(&rules),
            [
                "-A REMORA_INBOUND -p tcp -m tcp --dport 15020 -j RETURN",
                "-A REMORA_INBOUND -p tcp -m tcp --dport 9000:9100 -j RETURN",
                "-A REMORA_INBOUND -p tcp -m tcp --dport 80 -j REMORA_INBOUND_REDIRECT",
                "-A REMORA_INBOUND -p tcp -m tcp --dport 8080:8090 -j REMORA_INBOUND_REDIRECT",
            ]
        );
        assert_eq!(
            outbound(&rules),
            [
                "-A REMORA_OUTBOUND -m owner --uid-owner 2102 -j RETURN",
                "-A REMORA_OUTBOUND -m owner --gid-owner 2103 -j RETURN",
                "-A REMORA_OUTBOUND -d 127.0.0.0/8 -j RETURN",
                "-A REMORA_OUTBOUND -o lo -j RETURN",
                "-A REMORA_OUTBOUND -p tcp -m tcp --dport 5432 -j RETURN",
                "-A REMORA_OUTBOUND -p tcp -m tcp --dport 6000:6010 -j RETURN",
                "-A REMORA_OUTBOUND -j REMORA_OUTBOUND_REDIRECT",
            ]
        );
        assert!(rules.chains[INBOUND_REDIRECT_CHAIN][0].ends_with("--to-ports 16006"));
        assert!(rules.chains[OUTBOUND_REDIRECT_CHAIN][0].ends_with("--to-ports 16001"));
    }

    #[test]
    fn a_zero_prefix_is_written_without_a_destination_as_iptables_save_prints_it() {
        let config = config(&["--include-outbound-cidrs", "0.0.0.0/0"]);
        assert_eq!(
            outbound(&render(&config, Family::V4)).last().copied(),
            Some("-A REMORA_OUTBOUND -j REMORA_OUTBOUND_REDIRECT")
        );
    }

    const SAVE_WITH_REMORA_AND_FOREIGN: &str = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sun Nov 22 02:09:26 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [3:180]
:POSTROUTING ACCEPT [0:0]
:KUBE-FOO - [0:0]
:REMORA_INBOUND - [0:0]
:REMORA_OLD - [0:0]
-A PREROUTING -p tcp -j REMORA_INBOUND
-A OUTPUT -d 198.18.0.9/32 -j KUBE-FOO
-A OUTPUT -p tcp -j REMORA_OLD
-A POSTROUTING -p tcp -g REMORA_OLD
-A KUBE-FOO -p tcp -j DNAT --to-destination 198.18.0.10:80
-A REMORA_INBOUND -p tcp -m tcp --dport 15020 -j RETURN
-A REMORA_OLD -p tcp -j REDIRECT --to-ports 15001
COMMIT
# Completed on Sun Nov 22 02:09:26 2026
# Warning: iptables-legacy tables present, use iptables-legacy-save to see them
";

    #[test]
    fn parsing_save_output_separates_remora_from_foreign_rules() {
        let table = NatTable::parse(SAVE_WITH_REMORA_AND_FOREIGN);
        assert!(table.in_use());
        assert_eq!(table.rules.len(), 7);
        let remora = table.remora();
        assert_eq!(
            remora.chains.keys().collect::<Vec<_>>(),
            ["REMORA_INBOUND", "REMORA_OLD"]
        );
        assert_eq!(
            remora.chains["REMORA_OLD"],
            ["-A REMORA_OLD -p tcp -j REDIRECT --to-ports 15001"]
        );
        assert_eq!(
            remora.jumps,
            [
                "-A PREROUTING -p tcp -j REMORA_INBOUND",
                "-A OUTPUT -p tcp -j REMORA_OLD",
                "-A POSTROUTING -p tcp -g REMORA_OLD",
            ]
        );
    }

    #[test]
    fn parsing_an_untouched_or_missing_table() {
        let untouched = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n\
                         :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n";
        assert!(!NatTable::parse(untouched).in_use());
        assert!(NatTable::parse(untouched).remora().is_empty());
        assert!(!NatTable::parse("").in_use());
        let filter_only = "*filter\n:FOO - [0:0]\n-A INPUT -j FOO\nCOMMIT\n";
        assert!(!NatTable::parse(filter_only).in_use());
        let chain_only = untouched.replace("COMMIT", ":KUBE-SERVICES - [0:0]\nCOMMIT");
        assert!(NatTable::parse(&chain_only).in_use());
    }

    #[test]
    fn rendered_rules_read_back_from_save_output_are_unchanged() {
        let wanted = render(&InitConfig::default(), Family::V6);
        let input = restore_input(&RemoraRules::default(), &wanted).unwrap();
        // What iptables-save prints after that input: built-ins, the chains, then the rules.
        let mut save = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for line in input.lines().filter(|l| l.starts_with(':')) {
            save.push_str(line);
            save.push('\n');
        }
        save.push_str("-A OUTPUT -d 2001:2::9/128 -j ACCEPT\n");
        for line in input.lines().filter(|l| l.starts_with("-A")) {
            save.push_str(line);
            save.push('\n');
        }
        save.push_str("COMMIT\n");
        let current = NatTable::parse(&save).remora();
        assert!(current.same_as(&wanted), "{current:#?}");
        assert_eq!(restore_input(&current, &wanted), None);
    }

    #[test]
    fn replacing_deletes_old_jumps_and_stale_chains_in_the_same_input() {
        let current = NatTable::parse(SAVE_WITH_REMORA_AND_FOREIGN).remora();
        let wanted = render(&InitConfig::default(), Family::V4);
        let input = restore_input(&current, &wanted).unwrap();
        let lines: Vec<&str> = input.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        assert_eq!(
            &lines[1..9],
            [
                ":REMORA_INBOUND - [0:0]",
                ":REMORA_INBOUND_REDIRECT - [0:0]",
                ":REMORA_OUTBOUND - [0:0]",
                ":REMORA_OUTBOUND_REDIRECT - [0:0]",
                ":REMORA_OLD - [0:0]",
                "-D PREROUTING -p tcp -j REMORA_INBOUND",
                "-D OUTPUT -p tcp -j REMORA_OLD",
                "-D POSTROUTING -p tcp -g REMORA_OLD",
            ]
        );
        assert_eq!(lines[9], "-X REMORA_OLD");
        assert!(!input.contains("KUBE-FOO"), "foreign rules are not touched");
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("-A ")).count(),
            wanted.rule_count()
        );
    }

    #[test]
    fn cleanup_removes_every_remora_chain_and_jump_and_nothing_else() {
        let current = NatTable::parse(SAVE_WITH_REMORA_AND_FOREIGN).remora();
        let input = restore_input(&current, &RemoraRules::default()).unwrap();
        assert_eq!(
            input,
            "*nat\n:REMORA_INBOUND - [0:0]\n:REMORA_OLD - [0:0]\n\
             -D PREROUTING -p tcp -j REMORA_INBOUND\n-D OUTPUT -p tcp -j REMORA_OLD\n\
             -D POSTROUTING -p tcp -g REMORA_OLD\n-X REMORA_INBOUND\n-X REMORA_OLD\nCOMMIT\n"
        );
        assert_eq!(
            restore_input(&RemoraRules::default(), &RemoraRules::default()),
            None
        );
    }

    #[test]
    fn a_duplicated_jump_is_not_the_wanted_state() {
        let wanted = render(&InitConfig::default(), Family::V4);
        let mut current = wanted.clone();
        current.jumps.push(current.jumps[0].clone());
        let input = restore_input(&current, &wanted).unwrap();
        assert_eq!(
            input
                .matches("-D PREROUTING -p tcp -j REMORA_INBOUND")
                .count(),
            2
        );
        assert_eq!(
            input
                .matches("-A PREROUTING -p tcp -j REMORA_INBOUND")
                .count(),
            1
        );
    }
}
