//! `remora-injector inject` as a user runs it: stdin or a file in, YAML out, exit 1 on bad
//! input; and the precedence of the injector's settings (flag > env > file > built-in), which
//! needs a process of its own because it reads `REMORA_*` environment variables.

use std::io::Write;
use std::process::{Command, Output, Stdio};

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: app, image: busybox}]\n";

fn injector(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_remora-injector"));
    command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Start from a clean slate: the developer's or CI's own REMORA_* must not leak in.
    for (key, _) in std::env::vars() {
        if key.starts_with("REMORA_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().expect("remora-injector runs");
    // A run that fails on its settings exits before reading stdin: a broken pipe is expected then.
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => panic!("writing stdin: {err}"),
        _ => {}
    }
    child.wait_with_output().unwrap()
}

fn proxy_image(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pod: serde_json::Value = serde_yaml_ng::from_slice(&output.stdout).unwrap();
    pod["spec"]["initContainers"][1]["image"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn reads_stdin_and_writes_yaml() {
    let output = injector(&["inject", "-f", "-"], &[], POD);
    assert_eq!(
        proxy_image(&output),
        format!(
            "ghcr.io/remora-mesh/remora-proxy:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
}

#[test]
fn reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, POD).unwrap();
    let output = injector(&["inject", "-f", file.to_str().unwrap()], &[], "");
    assert!(proxy_image(&output).starts_with("ghcr.io/remora-mesh/remora-proxy:"));
}

#[test]
fn settings_precedence_is_flag_env_file_built_in() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("injector.yaml");
    std::fs::write(&config, "proxy-image: registry.example/proxy:file\n").unwrap();
    let config = config.to_str().unwrap();
    let env = [("REMORA_PROXY_IMAGE", "registry.example/proxy:env")];

    let from_file = injector(&["inject", "-f", "-", "--config", config], &[], POD);
    assert_eq!(proxy_image(&from_file), "registry.example/proxy:file");

    let env_beats_file = injector(&["inject", "-f", "-", "--config", config], &env, POD);
    assert_eq!(proxy_image(&env_beats_file), "registry.example/proxy:env");

    let flag_beats_env = injector(
        &[
            "inject",
            "-f",
            "-",
            "--config",
            config,
            "--proxy-image",
            "registry.example/proxy:flag",
        ],
        &env,
        POD,
    );
    assert_eq!(proxy_image(&flag_beats_env), "registry.example/proxy:flag");

    let config_from_env = injector(&["inject", "-f", "-"], &[("REMORA_CONFIG", config)], POD);
    assert_eq!(proxy_image(&config_from_env), "registry.example/proxy:file");
}

#[test]
fn bad_settings_exit_1_naming_the_setting() {
    let output = injector(
        &["inject", "-f", "-"],
        &[("REMORA_PROXY_MEMORY_LIMIT", "lots")],
        POD,
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--proxy-memory-limit")
            && stderr.contains("REMORA_PROXY_MEMORY_LIMIT")
            && stderr.contains("\"lots\""),
        "{stderr}"
    );
}

#[test]
fn unparsable_input_exits_1_naming_document_and_line() {
    let input = format!("{POD}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: [\n");
    let output = injector(&["inject", "-f", "-"], &[], &input);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "nothing is written on error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // One position, counted in the input: the flow mapping opened on line 9 is still open at
    // the end, line 10.
    assert!(
        stderr.starts_with("remora-injector: cannot parse document 2 at line 10 column 1: "),
        "{stderr}"
    );
    assert_eq!(stderr.matches("line").count(), 1, "{stderr}");
}

#[test]
fn a_missing_file_exits_1_naming_it() {
    let output = injector(&["inject", "-f", "/nonexistent/pods.yaml"], &[], "");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("/nonexistent/pods.yaml"), "{stderr}");
    // The cause is told once, not once by the message and again by the error chain.
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
    let output = injector(
        &["inject", "-f", "-", "--config", "/nonexistent/remora.yaml"],
        &[],
        POD,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.matches("No such file").count(), 1, "{stderr}");
}

#[test]
fn warnings_go_to_stderr() {
    let input = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  hostNetwork: true\n  containers: [{name: app, image: busybox}]\n";
    let output = injector(&["inject", "-f", "-"], &[], input);
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), input);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("hostNetwork"), "{stderr}");
}

/// `inject | kubectl apply` must never leave a workload unmeshed without a word: a
/// ReplicationController is injected, a kind inject does not know is named on stderr.
#[test]
fn a_replication_controller_is_injected_and_an_unknown_workload_is_named() {
    let rc = "apiVersion: v1\nkind: ReplicationController\nmetadata: {name: rc}\nspec:\n  selector: {app: rc}\n  template:\n    metadata: {labels: {app: rc}}\n    spec:\n      containers: [{name: app, image: busybox}]\n";
    let rollout = "apiVersion: argoproj.io/v1alpha1\nkind: Rollout\nmetadata: {name: canary, namespace: shop}\nspec:\n  template:\n    spec:\n      containers: [{name: app, image: busybox}]\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("workloads.yaml");
    std::fs::write(&file, format!("{rc}---\n{rollout}")).unwrap();
    // No control plane, so that the one warning is the Rollout's.
    let no_control = [("REMORA_CONTROL_ADDR", "")];
    let output = injector(&["inject", "-f", file.to_str().unwrap()], &no_control, "");
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let documents: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&stdout)
        .map(|document| serde::Deserialize::deserialize(document).unwrap())
        .collect();
    assert_eq!(
        documents[0]["spec"]["template"]["spec"]["initContainers"][1]["name"], "remora-proxy",
        "{stdout}"
    );
    assert!(stdout.ends_with(&format!("---\n{rollout}")), "{stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let want = format!(
        "warning: {}: document 2 (line 11), Rollout shop/canary: remora: not injected: inject knows no kind Rollout of apiVersion argoproj.io/v1alpha1",
        file.display()
    );
    assert!(stderr.starts_with(&want), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // From standard input, the warning says so.
    let output = injector(&["inject", "-f", "-"], &[], rollout);
    assert_eq!(String::from_utf8_lossy(&output.stdout), rollout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("warning: standard input: document 1 (line 1), Rollout shop/canary: "),
        "{stderr}"
    );
}

#[test]
fn help_explains_each_command() {
    let help = |args: &[&str]| {
        let output = injector(args, &[], "");
        assert!(output.status.success(), "{args:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let serve = help(&["serve", "--help"]);
    for needle in ["/inject/opt-in", "/healthz", "/metrics", "8443", "re-read"] {
        assert!(
            serve.contains(needle),
            "serve --help lacks {needle:?}:\n{serve}"
        );
    }
    let inject = help(&["inject", "--help"]);
    for needle in [
        "CronJob",
        "List",
        "kubectl apply -f -",
        "remora.io/inject",
        "standard error",
        "unchanged",
    ] {
        assert!(
            inject.contains(needle),
            "inject --help lacks {needle:?}:\n{inject}"
        );
    }
    // The command's own flag first, the logging flags shared by every command last.
    let position = |needle: &str| inject.find(needle).unwrap();
    assert!(position("--filename") < position("--config"));
    assert!(position("--opaque-ports") < position("--log-level"));
    let top = help(&["--help"]);
    assert!(top.contains("remora-injector inject -f"), "{top}");
}

/// The proxy's `--control` and `REMORA_TRUST_ANCHORS` from the injector's settings; a trust
/// anchors file that would put a key into pods, or an address the proxy could not dial, stops
/// the run.
#[test]
fn control_plane_settings_reach_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let anchors = dir.path().join("ca.crt");
    std::fs::write(&anchors, &ca_pem).unwrap();
    let anchors = anchors.to_str().unwrap();

    let proxy = |output: &Output| -> serde_json::Value {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pod: serde_json::Value = serde_yaml_ng::from_slice(&output.stdout).unwrap();
        pod["spec"]["initContainers"][1].clone()
    };
    let anchors_env = |proxy: &serde_json::Value| {
        proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "REMORA_TRUST_ANCHORS")
            .map(|e| e["value"].as_str().unwrap().to_string())
    };
    let args = |proxy: &serde_json::Value| -> Vec<String> {
        serde_json::from_value(proxy["args"].clone()).unwrap()
    };

    // Flags.
    let output = injector(
        &[
            "inject",
            "-f",
            "-",
            "--control-addr",
            "[fd00::20]:8090",
            "--trust-anchors",
            anchors,
        ],
        &[],
        POD,
    );
    let injected = proxy(&output);
    assert!(args(&injected).ends_with(&["--control".into(), "[fd00::20]:8090".into()]));
    assert_eq!(anchors_env(&injected).as_deref(), Some(ca_pem.as_str()));
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Environment.
    let output = injector(
        &["inject", "-f", "-"],
        &[
            ("REMORA_CONTROL_ADDR", "10.96.0.20:8090"),
            ("REMORA_TRUST_ANCHORS_FILE", anchors),
        ],
        POD,
    );
    let injected = proxy(&output);
    assert!(args(&injected).ends_with(&["--control".into(), "10.96.0.20:8090".into()]));
    assert_eq!(anchors_env(&injected).as_deref(), Some(ca_pem.as_str()));

    // Defaults: the standard install's address, no anchors, and a warning saying what to do.
    let output = injector(&["inject", "-f", "-"], &[], POD);
    let injected = proxy(&output);
    assert!(args(&injected).ends_with(&[
        "--control".into(),
        "remora-control.remora-system.svc:8090".into()
    ]));
    assert_eq!(anchors_env(&injected), None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--trust-anchors") && stderr.contains("remora-identity-ca"),
        "{stderr}"
    );

    // Empty: neither.
    let output = injector(&["inject", "-f", "-", "--control-addr="], &[], POD);
    let injected = proxy(&output);
    assert!(!args(&injected).contains(&"--control".to_string()));
    assert!(
        output.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A key beside the certificate, and an address without a port: exit 1, naming them.
    let with_key = dir.path().join("bundle.pem");
    std::fs::write(&with_key, format!("{ca_pem}{}", ca_key.serialize_pem())).unwrap();
    let output = injector(
        &[
            "inject",
            "-f",
            "-",
            "--trust-anchors",
            with_key.to_str().unwrap(),
        ],
        &[],
        POD,
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bundle.pem") && stderr.contains("private key"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
    let output = injector(
        &["inject", "-f", "-", "--control-addr", "remora-control"],
        &[],
        POD,
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--control-addr") && stderr.contains("has no :port"),
        "{stderr}"
    );
}

/// The identity in `remora.io/status` takes its trust domain from `--trust-domain` or
/// `REMORA_TRUST_DOMAIN` (flag first); a bad one stops the run naming the setting.
#[test]
fn trust_domain_from_flag_and_environment() {
    let identity = |output: &Output| -> String {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pod: serde_json::Value = serde_yaml_ng::from_slice(&output.stdout).unwrap();
        let status = pod["metadata"]["annotations"]["remora.io/status"]
            .as_str()
            .unwrap();
        let status: serde_json::Value = serde_json::from_str(status).unwrap();
        status["identity"].as_str().unwrap().to_string()
    };
    let args = ["inject", "-f", "-"];
    assert_eq!(
        identity(&injector(&args, &[], POD)),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    let env = [("REMORA_TRUST_DOMAIN", "env.example")];
    assert_eq!(
        identity(&injector(&args, &env, POD)),
        "spiffe://env.example/ns/default/sa/default"
    );
    let with_flag = ["inject", "-f", "-", "--trust-domain", "flag.example"];
    assert_eq!(
        identity(&injector(&with_flag, &env, POD)),
        "spiffe://flag.example/ns/default/sa/default"
    );
    let bad = injector(
        &["inject", "-f", "-", "--trust-domain", "Not/A/Domain"],
        &[],
        POD,
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--trust-domain") && stderr.contains("Not/A/Domain"),
        "{stderr}"
    );
}
