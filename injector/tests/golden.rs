//! Golden files for `remora-injector inject`: what users read. `REMORA_BLESS=1` (or
//! `make golden`) rewrites the expected outputs from the current code.

use std::path::PathBuf;

use remora_injector::config::Config;
use remora_injector::offline::inject_documents;
use remora_injector::trust::TrustAnchors;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Injects `NAME.in.yaml` and compares with `NAME.out.yaml` (and the warnings with
/// `NAME.warnings.txt` when there are any).
fn check(name: &str) {
    check_with(name, &Config::default());
}

/// As [`check`], with an injector configured otherwise than by default.
fn check_with(name: &str, config: &Config) {
    let dir = golden_dir();
    let input = std::fs::read_to_string(dir.join(format!("{name}.in.yaml"))).unwrap();
    let injected = inject_documents(&input, config).unwrap();
    // The version is part of the images and the status annotation; keep the files stable
    // across releases.
    let version = env!("CARGO_PKG_VERSION");
    let output = injected.output.replace(version, "VERSION");
    let warnings: String = injected
        .warnings
        .iter()
        .map(|warning| format!("{warning}\n"))
        .collect();

    let expected_path = dir.join(format!("{name}.out.yaml"));
    let warnings_path = dir.join(format!("{name}.warnings.txt"));
    if std::env::var_os("REMORA_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&expected_path, &output).unwrap();
        if warnings.is_empty() {
            let _ = std::fs::remove_file(&warnings_path);
        } else {
            std::fs::write(&warnings_path, &warnings).unwrap();
        }
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|err| {
        panic!(
            "{}: {err} (run `REMORA_BLESS=1 cargo test -p remora-injector --test golden`)",
            expected_path.display()
        )
    });
    pretty_assertions::assert_eq!(output, expected, "{name}: REMORA_BLESS=1 regenerates");
    let expected_warnings = std::fs::read_to_string(&warnings_path).unwrap_or_default();
    pretty_assertions::assert_eq!(warnings, expected_warnings, "{name} warnings");

    // Feeding the output back in changes nothing: already injected input comes out unchanged.
    let again = inject_documents(&injected.output, config).unwrap();
    pretty_assertions::assert_eq!(again.output, injected.output, "{name}: not idempotent");
}

#[test]
fn golden_deployment() {
    check("deployment");
}

#[test]
fn golden_cronjob() {
    check("cronjob");
}

#[test]
fn golden_multi_document() {
    check("multi-document");
}

#[test]
fn golden_list() {
    check("list");
}

#[test]
fn golden_other_workloads() {
    check("other-workloads");
}

/// Strict mTLS: the allow list and the pod's probes become proxy flags.
#[test]
fn golden_mtls() {
    check("mtls");
}

/// The control plane's address and the CAs that verify it, as the proxy gets them.
#[test]
fn golden_control_plane() {
    let anchors = golden_dir().join("control-plane.trust-anchors.pem");
    let config = Config {
        control_addr: Some("[fd00:10:96::20]:8090".parse().unwrap()),
        trust_anchors: Some(TrustAnchors::read(&anchors).unwrap()),
        ..Config::default()
    };
    check_with("control-plane", &config);
}
