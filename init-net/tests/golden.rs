//! Golden files for the iptables-restore input a fresh pod gets; `make golden` rewrites them.

use clap::Parser;
use remora_init::rules::{render, restore_input, Family, RemoraRules};
use remora_init::InitConfig;

/// Compares `actual` with `tests/golden/<name>`, or rewrites the file when `REMORA_BLESS=1`.
fn check(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("REMORA_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("{}: {err} (run `make golden`)", path.display()));
    pretty_assertions::assert_eq!(
        expected,
        actual,
        "{} differs: review, then `make golden`",
        path.display()
    );
}

/// The restore input for a pod without remora rules, both families, as `--dry-run` prints it.
fn fresh_input(args: &[&str]) -> String {
    let config =
        InitConfig::try_parse_from(std::iter::once("remora-init").chain(args.iter().copied()))
            .unwrap();
    config.validate().unwrap();
    let mut out = format!("# remora-init {}\n", args.join(" "));
    for family in [Family::V4, Family::V6] {
        let input = restore_input(&RemoraRules::default(), &render(&config, family)).unwrap();
        out.push_str(&format!("# {family}\n{input}"));
    }
    out
}

#[test]
fn golden_default_flags() {
    check("default.rules", &fresh_input(&[]));
}

#[test]
fn golden_every_exclusion_kind() {
    check(
        "exclusions.rules",
        &fresh_input(&[
            "--exclude-inbound-ports",
            "8081,9000-9100",
            "--exclude-outbound-ports",
            "53,5432-5433",
            "--exclude-outbound-cidrs",
            "10.96.0.0/12,198.18.0.3/32,fd00::/8,2001:2::3",
            "--proxy-gid",
            "2000",
        ]),
    );
}

#[test]
fn golden_include_lists_and_ipv6_cidrs() {
    check(
        "include-lists.rules",
        &fresh_input(&[
            "--include-inbound-ports",
            "80,8080-8090",
            "--include-outbound-cidrs",
            "198.18.0.0/15,2001:2::/48",
            "--proxy-uid",
            "2102",
            "--inbound-port",
            "16006",
            "--outbound-port",
            "16001",
        ]),
    );
}
