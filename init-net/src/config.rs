//! The flags of `remora-init`: one type that the binary parses and the injector renders.
//!
//! The injector builds an [`InitConfig`] from a pod's annotations and writes
//! [`InitConfig::to_args`] into the init container; `remora-init` parses those very args
//! back with clap. A round-trip test keeps the two from drifting.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

/// The proxy's outbound listener port.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The proxy's inbound listener port.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// The proxy's admin port: never redirected, so kubelet probes reach it directly.
pub const ADMIN_PORT: u16 = 15020;

/// Opaque ports the proxy forwards without protocol detection unless the injector or a pod says
/// otherwise; it lives here because the injector writes it and remora-proxy defaults to it.
/// Only server-first protocols belong here: for them the client sends nothing until the server
/// greets it, so detection could only time out. Client-first protocols (PostgreSQL,
/// Redis, Memcached, MongoDB, Kafka, AMQP, TLS) send non-HTTP bytes at once and are already
/// detected as opaque without delay, so they are deliberately left out.
/// - 21: FTP control (`220` greeting first)
/// - 25, 587: SMTP and mail submission (`220` greeting first)
/// - 110: POP3 (`+OK` greeting first)
/// - 143: IMAP (`* OK` greeting first)
/// - 3306: MySQL / MariaDB (the server's handshake packet comes first)
/// - 4222: NATS (the server's `INFO` line comes first)
pub const DEFAULT_OPAQUE_PORTS: &str = "21,25,110,143,587,3306,4222";

/// The uid (and default gid) the proxy runs as.
pub const DEFAULT_PROXY_UID: u32 = 1337;

/// How many characters of a bad value a message shows.
const QUOTED_MAX_CHARS: usize = 64;

/// `value` quoted for an error message, cut short past 64 characters with its full length in
/// bytes: an annotation may hold 256 KiB, which no message should repeat.
pub fn quoted(value: &str) -> String {
    match value.char_indices().nth(QUOTED_MAX_CHARS) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// A value of one of the list flags (or the matching annotation) that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{} is not a port (expected a number from 1 to 65535)", quoted(value))]
    Port { value: String },
    #[error(
        "{} is not a valid port range: {start} is greater than {end} (expected e.g. 9000-9100)",
        quoted(value)
    )]
    InvertedRange { value: String, start: u16, end: u16 },
    #[error(
        "{} is not a CIDR (expected e.g. 10.0.0.0/8, 2001:db8::/32 or a single address)",
        quoted(value)
    )]
    Cidr { value: String },
    #[error(
        "{} is not a uid or gid (expected a number from 0 to 4294967294)",
        quoted(value)
    )]
    Id { value: String },
    #[error(
        "{} mixes * with a list (expected * alone or a list such as {example})",
        quoted(value)
    )]
    WildcardInList {
        value: String,
        example: &'static str,
    },
}

impl ParseError {
    /// The text that could not be parsed: one item of a list, or the whole value.
    pub fn value(&self) -> &str {
        match self {
            Self::Port { value }
            | Self::InvertedRange { value, .. }
            | Self::Cidr { value }
            | Self::Id { value }
            | Self::WildcardInList { value, .. } => value,
        }
    }
}

/// What a list item's type shows as an example in messages.
pub trait Example {
    const EXAMPLE: &'static str;
}

impl Example for PortRange {
    const EXAMPLE: &'static str = "8080,9000-9100";
}

impl Example for Cidr {
    const EXAMPLE: &'static str = "10.0.0.0/8,fd00::/8";
}

/// A combination of flags that each parse but cannot work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--inbound-port and --outbound-port are both {port}: the proxy needs two different ports"
    )]
    SamePorts { port: u16 },
    #[error("--{flag} {port} is the proxy's admin port, which is never redirected (choose another port)")]
    AdminPort { flag: &'static str, port: u16 },
}

/// One port or an inclusive range of ports, written `8080` or `9000-9100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self {
            start: port,
            end: port,
        }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

fn parse_port(value: &str, whole: &str) -> Result<u16, ParseError> {
    match value.trim().parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(ParseError::Port {
            value: whole.to_string(),
        }),
    }
}

impl FromStr for PortRange {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        match value.split_once('-') {
            None => parse_port(value, value).map(Self::single),
            Some((start, end)) => {
                let (start, end) = (parse_port(start, value)?, parse_port(end, value)?);
                if start > end {
                    return Err(ParseError::InvertedRange {
                        value: value.to_string(),
                        start,
                        end,
                    });
                }
                Ok(Self { start, end })
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

/// An IPv4 or IPv6 network; a bare address means that one host (`/32` or `/128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr(pub IpNet);

impl Cidr {
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    pub fn is_ipv6(&self) -> bool {
        matches!(self.0, IpNet::V6(_))
    }
}

impl FromStr for Cidr {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        let net = match value.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => value
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| ParseError::Cidr {
                    value: value.to_string(),
                })?,
        };
        // `10.1.2.3/8` means the network `10.0.0.0/8`, as iptables reads it.
        Ok(Self(net.trunc()))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A comma-separated list of ports and ranges ([`PortList`]) or of CIDRs ([`CidrList`]); the
/// empty string is the empty list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct List<T>(pub Vec<T>);

/// Ports and ranges, e.g. `8080,9000-9100`.
pub type PortList = List<PortRange>;
/// IPv4 and IPv6 networks, e.g. `10.0.0.0/8,fd00::/8`.
pub type CidrList = List<Cidr>;

impl<T> Default for List<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> List<T> {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

impl List<PortRange> {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|range| range.contains(port))
    }
}

impl<T: FromStr<Err = ParseError>> FromStr for List<T> {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(T::from_str)
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

impl<T: fmt::Display> fmt::Display for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            item.fmt(f)?;
        }
        Ok(())
    }
}

/// `*` (every port, every destination) or a [`List`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Selection<T> {
    #[default]
    All,
    List(List<T>),
}

/// `*` or a list of ports and ranges.
pub type PortSelection = Selection<PortRange>;
/// `*` or a list of CIDRs.
pub type CidrSelection = Selection<Cidr>;

impl<T: FromStr<Err = ParseError> + Example> FromStr for Selection<T> {
    type Err = ParseError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.trim() == "*" {
            Ok(Self::All)
        } else if value.split(',').any(|item| item.trim() == "*") {
            Err(ParseError::WildcardInList {
                value: value.trim().to_string(),
                example: T::EXAMPLE,
            })
        } else {
            value.parse().map(Self::List)
        }
    }
}

impl<T: fmt::Display> fmt::Display for Selection<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::List(list) => list.fmt(f),
        }
    }
}

/// Whether to write IPv6 rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, ValueEnum)]
pub enum Ipv6Mode {
    /// IPv6 rules when the pod has a global IPv6 address.
    #[default]
    Auto,
    /// Always IPv6 rules too (fails where the kernel has no IPv6).
    On,
    /// IPv4 rules only.
    Off,
}

/// Which iptables implementation writes the rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, ValueEnum)]
pub enum Backend {
    /// Legacy where the legacy `nat` table already holds rules (as kube-proxy would), else nft.
    #[default]
    Auto,
    /// iptables-nft (the nf_tables kernel API), what current distributions use.
    Nft,
    /// iptables-legacy (the x_tables kernel API), for nodes whose kube-proxy still uses it.
    Legacy,
}

/// A `--proxy-uid` or `--proxy-gid` value. Public, as each value parser is, for the fuzz targets.
pub fn parse_id(value: &str) -> Result<u32, ParseError> {
    match value.trim().parse::<u32>() {
        Ok(id) if id != u32::MAX => Ok(id),
        _ => Err(ParseError::Id {
            value: value.to_string(),
        }),
    }
}

/// An `--inbound-port` or `--outbound-port` value.
pub fn parse_port_flag(value: &str) -> Result<u16, ParseError> {
    parse_port(value, value)
}

/// Everything `remora-init` is told. Parsed from argv by the binary, rendered to argv by the injector.
#[derive(Debug, Clone, PartialEq, Eq, Parser)]
#[command(
    name = "remora-init",
    version,
    about = "Writes the NAT REDIRECT rules that send a meshed pod's TCP traffic through remora-proxy",
    long_about = "Writes the NAT REDIRECT rules that send a meshed pod's TCP traffic through \
                  remora-proxy: inbound TCP to the inbound port, outbound TCP to the outbound port, \
                  except the proxy's own traffic, loopback and what is excluded. Rules live in \
                  REMORA_* chains of the nat table and are applied with one iptables-restore per \
                  IP family: all or nothing. Running it again with the same flags changes nothing.",
    after_long_help = "Logs go to standard error; REMORA_LOG sets the filter (default: info).\n\n\
                       Exit status: 0 the rules are in place (or were already), 1 iptables is \
                       missing, not permitted or failed, 2 a flag is invalid (nothing was touched)."
)]
pub struct InitConfig {
    /// The uid the proxy runs as; its traffic is never redirected.
    #[arg(long, default_value_t = DEFAULT_PROXY_UID, value_name = "UID", value_parser = parse_id)]
    pub proxy_uid: u32,

    /// The gid the proxy runs as; its traffic is never redirected either [default: the proxy uid].
    #[arg(long, value_name = "GID", value_parser = parse_id)]
    pub proxy_gid: Option<u32>,

    /// The port the proxy accepts redirected inbound connections on.
    #[arg(long, default_value_t = DEFAULT_INBOUND_PORT, value_name = "PORT", value_parser = parse_port_flag)]
    pub inbound_port: u16,

    /// The port the proxy accepts redirected outbound connections on.
    #[arg(long, default_value_t = DEFAULT_OUTBOUND_PORT, value_name = "PORT", value_parser = parse_port_flag)]
    pub outbound_port: u16,

    /// Inbound ports to redirect: `*` or a list such as `8080,9000-9100`.
    #[arg(long, default_value = "*", value_name = "'*'|LIST")]
    pub include_inbound_ports: PortSelection,

    /// Inbound ports and ranges never redirected, e.g. `8080,9000-9100`.
    #[arg(
        long,
        default_value = "",
        value_name = "LIST",
        hide_default_value = true
    )]
    pub exclude_inbound_ports: PortList,

    /// Outbound destinations to redirect: `*` or a list of IPv4/IPv6 CIDRs.
    #[arg(long, default_value = "*", value_name = "'*'|LIST")]
    pub include_outbound_cidrs: CidrSelection,

    /// Outbound destination CIDRs never redirected, e.g. `10.0.0.0/8,fd00::/8`.
    #[arg(
        long,
        default_value = "",
        value_name = "LIST",
        hide_default_value = true
    )]
    pub exclude_outbound_cidrs: CidrList,

    /// Outbound destination ports and ranges never redirected.
    #[arg(
        long,
        default_value = "",
        value_name = "LIST",
        hide_default_value = true
    )]
    pub exclude_outbound_ports: PortList,

    /// Write IPv6 rules: `auto` does when the pod has a global IPv6 address.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,

    /// iptables implementation: `auto` picks legacy where legacy nat rules already exist, else nft.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,

    /// Print the exact iptables-restore input for each family and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Remove every REMORA_ chain and jump, leaving other rules alone.
    #[arg(long)]
    pub cleanup: bool,
}

impl Default for InitConfig {
    fn default() -> Self {
        Self {
            proxy_uid: DEFAULT_PROXY_UID,
            proxy_gid: None,
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            include_inbound_ports: PortSelection::All,
            exclude_inbound_ports: PortList::default(),
            include_outbound_cidrs: CidrSelection::All,
            exclude_outbound_cidrs: CidrList::default(),
            exclude_outbound_ports: PortList::default(),
            ipv6: Ipv6Mode::Auto,
            backend: Backend::Auto,
            dry_run: false,
            cleanup: false,
        }
    }
}

impl InitConfig {
    /// Checks what clap cannot see flag by flag; `remora-init` runs it before touching anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.inbound_port == self.outbound_port {
            return Err(ConfigError::SamePorts {
                port: self.inbound_port,
            });
        }
        for (flag, port) in [
            ("inbound-port", self.inbound_port),
            ("outbound-port", self.outbound_port),
        ] {
            if port == ADMIN_PORT {
                return Err(ConfigError::AdminPort { flag, port });
            }
        }
        Ok(())
    }

    /// The gid whose traffic is exempt: `--proxy-gid`, else the same number as the uid.
    pub fn proxy_gid(&self) -> u32 {
        self.proxy_gid.unwrap_or(self.proxy_uid)
    }

    /// The arguments (without the program name) that make `remora-init` parse back to `self`.
    /// Flags at their defaults are left out, so the container spec stays short and readable.
    pub fn to_args(&self) -> Vec<String> {
        let defaults = Self::default();
        let mut args = Vec::new();
        let mut push = |flag: &str, value: String| {
            args.push(format!("--{flag}"));
            args.push(value);
        };
        if self.proxy_uid != defaults.proxy_uid {
            push("proxy-uid", self.proxy_uid.to_string());
        }
        if let Some(gid) = self.proxy_gid {
            push("proxy-gid", gid.to_string());
        }
        if self.inbound_port != defaults.inbound_port {
            push("inbound-port", self.inbound_port.to_string());
        }
        if self.outbound_port != defaults.outbound_port {
            push("outbound-port", self.outbound_port.to_string());
        }
        if self.include_inbound_ports != defaults.include_inbound_ports {
            push(
                "include-inbound-ports",
                self.include_inbound_ports.to_string(),
            );
        }
        if !self.exclude_inbound_ports.is_empty() {
            push(
                "exclude-inbound-ports",
                self.exclude_inbound_ports.to_string(),
            );
        }
        if self.include_outbound_cidrs != defaults.include_outbound_cidrs {
            push(
                "include-outbound-cidrs",
                self.include_outbound_cidrs.to_string(),
            );
        }
        if !self.exclude_outbound_cidrs.is_empty() {
            push(
                "exclude-outbound-cidrs",
                self.exclude_outbound_cidrs.to_string(),
            );
        }
        if !self.exclude_outbound_ports.is_empty() {
            push(
                "exclude-outbound-ports",
                self.exclude_outbound_ports.to_string(),
            );
        }
        if self.ipv6 != defaults.ipv6 {
            push("ipv6", value_name(self.ipv6));
        }
        if self.backend != defaults.backend {
            push("backend", value_name(self.backend));
        }
        if self.dry_run {
            args.push("--dry-run".to_string());
        }
        if self.cleanup {
            args.push("--cleanup".to_string());
        }
        args
    }
}

fn value_name<T: ValueEnum>(value: T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<InitConfig, clap::Error> {
        InitConfig::try_parse_from(std::iter::once("remora-init").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_parse_from_no_args() {
        assert_eq!(parse(&[]).unwrap(), InitConfig::default());
        assert!(InitConfig::default().to_args().is_empty());
    }

    type Ranges = Result<Vec<(u16, u16)>, ()>;

    #[test]
    fn port_ranges() {
        let cases: &[(&str, &str, Ranges)] = &[
            ("empty", "", Ok(vec![])),
            ("single", "8080", Ok(vec![(8080, 8080)])),
            ("range", "9000-9100", Ok(vec![(9000, 9100)])),
            (
                "list with spaces",
                " 80 , 443,9000-9100 ",
                Ok(vec![(80, 80), (443, 443), (9000, 9100)]),
            ),
            ("max port", "65535", Ok(vec![(65535, 65535)])),
            ("zero", "0", Err(())),
            ("too big", "65536", Err(())),
            ("inverted", "9100-9000", Err(())),
            ("word", "http", Err(())),
            ("negative", "-1", Err(())),
            ("open range", "9000-", Err(())),
        ];
        for (name, input, want) in cases {
            let got = input
                .parse::<PortList>()
                .map(|list| list.0.iter().map(|r| (r.start, r.end)).collect::<Vec<_>>())
                .map_err(|_| ());
            assert_eq!(&got, want, "case {name}: {input:?}");
        }
    }

    #[test]
    fn errors_name_the_value_and_the_accepted_form() {
        let err = "9100-9000".parse::<PortList>().unwrap_err().to_string();
        assert!(
            err.contains("9100-9000") && err.contains("e.g. 9000-9100"),
            "{err}"
        );
        let err = "10.0.0.0/33".parse::<CidrList>().unwrap_err().to_string();
        assert!(
            err.contains("10.0.0.0/33") && err.contains("expected"),
            "{err}"
        );
        let err = parse(&["--exclude-inbound-ports", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--exclude-inbound-ports"), "{err}");
    }

    #[test]
    fn quoted_cuts_long_values_at_a_character_boundary() {
        assert_eq!(quoted("8080"), "\"8080\"");
        let long = "é".repeat(100);
        let shown = quoted(&long);
        assert_eq!(shown, format!("{:?}… (200 bytes)", "é".repeat(64)));
    }

    #[test]
    fn cidrs() {
        let cases: &[(&str, &str, Result<&str, ()>)] = &[
            ("v4", "10.0.0.0/8", Ok("10.0.0.0/8")),
            ("v6", "2001:db8::/32", Ok("2001:db8::/32")),
            ("bare v4 host", "198.18.0.1", Ok("198.18.0.1/32")),
            ("bare v6 host", "2001:2::1", Ok("2001:2::1/128")),
            ("host bits cleared", "10.1.2.3/8", Ok("10.0.0.0/8")),
            (
                "mixed list",
                "10.0.0.0/8, fd00::/8",
                Ok("10.0.0.0/8,fd00::/8"),
            ),
            ("prefix too long", "10.0.0.0/33", Err(())),
            ("garbage", "ten", Err(())),
        ];
        for (name, input, want) in cases {
            let got = input
                .parse::<CidrList>()
                .map(|l| l.to_string())
                .map_err(|_| ());
            assert_eq!(
                got.as_deref(),
                want.as_deref().map_err(|_| &()),
                "case {name}"
            );
        }
    }

    #[test]
    fn validate_rejects_flags_that_cannot_work_together() {
        assert_eq!(InitConfig::default().validate(), Ok(()));
        let same = parse(&["--inbound-port", "15001"]).unwrap();
        assert_eq!(same.validate(), Err(ConfigError::SamePorts { port: 15001 }));
        let admin = parse(&["--outbound-port", "15020"]).unwrap();
        let err = admin.validate().unwrap_err().to_string();
        assert!(err.contains("--outbound-port 15020"), "{err}");
    }

    #[test]
    fn help_explains_every_choice_and_the_exit_status() {
        use clap::CommandFactory;
        let help = InitConfig::command().render_long_help().to_string();
        for needle in [
            "on: ",
            "off: ",
            "nft: ",
            "legacy: ",
            "[default: the proxy uid]",
            "REMORA_LOG",
            "Exit status",
            "2 ",
        ] {
            assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
        }
    }

    #[test]
    fn to_args_round_trips_through_clap() {
        let config = InitConfig {
            proxy_uid: 2102,
            proxy_gid: Some(2103),
            inbound_port: 16006,
            outbound_port: 16001,
            include_inbound_ports: "80,8080-8090".parse().unwrap(),
            exclude_inbound_ports: "9000-9100".parse().unwrap(),
            include_outbound_cidrs: "10.0.0.0/8,fd00::/8".parse().unwrap(),
            exclude_outbound_cidrs: "10.96.0.0/12".parse().unwrap(),
            exclude_outbound_ports: "5432".parse().unwrap(),
            ipv6: Ipv6Mode::Off,
            backend: Backend::Legacy,
            dry_run: true,
            cleanup: false,
        };
        let args = config.to_args();
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_eq!(parse(&argv).unwrap(), config);
    }
}
